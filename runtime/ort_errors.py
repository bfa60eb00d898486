"""onnxruntime's error messages as one short sentence: the op and the first meaningful clause, no C++ signatures.

onnxruntime wraps a kernel's failure as "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while
running Reshape node. Name:'' Status Message: /onnxruntime_src/.../reshape_helper.h:91 onnxruntime::ReshapeHelper::
ReshapeHelper(const onnxruntime::TensorShape&, ...) input_shape_size == requested_shape_size was false. The input
tensor cannot be reshaped to the requested shape. Input shape:{2,3,4}, requested shape:{1,2}", nested once per
If/Loop around the node, and some messages continue on the next lines ("'Cubic' mode only supports:\n * 2-D
inputs or ..."). `ort_reason` gives "Reshape: The input tensor cannot be reshaped to the requested shape. Input
shape:{2,3,4}, requested shape:{1,2}".
"""

from __future__ import annotations

import re

MAX_CHARS = 240
_RUNNING = re.compile(r"while running (\w+) node")
_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_SOURCE = re.compile(r"/?(?:[\w.-]+/)*[\w.-]+\.(?:h|cc|cpp|hpp):\d+\s+")  # the source file and line
# [return type] onnxruntime::Class::method(args) [const], right after the source location
_SIGNATURE = re.compile(r"^(?:[\w:<>*&]+\s+)?(?:[\w~]+::)+[\w~<>]+\([^()]*\)\s*(?:const\s*)?")
_ASSERTION = re.compile(r"^.*? was false\.\s*(?=\S)")  # "expr was false. The reason" -> "The reason"


def ort_reason(error: BaseException | str) -> str:
    """The op that failed and onnxruntime's reason, on one line of at most MAX_CHARS characters."""
    text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    ops = _RUNNING.findall(text)
    if "Status Message:" in text:
        text = text.rsplit("Status Message:", 1)[1]
    text = _PREFIX.sub("", text.strip())
    located = _SOURCE.search(text)
    if located:
        text = _SIGNATURE.sub("", text[located.end():]).strip()
    text = _ASSERTION.sub("", text).strip() or text
    text = text.rstrip(" .:")
    if ops:
        text = f"{ops[-1]}: {text}"
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS - 1].rsplit(" ", 1)[0] + "…"
    return text or type(error).__name__
