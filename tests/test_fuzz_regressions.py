"""Failures the differential fuzzer (tests/test_fuzz.py, bench/fuzz.py) found, each kept as a plain test.

The long profile of 2026-11-21 found no mismatch and no crash in the passes. What the generator ran into while it
was being written is below; each test names what happens now.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import cnnc
from cnnc.errors import ModelError
from fuzz_graphs import pool_out, run_on_onnxruntime


def test_ceil_mode_pool_where_onnx_and_onnxruntime_disagree_is_refused_cleanly():
    """A ceil_mode window that would start in the end padding: onnxruntime (like PyTorch) drops it, onnx's shape
    inference keeps it. A model declaring onnxruntime's shapes fails the full checker that every emitted model goes
    through, so cnnc refuses it with a ModelError (exit 2) instead of writing it; the generator avoids this geometry.
    """
    assert pool_out(13, 3, 2, 1, 2, 1, True) == 7 != pool_out(13, 3, 2, 1, 2, 1, True, drop_last=False) == 8
    pool = oh.make_node("AveragePool", ["x"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 2, 2],
                        ceil_mode=1)
    graph = oh.make_graph([pool, oh.make_node("Relu", ["p"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 13, 13])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1, 7, 7])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    assert run_on_onnxruntime(model, {"x": np.ones((1, 1, 13, 13), np.float32)})[0].shape == (1, 1, 7, 7)
    with pytest.raises(ModelError, match="fails the ONNX checker"):
        cnnc.compile(model, passes=[], strict=True)
