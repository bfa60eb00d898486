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

Reconstruction modes (§3.3, Algorithm 1). For a conv layer l with kernel w (c_out × c_in × r1 × r2) reading the
in-channel feature map F_{l−1} (the conv's input), the unit is the convolution *before its own bias*, as in
Eq. 3 and Eq. 14 (c = F ⊛ w):
    RM4  one out-channel i at one stride position s, per in-channel j, no in-ch merge: one hypersurface per j,
         H_{l,s,j,i} (Eq. 8); its value is the in-channel-j partial sum Σ_window F_j · w_{i,j}.
    RM3  RM4 summed over all stride positions (global pooling, Eq. 9–10): H_{l,j,i} = Σ_s H_{l,s,j,i}.
    RM2  RM4 merged over in-channels (Eq. 11): H_{l,s,i} = Σ_j H_{l,s,j,i}, the value of conv unit (i, s).
    RM1  both (Eq. 12): H_{l,i} = Σ_s Σ_j H_{l,s,j,i}.
Global pooling is the sum over positions, as Algorithm 1 writes it (`sum(H, axis=(h, w))`).
    RM0  a fully connected output (Eq. 13). cnnc explains the unit's value as it is, own bias included (so H_b has
         a 1 at that bias), and allows it for any tensor, not only FC outputs.
Relative error (Eq. 16): |ĉ − c| / |c|, with c = 0 replaced by the smallest normal float32.

Data-set mode (Tables 3–4): for every conv layer (RM2 units, all positions and channels) and every graph output
(RM0), the share of units whose reconstruction is within 1 % over N inputs. ⟨[x; x_b], H_u⟩ for all units u of a
layer at once is the Jacobian–vector product J·[x; x_b] (the same H, contracted in forward mode), so the table is
one JVP per chunk of inputs; `explicit_units` additionally reconstructs random units per layer from explicit
reverse-mode H and reports them apart.

Refused: smooth nonlinearities (Sigmoid, Tanh, GELU, Softmax, ...: the identity needs σ(c) = c·σ'(c), eq. A.14,
which holds only for piecewise-linear σ through 0), products of two activations (degree 2), Clip bounds other than
0 and nonzero pad values (constants that act like biases but are not biases), unfolded BatchNormalization, and
anything the evaluator does not reproduce exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import torch

from cnnc.errors import ModelError, UsageError
from cnnc.ir import constant_value, is_empty_input
from cnnc.eval import SubgraphFunction, topological_order, unsupported_reason

MODES = ("RM0", "RM1", "RM2", "RM3", "RM4")
TINY = float(np.finfo(np.float32).tiny)  # Eq. 16: c = 0 is replaced by the smallest positive (normal) float32

_SMOOTH = frozenset({
    "Sigmoid", "Tanh", "Softmax", "LogSoftmax", "Gelu", "Erf", "Elu", "Selu", "Celu", "Softplus", "Softsign",
    "Mish", "HardSigmoid", "HardSwish", "Swish", "Exp", "Log", "Sqrt", "Pow", "Reciprocal", "Sin", "Cos", "Tan",
    "Atan", "Asin", "Acos", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh",
})
# Positively homogeneous and piecewise linear in their data inputs once biases are leaves (other conditions below).
_PIECEWISE_LINEAR = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "MaxPool",
    "AveragePool", "GlobalAveragePool", "ReduceMean", "ReduceSum", "Concat", "Split", "Slice", "Reshape", "Flatten",
    "Transpose", "Squeeze", "Unsqueeze", "SpaceToDepth", "DepthToSpace", "Identity", "Dropout", "Pad", "Resize",
    "Upsample", "Clip", "Gather", "Cast",
})


# ----------------------------------------------------------------------------------------------------------------
# The graph: data tensors, biases, and what can be explained


def _is_float_constant(tensor: gs.Tensor) -> bool:
    value = None if is_empty_input(tensor) else constant_value(tensor)
    return value is not None and np.issubdtype(value.dtype, np.floating)


def _scalar(tensor: gs.Tensor | None) -> float | None:
    if tensor is None or is_empty_input(tensor):
        return None
    value = constant_value(tensor)
    return None if value is None or value.size != 1 else float(value.reshape(-1)[0])


def _refusal(node: gs.Node, data: set[str]) -> str | None:
    """Why the identity u = ⟨x,H_I⟩ + ⟨x_b,H_b⟩ would not hold through `node` (a node with a data input)."""
    op = node.op
    here = f"{op} '{node.name}'"
    if op in _SMOOTH:
        return (f"{here} is a smooth nonlinearity: the back-map identity u = <x,H_I> + <x_b,H_b> holds only for "
                f"piecewise-linear activations (ReLU, LeakyReLU, MaxPool; seed 003 eq. A.14)")
    if op == "BatchNormalization":
        return f"{here} is not folded (training mode or non-constant statistics); explain needs BN folded (Eq. 7)"
    if op not in _PIECEWISE_LINEAR:
        reason = unsupported_reason(node)
        return f"{here} is not piecewise linear and positively homogeneous" + (f" ({reason})" if reason else "")
    reason = unsupported_reason(node)
    if reason:
        return f"{here}: {reason}"
    inputs = [t for t in node.inputs if not is_empty_input(t)]
    data_inputs = [t for t in inputs if t.name in data]
    if op in ("Mul", "MatMul") and len(data_inputs) > 1:
        return f"{here} multiplies two activations (degree 2, not positively homogeneous)"
    if op == "Gemm" and len([t for t in inputs[:2] if t.name in data]) > 1:
        return f"{here} multiplies two activations (degree 2, not positively homogeneous)"
    if op == "Div" and len(inputs) > 1 and inputs[1].name in data:
        return f"{here} divides by an activation (not positively homogeneous)"
    if op in ("Conv", "ConvTranspose") and len(inputs) > 1 and inputs[1].name in data:
        return f"{here} has a computed (non-constant) weight"
    if op == "Clip":
        low = node.attrs.get("min") if "min" in node.attrs else _scalar(node.inputs[1] if len(node.inputs) > 1
                                                                         else None)
        high = node.attrs.get("max") if "max" in node.attrs else _scalar(node.inputs[2] if len(node.inputs) > 2
                                                                          else None)
        for bound, name in ((low, "min"), (high, "max")):
            present = (name == "min" and len(node.inputs) > 1 and not is_empty_input(node.inputs[1])) or (
                name == "max" and len(node.inputs) > 2 and not is_empty_input(node.inputs[2]))
            if (bound is None and present) or (bound is not None and bound != 0.0 and math.isfinite(bound)):
                return (f"{here} clips at {name}={bound}: a threshold other than 0 is a constant that is not a "
                        f"bias (ReLU6-style clipping breaks the identity where it saturates)")
    mode = node.attrs.get("mode", "constant")
    if op == "Pad" and (mode.decode() if isinstance(mode, bytes) else mode) == "constant":
        value = node.attrs.get("value") if "value" in node.attrs else _scalar(
            node.inputs[2] if len(node.inputs) > 2 else None)
        if (value is None and len(node.inputs) > 2 and not is_empty_input(node.inputs[2])) or (value or 0.0) != 0.0:
            return f"{here} pads with the constant {value}: a nonzero pad value acts like an unlisted bias"
    return None


def _bias_slots(node: gs.Node, data: set[str]) -> list[int]:
    """Input indices of `node` that are biases (constants that enter additively)."""
    if node.op in ("Conv", "ConvTranspose", "Gemm"):
        return [2] if len(node.inputs) > 2 and _is_float_constant(node.inputs[2]) else []
    if node.op in ("Add", "Sub", "Concat"):
        return [i for i, t in enumerate(node.inputs) if t.name not in data and _is_float_constant(t)]
    return []


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


@dataclass(frozen=True)
class Unit:
    """A unit to explain: tensor `tensor`, per-sample multi-index `index` (channel first for a conv output)."""

    tensor: str
    index: tuple[int, ...]
    mode: str


@dataclass
class Explanation:
    unit: Unit
    true_value: float  # for RM4 / RM3: the sum over in-channels (= the RM2 / RM1 value)
    reconstructed_value: float
    relative_error: float
    H_I: np.ndarray  # input-shaped; (c_in, *input) for RM4 / RM3
    H_b: np.ndarray  # (len(x_b),); (c_in, len(x_b)) for RM4 / RM3
    x: np.ndarray
    x_b: np.ndarray
    biases: list[Bias]
    parts: list[dict] = field(default_factory=list)  # RM4 / RM3: per in-channel true, reconstructed, error
    notes: list[str] = field(default_factory=list)

    def as_dict(self, include_arrays: bool = True) -> dict:
        payload = {
            "unit": {"tensor": self.unit.tensor, "index": list(self.unit.index)}, "mode": self.unit.mode,
            "true_value": self.true_value, "reconstructed_value": self.reconstructed_value,
            "relative_error": self.relative_error,
            "input_term": float(np.sum(self.x * self.H_I.reshape((-1,) + self.x.shape).sum(0))),
            "bias_term": float(np.dot(self.x_b, self.H_b.reshape(-1, self.x_b.size).sum(0))),
            "parts": self.parts, "notes": self.notes, "biases": [b.as_dict() for b in self.biases],
            "H_I_shape": list(self.H_I.shape), "H_b_shape": list(self.H_b.shape),
        }
        if include_arrays:
            payload.update({"H_I": self.H_I.tolist(), "H_b": self.H_b.tolist(), "x_b": self.x_b.tolist()})
        return payload


def relative_error(reconstructed, true):
    """Eq. 16 as an absolute value: |ĉ − c| / |c|, with c = 0 replaced by the smallest normal float32."""
    true = np.asarray(true, dtype=np.float64)
    denominator = np.where(true == 0, TINY, np.abs(true))
    return np.abs(np.asarray(reconstructed, dtype=np.float64) - true) / denominator


def parse_unit(text: str) -> tuple[str, tuple[int, ...]]:
    """`'output:3'` or `'TENSOR:c,y,x'` into (tensor name, indices)."""
    name, sep, indices = text.rpartition(":")
    try:
        index = tuple(int(part) for part in indices.split(","))
    except ValueError:
        index = ()
    if not sep or not name or not index or any(i < 0 for i in index):
        raise UsageError(f"bad --unit {text!r}; expected output:K or TENSOR:c,y,x with non-negative integers")
    return name, index


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
            for slot in _bias_slots(node, self.data):
                tensor = node.inputs[slot]
                if tensor.name in seen:  # a shared bias is one leaf; its gradient sums over its uses
                    continue
                seen.add(tensor.name)
                for reader in tensor.outputs:  # a leaf that also multiplies would make the unit degree 2 in it
                    if any(t.name in self.data for t in reader.inputs) and tensor.name not in [
                            reader.inputs[i].name for i in _bias_slots(reader, self.data)]:
                        raise ModelError(f"cannot explain this network: constant '{tensor.name}' is a bias of "
                                         f"{node.op} '{node.name}' and also an operand of {reader.op} "
                                         f"'{reader.name}'")
                shape = tuple(constant_value(tensor).shape)
                offset = self.biases[-1].offset + self.biases[-1].size if self.biases else 0
                self.biases.append(Bias(tensor.name, node.name, node.op, shape, offset))
        self._bias_values = [torch.from_numpy(np.asarray(constant_value(self.tensors[b.tensor]), dtype=np.float64))
                             .to(dtype) for b in self.biases]
        self.x_b = np.concatenate([v.reshape(-1).numpy() for v in self._bias_values]) if self.biases else \
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
                reason = _refusal(node, self.data)
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

    def _function(self, nodes: list[gs.Node], outputs: list[str]) -> SubgraphFunction:
        leaves = [self.input] + [self.tensors[b.tensor] for b in self.biases]
        try:
            return SubgraphFunction(nodes, leaves, [self.tensors[n] for n in outputs], dtype=self.dtype,
                                    opset=self.opset)
        except ValueError as error:  # e.g. a shape parameter computed from the data
            raise ModelError(f"cannot evaluate the model in float64: {error}") from None

    def _pre_bias_conv(self, conv: gs.Node) -> SubgraphFunction:
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

    def _as_batch(self, samples: np.ndarray) -> torch.Tensor:
        array = np.asarray(samples, dtype=np.float64)
        rank = len(self.input.shape or [])
        if rank and array.ndim == rank - 1:
            array = array[None]
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.dtype)

    def vjp(self, function: SubgraphFunction, x: torch.Tensor, cotangents: torch.Tensor,
            vectorize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample n and cotangent k: (∂⟨cot_nk, f(x_n, x_b)⟩/∂x_n, ∂.../∂x_b), shapes (N, K, *x_n) and
        (N, K, len(x_b)). `cotangents` is (N, K, *f(x_n).shape). vmap keeps the bias gradients per sample."""
        biases = [b.clone() for b in self._bias_values]

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

    def explain(self, sample: np.ndarray, unit_text: str, mode: str | None = None,
                vectorize: bool = True) -> Explanation:
        """Explain one unit (`output:K` or `TENSOR:c,y,x`) at one input sample."""
        name, index = parse_unit(unit_text)
        tensor = self.resolve_tensor(name)
        mode = (mode or self.default_mode(tensor)).upper()
        if mode not in MODES:
            raise UsageError(f"unknown --mode {mode}; choose one of {', '.join(MODES)}")
        x = self._as_batch(sample)
        if x.shape[0] != 1:
            raise UsageError(f"explain takes one input sample, got a batch of {x.shape[0]} (use the data-set mode)")
        if mode == "RM0":
            return self._explain_value(x, tensor, index)
        return self._explain_conv(x, tensor, index, mode, vectorize)

    def _explain_value(self, x: torch.Tensor, tensor: str, index: tuple[int, ...]) -> Explanation:
        nodes = self.cone([tensor])
        self.check(nodes)
        function = self._function(nodes, [tensor])
        with torch.no_grad():
            value = function(x, *self._bias_values)[0][0]
        flat = _flat_index(index, tuple(value.shape), tensor)
        cotangent = torch.zeros(value.numel(), dtype=self.dtype)
        cotangent[flat] = 1
        h_i, h_b = self.vjp(function, x, cotangent.reshape((1, 1) + tuple(value.shape)))
        true = float(value.reshape(-1)[flat])
        recon = float(self.reconstruct(x, h_i, h_b)[0, 0])
        unit = Unit(tensor, tuple(int(i) for i in np.unravel_index(flat, tuple(value.shape))), "RM0")
        return Explanation(unit, true, recon, float(relative_error(recon, true)), h_i[0, 0].numpy(),
                           h_b[0, 0].numpy(), x[0].numpy(), self.x_b, self.biases)

    def _explain_conv(self, x, tensor, index, mode, vectorize) -> Explanation:
        conv = self.producer.get(tensor)
        if conv is None or conv.op != "Conv":
            raise UsageError(f"{mode} explains a convolution unit; '{tensor}' is produced by "
                             f"{conv.op if conv is not None else 'no node'} (use RM0 for any tensor)")
        source = conv.inputs[0].name
        nodes = self.cone([source])
        self.check(nodes + [conv])
        function = self._function(nodes, [source])
        with torch.no_grad():
            feature_map = function(x, *self._bias_values)[0]  # F_{l-1}: (1, c_in, ...)
        pre_bias = self._pre_bias_conv(conv)
        leaf = feature_map.clone().requires_grad_(True)
        conv_out = pre_bias(leaf)[0]
        pooled = mode in ("RM1", "RM3")
        channel = index[0]
        spatial = index[1:]
        if channel >= conv_out.shape[1]:
            raise UsageError(f"channel {channel} out of range: '{tensor}' has {conv_out.shape[1]} channels")
        if pooled:
            target = conv_out[0, channel].sum()
            unit_index = (channel,)
        else:
            if len(spatial) != conv_out.dim() - 2:
                raise UsageError(f"{mode} needs TENSOR:c,{','.join('yxz'[:conv_out.dim() - 2])} for '{tensor}'")
            if any(s >= d for s, d in zip(spatial, conv_out.shape[2:])):
                raise UsageError(f"position {spatial} out of range for '{tensor}' of spatial size "
                                 f"{tuple(conv_out.shape[2:])}")
            target = conv_out[(0, channel) + tuple(spatial)]
            unit_index = (channel,) + tuple(spatial)
        # The kernel back-mapped onto F_{l-1}: c = ⟨F_{l-1}, cot⟩ exactly, since the conv is linear in its input.
        cotangent = torch.autograd.grad(target, leaf)[0][0].detach()
        true = float(target.detach())
        per_channel = mode in ("RM3", "RM4")
        if per_channel:
            group = int(conv.attrs.get("group", 1))
            per_group = feature_map.shape[1] // group
            first = (channel // (conv_out.shape[1] // group)) * per_group
            channels = list(range(first, first + per_group))
            cotangents = torch.zeros((len(channels),) + tuple(cotangent.shape), dtype=self.dtype)
            for k, j in enumerate(channels):
                cotangents[k, j] = cotangent[j]
        else:
            cotangents = cotangent[None]
        h_i, h_b = self.vjp(function, x, cotangents[None], vectorize=vectorize)
        recon_parts = self.reconstruct(x, h_i, h_b)[0]
        recon = float(recon_parts.sum())
        parts = []
        if per_channel:
            for k, j in enumerate(channels):
                part_true = float((feature_map[0] * cotangents[k]).sum())
                part_recon = float(recon_parts[k])
                parts.append({"in_channel": j, "true_value": part_true, "reconstructed_value": part_recon,
                              "relative_error": float(relative_error(part_recon, part_true))})
            h_i_out, h_b_out = h_i[0].numpy(), h_b[0].numpy()
        else:
            h_i_out, h_b_out = h_i[0, 0].numpy(), h_b[0, 0].numpy()
        bias = conv.inputs[2] if len(conv.inputs) > 2 and not is_empty_input(conv.inputs[2]) else None
        notes = [f"the unit is conv '{conv.name}' before its own bias (c = F ⊛ w, seed 003 Eq. 3 / Eq. 14)"]
        if bias is not None and not pooled:
            notes.append(f"its output '{tensor}' at this position adds bias "
                         f"{float(np.asarray(constant_value(bias)).reshape(-1)[channel]):.6g}")
        if pooled:
            notes.append("global pooling is the sum over all stride positions (Algorithm 1)")
        return Explanation(Unit(tensor, unit_index, mode), true, recon, float(relative_error(recon, true)),
                           h_i_out, h_b_out, x[0].numpy(), self.x_b, self.biases, parts, notes)

    # -- data-set mode (Tables 3-4) ----------------------------------------------------------------------------

    def dataset_table(self, samples: np.ndarray, threshold: float = 0.01, chunk: int = 16,
                      explicit_units: int = 0, explicit_outputs: bool = False, seed: int = 0) -> dict:
        """Per layer, the share of units reconstructed within `threshold` over all `samples` (Tables 3–4)."""
        convs = self.conv_layers()
        outputs = [t.name for t in self.graph.outputs]
        dense = [n for n in self.nodes if n.op in ("Gemm", "MatMul") and n.outputs[0].name in self.data
                 and n.outputs[0].name not in outputs]  # hidden fully connected layers, explained whole (RM0)
        self.check(self.nodes)
        sources = list(dict.fromkeys(c.inputs[0].name for c in convs))
        function = self._function(self.nodes, sources + [n.outputs[0].name for n in dense] + outputs)
        pre_bias = [self._pre_bias_conv(c) for c in convs]
        layers = [{"layer": i, "kind": "conv", "node": c.name, "tensor": c.outputs[0].name, "mode": "RM2",
                   "first_layer": c.inputs[0].name == self.input.name} for i, c in enumerate(convs)]
        layers += [{"layer": len(convs) + i, "kind": "FC (hidden)", "node": n.name, "tensor": n.outputs[0].name,
                    "mode": "RM0", "first_layer": n.inputs[0].name == self.input.name} for i, n in enumerate(dense)]
        for name in outputs:
            producer = self.producer.get(name)
            layers.append({"layer": len(layers), "kind": "FC" if producer is not None and producer.op in (
                "Gemm", "MatMul") else "output", "node": producer.name if producer is not None else "",
                "tensor": name, "mode": "RM0", "first_layer": False})
        stats = [{"units": 0, "within": 0, "max": 0.0, "sum": 0.0, "max_abs": 0.0, "scale": 0.0} for _ in layers]
        x_all = self._as_batch(samples)
        biases = list(self._bias_values)
        for start in range(0, x_all.shape[0], chunk):
            x = x_all[start:start + chunk]
            values, tangents = torch.func.jvp(lambda xs, *bs: function(xs, *bs), (x, *biases), (x, *biases))
            by_name = dict(zip(function.output_names, zip(values, tangents)))
            with torch.no_grad():
                pairs = [(fn(by_name[c.inputs[0].name][0])[0], fn(by_name[c.inputs[0].name][1])[0])
                         for c, fn in zip(convs, pre_bias)]
                pairs += [by_name[n.outputs[0].name] for n in dense] + [by_name[name] for name in outputs]
            for stat, (true, recon) in zip(stats, pairs):
                errors = relative_error(recon.detach().numpy(), true.detach().numpy())
                stat["units"] += errors.size
                stat["within"] += int((errors <= threshold).sum())
                stat["max"] = max(stat["max"], float(errors.max()) if errors.size else 0.0)
                stat["sum"] += float(errors.sum())
                stat["max_abs"] = max(stat["max_abs"], float((recon - true).abs().max()) if errors.size else 0.0)
                stat["scale"] = max(stat["scale"], float(true.abs().max()) if errors.size else 0.0)
        for layer, stat in zip(layers, stats):
            layer.update({"units": stat["units"], "units_per_input": stat["units"] // max(x_all.shape[0], 1),
                          "within_percent": 100.0 * stat["within"] / max(stat["units"], 1),
                          "max_relative_error": stat["max"], "mean_relative_error": stat["sum"] / max(
                              stat["units"], 1),
                          # the worst error against the layer's scale: Eq. 16 divides by |c|, which is tiny
                          # where c is a near-cancellation, so its maximum says little about the identity.
                          "max_abs_error_over_max_abs_value": stat["max_abs"] / stat["scale"] if stat["scale"]
                          else 0.0})
        if explicit_units or explicit_outputs:
            self._explicit_checks(x_all, convs + dense, layers, explicit_units, explicit_outputs, seed, chunk)
        return {"inputs": int(x_all.shape[0]), "threshold": threshold, "x_b_size": int(self.x_b.size),
                "layers": layers}

    def _explicit_checks(self, x_all, inner, layers, units_per_layer, all_outputs, seed, chunk) -> None:
        """Reconstruct units from explicit reverse-mode H (the back-map itself) and record the worst error:
        `units_per_layer` random units per input of every conv (pre-bias, RM2) and hidden dense layer (RM0) in
        `inner`, and every unit of every graph output (RM0)."""
        generator = np.random.default_rng(seed)
        checks = []
        if units_per_layer:
            checks += [(layer, node) for layer, node in zip(layers, inner)]
        if all_outputs:
            checks += [(layer, None) for layer in layers[len(inner):]]
        for layer, node in checks:
            conv = node if node is not None and node.op == "Conv" else None
            source = conv.inputs[0].name if conv is not None else layer["tensor"]
            function = self._function(self.cone([source]), [source])
            pre_bias = self._pre_bias_conv(conv) if conv is not None else None
            worst, count = 0.0, 0
            for start in range(0, x_all.shape[0], chunk):
                x = x_all[start:start + chunk]
                with torch.no_grad():
                    values = function(x, *self._bias_values)[0]
                if node is None:  # every output unit: one cotangent per unit
                    per_sample = tuple(values.shape[1:])
                    units = int(np.prod(per_sample))
                    eye = torch.eye(units, dtype=self.dtype).reshape((units,) + per_sample)
                    cotangents = eye[None].expand((x.shape[0],) + eye.shape).contiguous()
                    true = values.reshape(x.shape[0], -1).numpy()
                else:
                    cotangents, true = _random_unit_cotangents(pre_bias, values, units_per_layer, generator)
                h_i, h_b = self.vjp(function, x, cotangents)
                errors = relative_error(self.reconstruct(x, h_i, h_b).numpy(), true)
                worst, count = max(worst, float(errors.max())), count + errors.size
            layer.update({"explicit_units": count, "explicit_max_relative_error": worst})

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


def _random_unit_cotangents(pre_bias: SubgraphFunction | None, values: torch.Tensor, units: int,
                            generator: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """For `units` random units per sample of `pre_bias(values)` (a conv before its bias), or of `values` itself
    when `pre_bias` is None: the unit's gradient with respect to `values` (for a conv, its kernel back-mapped onto
    the conv input) as cotangents (N, units, *values.shape[1:]), and the units' values (N, units)."""
    leaf = values.clone().requires_grad_(True)
    out = (pre_bias(leaf)[0] if pre_bias is not None else leaf).reshape(values.shape[0], -1)
    picks = generator.integers(0, out.shape[1], size=(values.shape[0], units))
    cotangents = torch.zeros((values.shape[0], units) + tuple(values.shape[1:]), dtype=values.dtype)
    true = np.zeros(picks.shape)
    for k in range(units):
        selected = out[np.arange(values.shape[0]), picks[:, k]]
        cotangents[:, k] = torch.autograd.grad(selected.sum(), leaf, retain_graph=True)[0].detach()
        true[:, k] = selected.detach().numpy()
    return cotangents, true


def _flat_index(index: tuple[int, ...], shape: tuple[int, ...], tensor: str) -> int:
    size = int(np.prod(shape, dtype=np.int64))
    if len(index) == 1 and len(shape) != 1:
        flat = index[0]
    elif len(index) == len(shape):
        if any(i >= d for i, d in zip(index, shape)):
            raise UsageError(f"index {index} out of range for '{tensor}' of per-sample shape {shape}")
        flat = int(np.ravel_multi_index(index, shape))
    else:
        raise UsageError(f"'{tensor}' has per-sample shape {shape}: give one flat index or {len(shape)} indices")
    if flat >= size:
        raise UsageError(f"index {flat} out of range for '{tensor}' with {size} units per sample")
    return flat


# ----------------------------------------------------------------------------------------------------------------
# Reports


def format_dataset_table(table: dict, title: str = "") -> str:
    """A Markdown table in the layout of the paper's Tables 3–4 (one row per layer, ε_l = share within 1 %)."""
    explicit = any("explicit_units" in row for row in table["layers"])
    headers = ["layer", "node", "mode", "units / input", "units", "within 1 %", "max rel. error", "mean rel. error",
               "max abs. error / max abs. value"]
    if explicit:
        headers += ["explicit-H units", "explicit-H max rel. error"]
    lines = [f"### {title}", ""] if title else []
    lines += [(f"{table['inputs']} inputs; units with |ĉ − c| / |c| ≤ {100 * table['threshold']:g} % (Eq. 16); "
               f"x_b holds {table['x_b_size']} biases."), "",
              "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in table["layers"]:
        label = f"ε{row['layer']}" + {"FC": " (FC)", "FC (hidden)": " (FC, hidden)"}.get(row["kind"], "") + (
            " (first layer)" if row["first_layer"] else "")
        cells = [label, row["node"], row["mode"], str(row["units_per_input"]), str(row["units"]),
                 f"{row['within_percent']:.4f} %", f"{row['max_relative_error']:.3g}",
                 f"{row['mean_relative_error']:.3g}", f"{row['max_abs_error_over_max_abs_value']:.3g}"]
        if explicit:
            cells += [str(row.get("explicit_units", "")), f"{row['explicit_max_relative_error']:.3g}"
                      if "explicit_units" in row else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_hypersurface(explanation: Explanation, path: str | Path) -> None:
    """A heat map of H_I per input channel (and their sum), diverging around 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = explanation.H_I
    if explanation.unit.mode in ("RM3", "RM4"):
        h = h.sum(axis=0)  # merged over in-channels: the RM1 / RM2 hypersurface
    if h.ndim == 1:
        h = h[None, None]
    elif h.ndim == 2:
        h = h[:, None]
    panels = [h[c] for c in range(h.shape[0])] + ([h.sum(axis=0)] if h.shape[0] > 1 else [])
    titles = [f"channel {c}" for c in range(h.shape[0])] + (["sum over channels"] if h.shape[0] > 1 else [])
    panels = [p.reshape(p.shape[0], -1) if p.ndim > 2 else p for p in panels]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for axis, panel, title in zip(axes[0], panels, titles):
        limit = float(np.abs(panel).max()) or 1.0
        image = axis.imshow(panel, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto" if panel.shape[0] == 1
                            else "equal")
        axis.set_title(title, fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    unit = explanation.unit
    figure.suptitle(f"H_I of {unit.tensor}{list(unit.index)} ({unit.mode}): true {explanation.true_value:.6g}, "
                    f"reconstructed {explanation.reconstructed_value:.6g}, rel. error "
                    f"{explanation.relative_error:.2g}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
