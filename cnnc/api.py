"""The Python API: `cnnc.compile(...)` for CI pipelines, and `cnnc.verify(...)`.

    result = cnnc.compile("model.onnx", passes=["fold-bn"])          # or an nn.Module with example_input=
    result.report["equivalence"]["passed"]                             # proven on seeded inputs
    result.save("model.cnnc.onnx")                                     # atomic write

Failures raise `cnnc.ModelError` (bad input), `cnnc.UsageError` (bad options) or `cnnc.EquivalenceError`.
"""

from __future__ import annotations

import gc
import hashlib
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from cnnc import ir
from cnnc.autotune import AutoSettings, autotune, resolve_device, with_provider
from cnnc.errors import EquivalenceError, ModelError, UsageError
from cnnc.export import ExportOptions, ExportResult, export_model
from cnnc.io import backend
from cnnc.io.external_data import external_data_files
from cnnc.io.frontend import load_model
from cnnc.io.precision import to_fp16
from cnnc.io.target import runnable, stamp_notes
from cnnc.ir.stats import model_stats
from cnnc.ir.weightless import releasable_values, tensor_nbytes, valueless_copy
from cnnc.passes import DEFAULT_PIPELINE, ORDER_CONSTRAINTS, parse_pipeline
from cnnc.pipeline.collector import LARGE_GRAPH_NODES, deferred_full_collections
from cnnc.pipeline.contract import Pass
from cnnc.pipeline.manager import MAX_NODES, PipelineReport, VerifyHook, check_model, check_node_limit, run_pipeline
from cnnc.runtime.equivalence import check_equivalence
from cnnc.runtime.identity import same_model, tensor_digests
from cnnc.runtime.inputs import make_input_batches
from cnnc.threads import session_threads, with_compile_threads

# The equivalence report of a compile that changed nothing (`cnnc.runtime.identity.same_model`): no run. The user's
# own inputs (`inputs=`) are always run: they were asked for.
UNCHANGED = {"passed": True, "unchanged": True, "feeds": 0, "outputs": [],
             "summary": "unchanged: the compiled graph is the input graph (same nodes and initializers)"}
# ru_maxrss is in KiB on Linux, in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024
PRECISIONS = ("fp32", "fp16")  # what `compile(precision=...)` and `cnnc compile --precision` accept


@dataclass(frozen=True)
class SourceFile:
    """An ONNX file a compile reads, with the external-data files it references (resolved as its loader resolves
    them, `cnnc.io.external_data`), and the identity of each when it was first stat'ed: device, inode, size, mtime
    and ctime (a rewrite sets ctime, which no user-space call can set back, unlike mtime: `cp -p`, `touch -r`)."""

    path: str
    data_files: tuple[str, ...]
    identity: tuple

    def current(self) -> tuple | None:
        """The identity of the files now; None if one of them is gone."""
        return _identity((self.path, *self.data_files))


@dataclass(frozen=True)
class ReleasedOriginal:
    """An input file whose weights a compile let go of once the compiled model was emitted (peak memory): the file
    (`SourceFile`), the digests of its large weights and the SHA-256 of the rest (`valueless_copy`) as read then."""

    source: SourceFile
    digests: dict[str, tuple]
    rest: bytes

    @property
    def path(self) -> str:
        return self.source.path

    def reload(self) -> onnx.ModelProto:
        """The original read again, as the compile read it; ModelError if the file is not the one compiled."""
        now = self.source.current()
        if now is None:
            raise ModelError(f"the input file {self.path} (or its external data) was moved or deleted after the "
                             "compile, and the original model was not kept in memory; compile from a ModelProto "
                             "(cnnc.compile(onnx.load(path))) to keep the original in memory")
        # The content decides: a touch, chmod or new hard link changes the stat of a byte-identical file.
        touched = now != self.source.identity
        model = runnable(load_model(self.path))
        rest, large = valueless_copy(model)
        if large != set(self.digests) or _proto_digest(rest) != self.rest or \
                tensor_digests(model, large) != self.digests:
            if touched:
                raise ModelError(f"{self.path} changed after it was compiled; the original model is no longer "
                                 "available")
            raise ModelError(f"{self.path} holds another model than the one compiled; the original model is no "
                             "longer available")
        return model


@dataclass
class CompileResult:
    model: onnx.ModelProto
    report: dict = field(default_factory=dict)
    _original: onnx.ModelProto | None = field(default=None, repr=False)
    _released: ReleasedOriginal | None = field(default=None, repr=False)

    @property
    def original(self) -> onnx.ModelProto | None:
        """The input as cnnc read it (the torch export for a module). A compile from an .onnx file lets go of its
        large weights before the check (`report["peak_rss"]`); it is read again from that file on first use (and
        by `export`), which must then be unchanged: after the file (or its external data) is moved, deleted or
        rewritten, `original` and `export` raise ModelError. Compile from a ModelProto to keep it in memory."""
        if self._released is not None:
            self._original, self._released = self._released.reload(), None
        return self._original

    def save(self, path: str | Path, external_data: bool | None = None) -> list[Path]:
        """Write the compiled model atomically; `external_data=None` uses external data above 2 GB only."""
        if self._released is not None and Path(path).resolve() == Path(self._released.path).resolve():
            _ = self.original  # the input file is about to be replaced: read the original from it first
        written = backend.save(self.model, path, external_data=external_data,
                               notes=self.report.setdefault("notes", []))
        self.report["written"] = [str(p) for p in written]
        return written

    def export(self, format: str, path: str | Path, options: ExportOptions | None = None,
               check: dict | None = None) -> ExportResult:
        """Export the compiled model as `format` (`cnnc.export.FORMATS`) to `path`, proven on that format's runtime
        against the original the compile started from (seeded inputs, per-dtype tolerance; `check`: n, seed, rtol,
        atol, input_shapes, user_inputs); nothing is written when the proof fails (EquivalenceError)."""
        check = dict(check or {})
        if self.report.get("precision", {}).get("precision") == "fp16":
            if format == "onnx-fp16":
                raise UsageError("the model was compiled with --precision fp16 already: export it as 'onnx' (or "
                                 "compile in fp32 and export as 'onnx-fp16')")
            # Its weights are float16: proven against the float32 original at float16's tolerance, as compile was.
            check.setdefault("compute_dtype", "float16")
        result = export_model(self.model, format, path, options,
                              reference=self.original if self.original is not None else self.model, check=check)
        self.report.setdefault("exports", []).append(result.report)
        return result


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (getrusage's high-water mark; it never goes down)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT


def _identity(paths: tuple[str, ...]) -> tuple | None:
    try:
        return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for s in map(os.stat, paths))
    except OSError:
        return None


def _mentions(path: str | Path, needle: bytes, chunk: int = 1 << 20) -> bool:
    """Whether the bytes of the file at `path` contain `needle`, read a chunk at a time."""
    with open(path, "rb") as handle:
        tail = b""
        while block := handle.read(chunk):
            if needle in tail + block:
                return True
            tail = block[1 - len(needle):]
    return False


def _file_state(source: Any) -> SourceFile | None:
    """The `SourceFile` of an ONNX file, before it is loaded, for `_reference_path`; None for anything else."""
    if not isinstance(source, (str, Path)) or Path(source).suffix.lower() != ".onnx":
        return None
    try:
        data_files: tuple[str, ...] = ()
        if _mentions(source, b"location"):  # the key of every external-data entry; otherwise there are none
            model = onnx.load(str(source), load_external_data=False)
            data_files = tuple(sorted(str(p) for p in external_data_files(model, Path(source).parent)))
            del model
    except Exception:  # noqa: BLE001 - unreadable or invalid: load_model says what is wrong with the path
        return None
    identity = _identity((str(source), *data_files))
    return SourceFile(str(source), data_files, identity) if identity is not None else None


def _reference_path(state: SourceFile | None, loaded: onnx.ModelProto, original: onnx.ModelProto) -> str | None:
    """The file the original was read from, for onnxruntime to read it itself (no serialized copy of the weights),
    when `original` is that file as read (not stamped) and the file and its external data are still as they were
    before it was read."""
    if state is None or original is not loaded:
        return None
    return state.path if state.current() == state.identity else None


def _check_reference_read(state: SourceFile | None, reference_path: str | None) -> None:
    """After a check that read the reference from `reference_path`: ModelError if the file or its external data
    changed since they were first stat'ed (the check may have run against other weights)."""
    if reference_path is not None and state.current() != state.identity:
        raise ModelError(f"{state.path} (or its external data) changed while it was being compiled; the check read "
                         "the original from it and proves nothing: compile it again once it is no longer written")


def _proto_digest(model: onnx.ModelProto) -> bytes:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).digest()


def _releasable_digests(state: SourceFile | None, loaded: onnx.ModelProto,
                        original: onnx.ModelProto) -> dict[str, tuple] | None:
    """The digests of the large weights of an original that onnxruntime can read from its file (`_reference_path`),
    taken now for the identity proof and a later reload, so that its weights can go once the compiled model is
    emitted; None when the original stays whole (not read from a file, or a stamped copy)."""
    if _reference_path(state, loaded, original) is None:
        return None
    large = releasable_values(original)
    return tensor_digests(original, large) if large else None


def _equivalence(reference: onnx.ModelProto, candidate: onnx.ModelProto, check: dict,
                 reference_path: str | None = None) -> dict:
    report = check_equivalence(reference, candidate, **check, reference_path=reference_path)
    return {**report.as_dict(), "summary": report.summary()}


def _build(original: onnx.ModelProto, pipeline: list[Pass], verify: VerifyHook | None = None,
           strict: bool = False, rss: dict | None = None) -> tuple[onnx.ModelProto, PipelineReport]:
    """Run `pipeline` on a fresh graph of `original`; the emitted (checked) model and what the passes did. `rss`
    gets the peak resident bytes after the passes and after the emit."""
    try:
        graph = ir.import_model(original)  # inputs with a default stay inputs
    except Exception as error:  # noqa: BLE001 - graphsurgeon raises assorted types on malformed graphs
        raise ModelError(f"cannot import the model into the IR: {error}") from None
    unread = ir.unread_constants(graph)
    graph, pipeline_report = run_pipeline(graph, pipeline, verify=verify, strict=strict, constraints=ORDER_CONSTRAINTS)
    if rss is not None:
        rss["passes"] = peak_rss_bytes()
    ir.forget_loaded_values(graph, unread)  # export then reuses the original tensors: no copy of what passes read
    compiled = backend.to_model(graph, template=original, release=True)  # the graph is dropped below
    # The arrays of the weights that passes made are in `compiled` now; the graph holding them too lives in
    # graphsurgeon's reference cycles until the collector runs, which is worth its 0.1 s for big weights, and for a
    # large graph (whose full collections were deferred): once here (~0.8 s at 100k nodes), not repeatedly during
    # the report's statistics after the deferral ends.
    del graph
    if len(original.graph.node) > LARGE_GRAPH_NODES or \
            sum(tensor_nbytes(t) for t in compiled.graph.initializer) >= ir.GC_AFTER_BYTES:
        gc.collect()
    check_model(compiled, pipeline_report)
    if rss is not None:
        rss["emit"] = peak_rss_bytes()
    return compiled, pipeline_report


@with_compile_threads  # torch and onnxruntime: one thread per physical core, restored after
def compile(model: Any, passes: str | list | None = None, example_input: Any = None, *, check: bool = True,
            check_n: int = 2, seed: int = 0, rtol: float | None = None, atol: float | None = None,
            input_shapes=None, inputs=None, verify_each: bool = False, state_dict: str | Path | None = None,
            strict: bool = False, auto: bool | AutoSettings = False, provider: str = "auto",
            batches: tuple[int, ...] | list[int] = (1,), precision: str = "fp32",
            keep_io_types: bool = True, max_nodes: int | None = MAX_NODES) -> CompileResult:
    """Compile `model` (ONNX path, ModelProto or nn.Module) with `passes` (default: `DEFAULT_PIPELINE`).

    With `check` (the default) the result is proven equivalent to the original on seeded inputs (ARCHITECTURE.md) and
    `EquivalenceError` is raised otherwise; `verify_each` checks after every pass and names the pass that broke it.
    `provider` (auto, cpu, cuda; auto: CUDA when present) is what the cost model estimates for. With `auto` (True or
    `AutoSettings`), the rewrites the cost model calls close are timed on that provider at `batches` and kept only
    when they pay (faster with confidence over 5 sessions per model, by 1 % at least); the compiled model, else the
    simplified graph, is emitted only when it pays against the input, else the input unchanged (`cnnc.autotune`;
    `report["auto"]`).
    `precision="fp16"` converts the result to float16 after the passes (`cnnc.io.precision.to_fp16`; float32 inputs
    and outputs with `keep_io_types`) and checks it against the float32 original at float16's tolerance.
    A model above `max_nodes` nodes (default `cnnc.pipeline.manager.MAX_NODES`, about where a compile of a graph
    that no pass rewrites reaches 30 s, the check apart; None or 0: no limit) is refused with UsageError.
    """
    started, start_rss = time.perf_counter(), peak_rss_bytes()
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    device = resolve_device(provider)
    batches = list(batches)
    if not batches or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in batches):
        raise UsageError(f"batch sizes must be positive integers, got {batches!r}")
    source_state = _file_state(model) if state_dict is None else None
    loaded = load_model(model, example_input, state_dict=state_dict)
    original = runnable(loaded)
    check_node_limit(len(original.graph.node), max_nodes)  # before the import: refused in a second, not minutes
    rss = {"start": start_rss, "load": peak_rss_bytes()}  # high-water marks after each stage (report["peak_rss"])
    digests = _releasable_digests(source_state, loaded, original)
    pipeline: list[Pass] = with_provider(parse_pipeline(passes if passes is not None else DEFAULT_PIPELINE), device)
    check_options = {"n": check_n, "seed": seed, "rtol": rtol, "atol": atol, "input_shapes": input_shapes,
                     "user_inputs": inputs}
    per_pass: dict[str, dict] = {}

    def verify_after(pass_: Pass, graph: gs.Graph) -> None:
        candidate = backend.to_model(graph.copy(), template=original)
        try:
            result = _equivalence(original, candidate, check_options)
        except EquivalenceError as error:  # other output names or shapes, or a candidate that fails to run
            raise EquivalenceError(f"pass {pass_.spec()} broke equivalence: {error}",
                                   {"failed_pass": pass_.spec()}) from None
        per_pass[pass_.spec()] = result
        if not result["passed"]:
            raise EquivalenceError(f"pass {pass_.spec()} broke equivalence: {result['summary']}",
                                   {"equivalence": result, "failed_pass": pass_.spec()})

    with deferred_full_collections(len(original.graph.node)):  # ~25 % of a 100k-node compile, freeing nothing
        compiled, pipeline_report = _build(original, pipeline, verify_after if verify_each else None, strict, rss)
    auto_report = None
    if auto:
        outcome = autotune(original, pipeline, compiled, pipeline_report,
                           lambda variant: _build(original, variant, strict=strict), device=device, batches=batches,
                           settings=auto if isinstance(auto, AutoSettings) else AutoSettings(seed=seed),
                           input_shapes=input_shapes)
        compiled, pipeline_report, auto_report = outcome.model, outcome.pipeline_report, outcome.report
    precision_notes: list[str] = []
    if precision == "fp16":  # deployment: after the exact passes, so that they fold and collapse in float64 first
        compiled = to_fp16(compiled, keep_io_types=keep_io_types, notes=precision_notes)
        precision_notes.append("converted to float16 after the passes (" + ("float32 inputs and outputs kept"
                               if keep_io_types else "float16 inputs and outputs") + ")" + ("; checked against the "
                               "float32 original at float16's tolerance" if check else ""))
        check_options["compute_dtype"] = "float16"  # the check below: against the float32 original, fp16 tolerance
    # Full collections during the statistics' protobuf reads would free nothing (`_build` collected the graph).
    with deferred_full_collections(len(original.graph.node)):
        before, after = model_stats(original), model_stats(compiled)
    report: dict = {
        "passes": pipeline_report.as_dict(),
        "housekeeping": pipeline_report.housekeeping_as_dict(),  # canonicalize, tidy, refresh-shapes, check-model
        "order_notes": pipeline_report.order_notes,  # constraints of cnnc.passes.ORDER_CONSTRAINTS the order breaks
        "canonicalize_seconds": round(pipeline_report.canonicalize_seconds, 6),
        "before": before,
        "after": after,
        "notes": stamp_notes(loaded) + precision_notes,  # what cnnc changed about the input's versions (and save's)
        "precision": {"precision": precision, "keep_io_types": keep_io_types if precision != "fp32" else None},
    }
    if auto_report is not None:
        report["auto"] = auto_report
    if verify_each:
        report["equivalence_per_pass"] = per_pass
    reference_path = _reference_path(source_state, loaded, original)
    released = None
    if digests is not None and reference_path is not None:
        # The original's weights are read from its file from here on (onnxruntime opens it by path; `same_model`
        # compares the digests taken at load): let go of them, so that the check and the save hold the compiled
        # model's weights and one session's or tensor's, and `result.original` reads the file again if asked.
        original, _ = valueless_copy(original)
        # An absolute path: `result.original` reads it again whatever the working folder is then.
        source = SourceFile(os.path.abspath(source_state.path), source_state.data_files, source_state.identity)
        released = ReleasedOriginal(source, digests, _proto_digest(original))
        loaded = original
        gc.collect()  # graphsurgeon's reference cycles may still reach the parsed model
    # Nothing changed: the proof, with no run.
    if check and inputs is None and same_model(original, compiled, digests if released else None):
        if input_shapes:
            make_input_batches(original, n=1, input_shapes=input_shapes)  # still refuse shapes that do not fit
        report["equivalence"] = dict(UNCHANGED)
    elif check:
        try:
            report["equivalence"] = _equivalence(original, compiled, check_options, reference_path)
        except Exception:  # any failure (onnxruntime's NoSuchFile too): a rewritten file explains it; re-raised
            _check_reference_read(source_state, reference_path)
            raise
        _check_reference_read(source_state, reference_path)
        if not report["equivalence"]["passed"]:
            clamped = "".join(f"; {note}" for note in precision_notes if "clamped" in note)  # --precision fp16
            raise EquivalenceError(f"compiled model is not equivalent: {report['equivalence']['summary']}{clamped}",
                                   report)
    else:
        report["equivalence"] = None
    rss["check"] = peak_rss_bytes()
    report["peak_rss_bytes"] = rss["check"]  # the process's, since it started (ru_maxrss)
    report["peak_rss"] = rss  # bytes, high-water mark at compile start and after load, passes, emit and check
    report["threads"] = session_threads()  # cnnc.threads: physical cores, or CNNC_THREADS
    report["seconds"] = round(time.perf_counter() - started, 3)
    return CompileResult(compiled, report, None if released else original, released)


def verify(a: Any, b: Any, *, check_n: int = 2, seed: int = 0, rtol: float | None = None,
           atol: float | None = None, input_shapes=None, inputs=None) -> dict:
    """Equivalence of two models (paths or ModelProtos); returns the report, raises EquivalenceError on mismatch."""
    reference, candidate = runnable(load_model(a)), runnable(load_model(b))
    # Two models the user chose: their output types may differ (fp32 against its fp16 conversion), each output then
    # judged at the looser dtype's tolerance.
    result = _equivalence(reference, candidate, {"n": check_n, "seed": seed, "rtol": rtol, "atol": atol,
                                                 "input_shapes": input_shapes, "user_inputs": inputs,
                                                 "dtype_change": True})
    if not result["passed"]:
        raise EquivalenceError(f"models are not equivalent: {result['summary']}", {"equivalence": result})
    return result
