"""graphsurgeon's log, routed: its logger prints warnings on stdout ("Inference failed...", "Model does not contain
ONNX domain opset information!", one about the optional `colored` package); cnnc sends them to the `cnnc.ir` logger
at debug level instead. A library's warnings are cnnc's to route, not to print."""

from __future__ import annotations

import contextlib
import io
import logging

import onnx_graphsurgeon as gs

LOG = logging.getLogger("cnnc.ir")


@contextlib.contextmanager
def routed_graphsurgeon_log():
    """graphsurgeon's logger prints its warnings ("Inference failed...", a missing `colored` module) on stdout: while
    it runs, they go to the `cnnc.ir` logger at debug level instead; a library's warnings are cnnc's to route."""
    gs.logger.G_LOGGER.colors = False  # else every first warning adds one about the optional `colored` package
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            LOG.debug("graphsurgeon: %s", line)
