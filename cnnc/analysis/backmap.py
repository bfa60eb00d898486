"""The adjoint back-map (seed 003, Wan, Cheung & Choe, AdjointBackMapV2): any unit of a ReLU / LeakyReLU network
as an inner product with its input and its biases.

Maths. Put every bias of every layer into one vector x_b (Fig. 2). A network built from convolutions, dense
layers, poolings (max and average), padding with zeros, reshapes, sums and concatenations, ReLU and LeakyReLU is
piecewise linear and positively homogeneous of degree 1 in (x, x_b) jointly: u(k·x, k·x_b) = k·u(x, x_b) for k > 0
(Appendix A, eq. A.11–A.13). Euler's identity then makes every unit u exactly
    u = ⟨x, H_I⟩ + ⟨x_b, H_b⟩,   H_I = ∂u/∂x,   H_b = ∂u/∂x_b,
the Jacobian taken at the given input: the paper's J*_F w (Eq. 4–5) is the vector–Jacobian product that torch
autograd computes (reverse mode), with each bias made a differentiable leaf of the float64 evaluator. Batch
normalisation is folded first (Eq. 7, the fold-bn pass), so its shift becomes a conv bias.

This module holds the map itself: the biases as leaves (`Bias`, x_b), the float64 functions of the graph, H by
vector–Jacobian products and the reconstruction ⟨x,H_I⟩ + ⟨x_b,H_b⟩. Its uses: one unit in a reconstruction mode
(`cnnc.analysis.explain`), the data-set tables (`cnnc.analysis.backmap_dataset`) and their reports
(`cnnc.analysis.backmap_report`); what it refuses is in `cnnc.analysis.backmap_support`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import torch

from cnnc.analysis.backmap_support import bias_slots, refusal_reason
from cnnc.errors import ModelError, UsageError
from cnnc.eval import SubgraphFunction, topological_order
from cnnc.ir import constant_value, is_empty_input

MODES = ("RM0", "RM1", "RM2", "RM3", "RM4")
TINY = float(np.finfo(np.float32).tiny)  # Eq. 16: c = 0 is replaced by the smallest positive (normal) float32


@dataclass(frozen=True)
class Bias:
    """One bias vector of x_b: a constant tensor and where it sits in the concatenation."""

    tensor: str
    node: str
    op: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def as_dict(self) -> dict:
        return {"tensor": self.tensor, "node": self.node, "op": self.op, "shape": list(self.shape),
                "offset": self.offset, "size": self.size}


def relative_error(reconstructed, true):
    """Eq. 16 as an absolute value: |ĉ − c| / |c|, with c = 0 replaced by the smallest normal float32."""
    true = np.asarray(true, dtype=np.float64)
    denominator = np.where(true == 0, TINY, np.abs(true))
    return np.abs(np.asarray(reconstructed, dtype=np.float64) - true) / denominator


class BackMap:
    """The adjoint back-map of a BN-folded graph with one float input, in float64."""

    def __init__(self, graph: gs.Graph, dtype: torch.dtype = torch.float64):
        if len(graph.inputs) != 1:
            raise UsageError(f"explain needs a model with exactly one input, this one has {len(graph.inputs)}")
        self.graph = graph
        self.dtype = dtype
        self.opset = graph.opset if isinstance(graph.opset, int) else None
        self.nodes = topological_order(list(graph.nodes))
        self.input = graph.inputs[0]
        self.tensors = graph.tensors()
        self.data = {self.input.name}
        for node in self.nodes:
            if any(t.name in self.data for t in node.inputs):
                self.data.update(t.name for t in node.outputs if t.name)
        self.producer = {t.name: node for node in self.nodes for t in node.outputs if t.name}
        self.biases: list[Bias] = []
        seen = set()
        for node in self.nodes:
            if not any(t.name in self.data for t in node.inputs):
                continue
            for slot in bias_slots(node, self.data):
                tensor = node.inputs[slot]
                if tensor.name in seen:  # a shared bias is one leaf; its gradient sums over its uses
                    continue
                seen.add(tensor.name)
                for reader in tensor.outputs:  # a leaf that also multiplies would make the unit degree 2 in it
                    if any(t.name in self.data for t in reader.inputs) and tensor.name not in [
                            reader.inputs[i].name for i in bias_slots(reader, self.data)]:
                        raise ModelError(f"cannot explain this network: constant '{tensor.name}' is a bias of "
                                         f"{node.op} '{node.name}' and also an operand of {reader.op} "
                                         f"'{reader.name}'")
                shape = tuple(constant_value(tensor).shape)
                offset = self.biases[-1].offset + self.biases[-1].size if self.biases else 0
                self.biases.append(Bias(tensor.name, node.name, node.op, shape, offset))
        self.bias_values = [torch.from_numpy(np.asarray(constant_value(self.tensors[b.tensor]), dtype=np.float64))
                             .to(dtype) for b in self.biases]
        self.x_b = np.concatenate([v.reshape(-1).numpy() for v in self.bias_values]) if self.biases else \
            np.zeros(0)

    # -- structure -------------------------------------------------------------------------------------------

    def cone(self, tensor_names: list[str]) -> list[gs.Node]:
        """The nodes needed to compute `tensor_names`, in topological order."""
        needed, stack = set(), list(tensor_names)
        while stack:
            node = self.producer.get(stack.pop())
            if node is None or id(node) in needed:
                continue
            needed.add(id(node))
            stack.extend(t.name for t in node.inputs if not is_empty_input(t))
        return [n for n in self.nodes if id(n) in needed]

    def check(self, nodes: list[gs.Node]) -> None:
        """Raise ModelError when the identity does not hold through one of `nodes`."""
        for node in nodes:
            if any(t.name in self.data for t in node.inputs):
                reason = refusal_reason(node, self.data)
                if reason:
                    raise ModelError(f"cannot explain this network: {reason}")

    def conv_layers(self) -> list[gs.Node]:
        return [n for n in self.nodes if n.op == "Conv" and n.inputs[0].name in self.data]

    def default_mode(self, tensor: str) -> str:
        producer = self.producer.get(tensor)
        is_output = any(t.name == tensor for t in self.graph.outputs)
        return "RM2" if producer is not None and producer.op == "Conv" and not is_output else "RM0"

    def resolve_tensor(self, name: str) -> str:
        if name in self.data:
            return name
        if name == "output" and self.graph.outputs:
            return self.graph.outputs[0].name
        convs = ", ".join(f"{n.outputs[0].name}" for n in self.conv_layers()[:12])
        raise UsageError(f"no activation tensor named '{name}' in the BN-folded graph (conv outputs: {convs}"
                         f"{', ...' if len(self.conv_layers()) > 12 else ''}; outputs: "
                         f"{', '.join(t.name for t in self.graph.outputs)}; `cnnc explain MODEL --list` lists all)")

    def function(self, nodes: list[gs.Node], outputs: list[str]) -> SubgraphFunction:
        leaves = [self.input] + [self.tensors[b.tensor] for b in self.biases]
        try:
            return SubgraphFunction(nodes, leaves, [self.tensors[n] for n in outputs], dtype=self.dtype,
                                    opset=self.opset)
        except ValueError as error:  # e.g. a shape parameter computed from the data
            raise ModelError(f"cannot evaluate the model in float64: {error}") from None

    def pre_bias_conv(self, conv: gs.Node) -> SubgraphFunction:
        """conv without its bias, as a function of its input: c = F ⊛ w (Eq. 3). Fresh tensors, so that the
        graph gains no consumer."""
        source = conv.inputs[0]
        data_in = gs.Variable(source.name, dtype=source.dtype, shape=source.shape)
        weight = gs.Constant(conv.inputs[1].name, np.asarray(constant_value(conv.inputs[1])))
        out = gs.Variable(conv.name + "__pre_bias")
        node = gs.Node("Conv", conv.name + "__pre_bias", attrs=dict(conv.attrs), inputs=[data_in, weight],
                       outputs=[out])
        return SubgraphFunction([node], [data_in], [out], dtype=self.dtype, opset=self.opset)

    # -- the back-map ----------------------------------------------------------------------------------------

    def as_batch(self, samples: np.ndarray) -> torch.Tensor:
        array = np.asarray(samples, dtype=np.float64)
        rank = len(self.input.shape or [])
        if rank and array.ndim == rank - 1:
            array = array[None]
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.dtype)

    def vjp(self, function: SubgraphFunction, x: torch.Tensor, cotangents: torch.Tensor,
            vectorize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample n and cotangent k: (∂⟨cot_nk, f(x_n, x_b)⟩/∂x_n, ∂.../∂x_b), shapes (N, K, *x_n) and
        (N, K, len(x_b)). `cotangents` is (N, K, *f(x_n).shape). vmap keeps the bias gradients per sample."""
        biases = [b.clone() for b in self.bias_values]

        if vectorize:
            try:
                def per_sample(x1, cot):
                    _, pullback = torch.func.vjp(lambda xs, *bs: function(xs[None], *bs)[0][0], x1, *biases)
                    return torch.func.vmap(pullback)(cot)

                grads = torch.func.vmap(per_sample)(x, cotangents)
                h_i = grads[0]
                h_b = torch.cat([g.reshape(g.shape[0], g.shape[1], -1) for g in grads[1:]], dim=2) if biases else \
                    x.new_zeros(x.shape[0], cotangents.shape[1], 0)
                return h_i, h_b
            except (RuntimeError, NotImplementedError, ValueError):
                pass  # an op without a batching rule: the loop below computes the same gradients
        n, k = cotangents.shape[:2]
        h_i = x.new_zeros((n, k) + tuple(x.shape[1:]))
        h_b = x.new_zeros((n, k, self.x_b.size))
        for i in range(n):
            xi = x[i:i + 1].clone().requires_grad_(True)
            leaves = [b.clone().requires_grad_(True) for b in biases]
            out = function(xi, *leaves)[0][0]
            for j in range(k):
                grads = torch.autograd.grad(out, [xi, *leaves], cotangents[i, j], retain_graph=True,
                                            allow_unused=True)
                h_i[i, j] = grads[0][0]
                if leaves:
                    h_b[i, j] = torch.cat([(g if g is not None else torch.zeros_like(b)).reshape(-1)
                                           for g, b in zip(grads[1:], leaves)])
        return h_i, h_b

    def reconstruct(self, x: torch.Tensor, h_i: torch.Tensor, h_b: torch.Tensor) -> torch.Tensor:
        """⟨x_n, H_I⟩ + ⟨x_b, H_b⟩ for each (n, k)."""
        x_b = torch.from_numpy(self.x_b).to(self.dtype)
        return (h_i * x[:, None]).reshape(h_i.shape[0], h_i.shape[1], -1).sum(-1) + h_b @ x_b

    def list_units(self) -> list[dict]:
        """The conv layers and outputs that can be named in --unit, with per-sample shapes where known."""
        rows = []
        for conv in self.conv_layers():
            shape = conv.outputs[0].shape
            rows.append({"tensor": conv.outputs[0].name, "node": conv.name, "op": "Conv",
                         "shape": list(shape[1:]) if shape else None, "modes": list(MODES)})
        for tensor in self.graph.outputs:
            producer = self.producer.get(tensor.name)
            rows.append({"tensor": tensor.name, "node": producer.name if producer else "",
                         "op": producer.op if producer else "", "shape": list(tensor.shape[1:]) if tensor.shape
                         else None, "modes": ["RM0"]})
        return rows
