"""The IR: onnx-graphsurgeon graphs and cnnc's small typed helpers over them (see ARCHITECTURE.md).

`from cnnc import ir` gives the graph helpers of `cnnc.ir.graph`; the other modules of this package
(`canonicalize`, `stats`, `weightless`, `ops`, `order`) are imported by their own names.
"""

from cnnc.ir.graph import (
    FOLD_SIZE_LIMIT_BYTES,
    GC_AFTER_BYTES,
    ConvGeometry,
    batch_norm_training_reason,
    constant_value,
    conv_geometry,
    export_weightless,
    float_constant,
    fold_constant_subgraphs,
    forget_loaded_values,
    has_subgraph,
    import_model,
    is_constant,
    is_empty_input,
    is_graph_output,
    is_topologically_sorted,
    make_constant,
    refresh_shapes,
    replace_tensor,
    shadowed_input_names,
    sole_consumer,
    sole_producer,
    tensor_rank,
    tidy,
    unique_name,
    unread_constants,
)

__all__ = [
    "FOLD_SIZE_LIMIT_BYTES", "GC_AFTER_BYTES", "ConvGeometry", "batch_norm_training_reason", "constant_value", "conv_geometry", "export_weightless",
    "float_constant", "fold_constant_subgraphs", "forget_loaded_values", "has_subgraph", "import_model", "is_constant", "is_empty_input",
    "is_graph_output", "is_topologically_sorted", "make_constant", "refresh_shapes", "replace_tensor", "shadowed_input_names",
    "sole_consumer",
    "sole_producer", "tensor_rank", "tidy", "unique_name", "unread_constants",
]
