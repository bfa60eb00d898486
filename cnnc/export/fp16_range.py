"""Which float16 tensors of an onnx-fp16 export leave float16's range on the check's inputs.

Why: onnxruntime's CPU provider has float16 kernels for few ops on x86 (no Conv, no Gemm). It runs the others in
float32 behind inserted Casts and drops the Cast pairs between consecutive float32 kernels, so an intermediate
tensor that the converted graph types as float16 is never rounded to float16 there. A proof on the CPU provider
therefore shows the weights' rounding but not activation overflow: a value beyond ±65504 stays finite on the CPU
and becomes inf on a runtime that computes in float16 (CUDA, TensorRT, Triton's TensorRT accelerator).

What: the float32 model (whose tensor names the converted graph keeps for every node it converted) runs on the
check's first two seeded inputs (a U[0, 1) and an N(0, 1) batch) with every node output exposed; a tensor the converted graph types float16 whose
largest finite magnitude exceeds 65504 is reported. A reporting aid, not a proof: other inputs can reach further.
"""

from __future__ import annotations

import numpy as np
import onnx

from cnnc.io.precision import FLOAT16_MAX
from cnnc.runtime.inputs import make_input_batches
from cnnc.runtime.session import make_session


def float16_tensors(converted: onnx.ModelProto) -> set[str]:
    """Names of the tensors the converted graph types float16 (shape inference; empty when it fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(converted)
    except Exception:  # noqa: BLE001 - onnx raises several types (and fails above 2 GB): then nothing is known
        return set()
    values = [*inferred.graph.value_info, *inferred.graph.output]
    return {v.name for v in values if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}


def out_of_float16_range(model: onnx.ModelProto, converted: onnx.ModelProto, check: dict) -> dict[str, float]:
    """Tensor name -> max finite |value| (float32 runs of `model` on the first two seeded feeds of `check`) for the
    tensors `converted` types float16 that exceed ±65504, largest first."""
    halves = float16_tensors(converted)
    produced = [name for node in model.graph.node for name in node.output if name in halves]
    if not produced:
        return {}
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in produced
                                if name not in known)
    feeds = make_input_batches(model, n=2, seed=check.get("seed") or 0, input_shapes=check.get("input_shapes"),
                               user_inputs=check.get("user_inputs"))[:2]
    session = make_session(exposed, "cpu", "disabled")
    names = [o.name for o in session.get_outputs()]
    found: dict[str, float] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            if name in halves and isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size:
                finite = np.abs(value[np.isfinite(value)])
                largest = float(finite.max()) if finite.size else 0.0
                if largest > FLOAT16_MAX:
                    found[name] = max(largest, found.get(name, 0.0))
    return dict(sorted(found.items(), key=lambda item: -item[1]))
