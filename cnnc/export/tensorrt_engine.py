"""`tensorrt` export: a serialized TensorRT engine (`.engine`), built and proven on the local GPU.

Needs a CUDA device (asked of torch) and the `tensorrt` package (`pip install 'cnnc[tensorrt]'`); without either
the export is refused (UsageError, exit 2) before any work. The build: TensorRT's OnnxParser reads the model, the
builder config gets an optimisation profile for every input with symbolic dims (min batch 1, opt and max the
largest of `batches`), FP16 with `fp16` (else TF32 is cleared: TensorRT enables it by default on Ampere and
later, and its 10-bit mantissa would make an fp32 engine an fp16-precision one). The proof deserializes the very
bytes to be written, runs the engine on torch CUDA buffers against the reference on onnxruntime's CPU provider
(`check_runner`; float16's tolerance with `fp16`), and only then writes the file atomically. An engine runs only on
the GPU model and TensorRT version it was built with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from cnnc.errors import ModelError, UsageError
from cnnc.export.proof import require_proven
from cnnc.export.staging import move_in, staging_folder
from cnnc.runtime.equivalence import CandidateRunner, check_runner

INSTALL_HINT = "pip install 'cnnc[tensorrt]'"


def tensorrt_module():
    """The `tensorrt` package on a machine with a CUDA device, or a UsageError saying which is missing."""
    if not torch.cuda.is_available():
        raise UsageError("the tensorrt format needs a CUDA device; none is available here (torch.cuda)")
    try:
        import tensorrt  # optional: the tensorrt extra
    except ImportError:
        raise UsageError(f"the tensorrt format needs TensorRT: {INSTALL_HINT}") from None
    return tensorrt


def build_engine(trt, model: onnx.ModelProto, batches: list[int], fp16: bool) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only mode of TensorRT >= 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse the model: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    largest = max(batches)
    profile = builder.create_optimization_profile()
    dynamic = False
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = list(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise UsageError(f"input '{tensor.name}' has symbolic dims besides the batch: TensorRT needs them fixed")
        if shape and shape[0] < 0:
            dynamic = True
            profile.set_shape(tensor.name, [1, *shape[1:]], [largest, *shape[1:]], [largest, *shape[1:]])
    if dynamic:
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError("TensorRT could not build an engine for the model (see its log above)")
    return bytes(serialized)


def engine_candidate(trt, engine_bytes: bytes, output_names: list[str]) -> CandidateRunner:
    """The engine as `check_runner`'s candidate: inputs and outputs in torch CUDA tensors, one stream."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise ModelError("TensorRT cannot deserialize the engine it built")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    input_types = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in inputs}

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        buffers = {}
        for name in inputs:
            buffers[name] = torch.from_numpy(np.ascontiguousarray(feed[name])).cuda()
            context.set_input_shape(name, tuple(buffers[name].shape))
            context.set_tensor_address(name, buffers[name].data_ptr())
        for name in output_names:
            dtype = torch.from_numpy(np.empty(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            context.set_tensor_address(name, buffers[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise ModelError("TensorRT failed to run the engine")
        stream.synchronize()
        return [buffers[name].cpu().numpy() for name in output_names]
    output_types = [np.dtype(trt.nptype(engine.get_tensor_dtype(n))).name for n in output_names]
    return CandidateRunner(run=run, output_names=output_names, input_types=input_types, output_types=output_types)


def export_tensorrt(model: onnx.ModelProto, reference: onnx.ModelProto, path: Path, check: dict, options,
                    notes: list[str]) -> tuple[dict, list[Path]]:
    trt = tensorrt_module()
    engine_bytes = build_engine(trt, model, list(options.batches or [1]), options.tensorrt_fp16)
    candidate = engine_candidate(trt, engine_bytes, [o.name for o in model.graph.output])
    proofs = {"TensorRT": check_runner(reference, candidate, compute_dtype="float16" if options.tensorrt_fp16
                                       else None, **check)}
    require_proven("tensorrt", proofs)
    with staging_folder(path.parent if str(path.parent) else Path("."), notes) as staging:
        staged = staging / path.name
        staged.write_bytes(engine_bytes)
        move_in(staged, path)
    return proofs, [path]
