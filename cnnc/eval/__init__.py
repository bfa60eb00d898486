"""The float64 evaluator: ONNX sub-graphs as torch functions, matching onnxruntime op by op (see ARCHITECTURE.md).

`function` runs nodes (SubgraphFunction, evaluate_graph); `registry` routes each op to its handler by the op table
(cnnc.ir.ops); the handlers live by op family in `conv`, `pool`, `resize`, `arithmetic`, `activations`, `tensor`
and `shape`, on the helpers of `common`.
"""

from cnnc.eval.conv import same_pads
from cnnc.eval.function import SubgraphFunction, evaluate_graph
from cnnc.eval.registry import SUPPORTED_OPS, unsupported_reason
from cnnc.ir.order import topological_order

__all__ = ["SUPPORTED_OPS", "SubgraphFunction", "evaluate_graph", "same_pads", "topological_order",
           "unsupported_reason"]
