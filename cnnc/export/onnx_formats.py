"""`onnx` and `onnx-fp16` exports, proven on onnxruntime.

- onnx: the model as `cnnc compile` writes it (fp32; external data forced, forbidden or above 2 GB), checked
  against the reference on onnxruntime's CPU provider at the per-dtype tolerance.
- onnx-fp16: `cnnc.io.precision.to_fp16` (onnxconverter-common with float16's real limits; Resize, reductions and
  shape computations kept float32 behind Casts; float32 inputs and outputs with `keep_io_types`). Proven against
  the float32 reference at float16's tolerance (rtol 2e-2, atol 2e-3: `compute_dtype="float16"`) on the CPU
  provider, and on the CUDA provider too when onnxruntime can run one: each provider has its own fp16 kernels.
  The CPU provider computes most ops in float32 behind Casts, so it cannot see activations overflow float16:
  `fp16_range` finds the float16 tensors beyond ±65504 on the seeded inputs, and a note in the report names them:
  there a float16 runtime (CUDA, TensorRT) would produce inf.

`backend.save` writes atomically, after the proof.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from cnnc.export.fp16_range import out_of_float16_range
from cnnc.export.proof import require_proven
from cnnc.io import backend
from cnnc.io.precision import to_fp16
from cnnc.runtime.equivalence import check_equivalence
from cnnc.runtime.session import cuda_available


def export_onnx(model: onnx.ModelProto, reference: onnx.ModelProto, path: Path, check: dict, options,
                notes: list[str]) -> tuple[dict, list[Path]]:
    proofs = {"onnxruntime CPU": check_equivalence(reference, model, **check)}
    require_proven("onnx", proofs)
    return proofs, backend.save(model, path, options.external_data, notes)


def export_onnx_fp16(model: onnx.ModelProto, reference: onnx.ModelProto, path: Path, check: dict, options,
                     notes: list[str]) -> tuple[dict, list[Path]]:
    converted = to_fp16(model, keep_io_types=options.keep_io_types, notes=notes)
    proofs = {"onnxruntime CPU": check_equivalence(reference, converted, compute_dtype="float16", **check)}
    if cuda_available():
        proofs["onnxruntime CUDA"] = check_equivalence(reference, converted, compute_dtype="float16",
                                                       provider="cuda", **check)
    require_proven("onnx-fp16", proofs)
    overflow = out_of_float16_range(model, converted, check)
    if overflow:
        worst, largest = next(iter(overflow.items()))
        notes.append(f"{len(overflow)} float16 tensor(s) exceed ±65504 on the check's inputs (largest: '{worst}', "
                     f"|v| = {largest:.3g}): proven on onnxruntime CPU, which computes them in float32, but a float16 "
                     f"runtime (CUDA, TensorRT) gives inf there")
    return proofs, backend.save(converted, path, options.external_data, notes)
