"""A set of onnx-graphsurgeon nodes as a differentiable float64 torch function (ARCHITECTURE.md), and whole-graph
evaluation.

`collapse` takes exact Jacobians of linear machines through it (torch.func.vjp / jvp / vmap, or batched autograd),
`explain` takes gradients with respect to inputs and biases, and `analyze` reads intermediate activations.

Semantics are onnxruntime's (CPU provider), op by op, including attribute defaults; where the ONNX text and
onnxruntime disagree, onnxruntime wins, because the collapsed model must equal the original *as onnxruntime runs it*
(each handler module states its op family's rules). Float tensors are evaluated in `dtype` (float64 by default);
integer tensors (shapes, axes, indices) stay int64.

Shapes come from the torch values at call time, never from the graph's stored shapes, so one function serves any
batch size or spatial size. Parameters such as pads, axes, target shapes and scales are read with `.tolist()` when
the node runs: they must be constants or computed from constants or from `Shape`, never from batched data.
`unsupported_reason(node)` names every op or attribute combination the evaluator would not reproduce exactly; the
constructor refuses such nodes instead of evaluating them wrongly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs
import torch

from cnnc.eval.common import Context, Handler
from cnnc.eval.registry import HANDLERS, unsupported_reason
from cnnc.eval.shape import constant_node_value, to_torch
from cnnc.ir import constant_value, is_empty_input
from cnnc.ir.order import topological_order


class SubgraphFunction:
    """`nodes` (topological order) as a function from the values of `inputs` to those of `outputs`.

    Every non-constant input of a node must be one of `inputs` or an output of an earlier node. Constants
    (gs.Constant, Constant-node outputs, and nodes computed only from constants) are converted to torch once:
    floats in `dtype`, integers as int64. `opset` is the graph's default-domain opset; only Softmax needs it, and
    without it a Softmax is evaluated only where the opset cannot change the result.
    """

    def __init__(self, nodes: list[gs.Node], inputs: list[gs.Tensor], outputs: list[gs.Tensor],
                 dtype: torch.dtype = torch.float64, opset: int | None = None):
        self.dtype = dtype
        self.input_names = [t.name for t in inputs]
        self.output_names = [t.name for t in outputs]
        self._context = Context(dtype, opset)
        problems = [f"{n.op} '{n.name}': {r}" for n in nodes if (r := unsupported_reason(n)) is not None]
        if problems:
            raise ValueError("the evaluator cannot run: " + "; ".join(problems))

        self._constants: dict[str, torch.Tensor] = {}
        available = set(self.input_names)
        steps: list[tuple[gs.Node, Handler, list[str], list[str]]] = []
        for node in nodes:
            if node.op == "Constant":
                self._constants[node.outputs[0].name] = to_torch(constant_node_value(node), dtype)
                available.add(node.outputs[0].name)
                continue
            input_names = []
            for tensor in node.inputs:
                if is_empty_input(tensor):
                    input_names.append("")
                    continue
                if tensor.name not in available and tensor.name not in self._constants:
                    value = constant_value(tensor)
                    if value is None:
                        raise ValueError(f"input '{tensor.name}' of {node.op} '{node.name}' is neither a function "
                                         f"input, a constant, nor produced by an earlier node")
                    self._constants[tensor.name] = to_torch(value, dtype)
                input_names.append(tensor.name)
            output_names = [t.name for t in node.outputs]
            steps.append((node, HANDLERS[node.op], input_names, output_names))
            available.update(name for name in output_names if name)
        for name in self.output_names:
            if name not in available and name not in self._constants:
                raise ValueError(f"output '{name}' is not computed by the given nodes")
        self._steps = self._fold_constant_steps(steps)

    def _fold_constant_steps(self, steps):
        """Evaluate once the nodes that read only constants (exporters' shape and pad arithmetic)."""
        remaining = []
        self._folded_names: list[str] = []
        for step in steps:
            node, handler, input_names, output_names = step
            if node.op != "Shape" and all(name == "" or name in self._constants for name in input_names):
                with torch.no_grad():
                    values = handler(node, [self._constants[n] if n else None for n in input_names],
                                     self._context)
                for name, value in zip(output_names, values):
                    if name:
                        self._constants[name] = value
                        self._folded_names.append(name)
            else:
                remaining.append(step)
        return remaining

    def _run(self, values: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(values) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs ({self.input_names}), got {len(values)}")
        env: dict[str, torch.Tensor] = {}
        for name, value in zip(self.input_names, values):
            value = torch.as_tensor(value)
            env[name] = value.to(self.dtype) if value.is_floating_point() else value
        for node, handler, input_names, output_names in self._steps:
            args = [(env[n] if n in env else self._constants[n]) if n else None for n in input_names]
            results = handler(node, args, self._context)
            for name, value in zip(output_names, results):
                if name:
                    env[name] = value
        return env

    def __call__(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env = self._run(values)
        return tuple(env[n] if n in env else self._constants[n] for n in self.output_names)

    def trace(self, *values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor of the evaluation by name: the inputs and each node's outputs (folded ones included)."""
        env = self._run(values)
        return {**{name: self._constants[name] for name in self._folded_names}, **env}


def evaluate_graph(graph: gs.Graph, feeds: dict[str, np.ndarray], dtype: torch.dtype = torch.float64,
                   ) -> dict[str, np.ndarray]:
    """Evaluate a whole graph in `dtype` (no gradients); returns every graph output by name as a numpy array."""
    missing = [t.name for t in graph.inputs if t.name not in feeds]
    if missing:
        raise ValueError(f"no value fed for graph input(s) {missing}")
    opset = graph.opset if isinstance(graph.opset, int) else None
    function = SubgraphFunction(topological_order(list(graph.nodes)), list(graph.inputs), list(graph.outputs),
                                dtype=dtype, opset=opset)
    with torch.no_grad():
        outputs = function(*[torch.from_numpy(np.asarray(feeds[t.name])) for t in graph.inputs])
    return {name: value.detach().cpu().numpy() for name, value in zip(function.output_names, outputs)}
