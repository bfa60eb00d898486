"""The float64 evaluator: ONNX sub-graphs as torch functions, matching onnxruntime op by op (see ARCHITECTURE.md)."""

from cnnc.eval.evaluator import (
    SUPPORTED_OPS, SubgraphFunction, evaluate_graph, same_pads, topological_order, unsupported_reason,
)

__all__ = ["SUPPORTED_OPS", "SubgraphFunction", "evaluate_graph", "same_pads", "topological_order",
           "unsupported_reason"]
