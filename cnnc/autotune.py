"""`--auto`: keep a rewrite only when it is measured to pay; emit the input unchanged when nothing does.

The default pipeline is conservative: the passes that consult the cost model (`cnnc.cost`) apply only the rewrites
it says pay, and record the ones it calls *close* as `Candidate`s (`cnnc.pipeline.contract`). Auto decides those by
measurement, on the chosen provider and at the user's batch sizes:

A rewrite *pays* when, at every batch size, the upper end of the 95 % interval of its latency ratio
(`cnnc.runtime.stats.ratio_to_first`) is below 1 and the ratio is at most 1 - `min_gain` (1 %). Each model is timed
on `sessions` onnxruntime sessions (5) that take turns round by round, and the interval is Student's t over the
session slots' ratios: two sessions of one model differ by about 1 %, an offset a single session's rounds cannot
see, which made a graph that onnxruntime runs exactly like the input look "faster with confidence" now and then.
Five slots, not three: in the zoo run one session pair of RepVGG-A0 measured 0.96 where the other two measured
0.88, and t(0.975, 2) = 4.3 then put a 12 % gain's interval above 1; t(0.975, 4) is 2.8.

Looks (sequential extension). One timing of 1 s over 5 slots gives wide intervals: in the zoo run ShuffleNetV2 fp16
compiled was 1.28x faster at batch 1 and about 1.07x at batch 8, and the input was emitted because batch 8's
interval reached 1. So a comparison that does not pay yet, but whose ratio is <= 1 - `min_gain` at every batch (the
point estimate says it pays, only the interval is too wide), is timed again on new sessions (a *look*; look L
shuffles its rounds with seed + L) and pooled: each look's slots are new slots (ids offset by `sessions` * L), so
the interval is Student's t over `sessions` * looks slots, with more degrees of freedom and a smaller standard
error. It stops when the comparison pays, when a point estimate no longer points to a gain, after `max_extra_looks`
(2) more looks, or when another look would not fit the budget (the report says so). This is optional stopping:
three chances raise the false "pays" rate of a model that is not faster. min_gain on the ratio, the every-batch
rule and extending only what already points to a gain keep it low. On the fake clock of tests/test_auto.py (equal
latencies, 1 % log-normal session offsets, 3 % per-call noise, 1000 seeds), a model that is not faster was emitted
3.5 % of the time at one batch size with up to three looks (2.0 % with one look), and never at two batch sizes
(5.7 % of those runs took more looks); the test checks the rate on 200 seeds.

1. Greedy search. The close candidates, most promising first (the cost model's estimated after/before time, where it
   gives one), at most `max_candidates` of them: each is applied on top of the current best (the pipeline is rebuilt
   from the original with the pass's `apply_close` naming the candidates kept so far plus this one) and timed
   interleaved against the current best, in looks as above. It is kept when it pays.
2. Only measured gains (issue 13: "it keeps only what is faster with confidence"). The best compiled model is timed
   in one interleaved comparison against the input and the simplified graph (the pipeline's `simplify` passes
   alone, when it has any), in looks while a better choice than the current one points to a gain. The compiled model
   is emitted when it pays against the input and is not slower with confidence than the simplified graph; else the
   simplified graph when it pays against the input; else the input itself, unchanged: a graph onnxruntime runs no
   faster than the input is not worth a rewrite to the user who asked for `--auto` (the default pipeline, without
   `--auto`, still emits its simplification). Whatever is emitted is then proven equivalent to the original by the
   API, as always. `report["final_looks"]` counts the final comparison's looks and `report["final_stop"]` says why
   they stopped (each decision has its own `looks` and `stop`); every ratio keeps its `slots`.

Bounds: each look runs `duration_s` seconds per batch size (after a warm-up); the greedy search (its looks
included) stops when the total wall time `budget_s` (model builds included) would leave no room for the final
comparison, and every candidate not timed is recorded with why. The final comparison's first look always runs; a
further look runs only when, at the first look's pace, it ends before `budget_s` plus the final comparison's reserve.
Timer and session factory are injectable (as in `cnnc.runtime.bench`), so tests decide latencies deterministically.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx

from cnnc.errors import UsageError
from cnnc.pipeline.contract import Pass
from cnnc.pipeline.manager import PipelineReport
from cnnc.runtime.bench import DEFAULT_WARMUP, SessionFactory, Timer, create_slot, interleave, prepare, session_slots
from cnnc.runtime.session import cuda_available, first_line, make_session
from cnnc.runtime.stats import ratio_to_first

# Rebuild the model from the original with these passes: (model, what the passes did).
Build = Callable[[list[Pass]], tuple[onnx.ModelProto, PipelineReport]]
SIMPLIFY = "simplify"  # the name of the pipeline's simplification pass: the "simplified graph" baseline
MIN_ROUNDS_PER_SESSION = 3  # timed rounds per session slot at least, in every comparison
# {batch: (seconds per call of each model, in round order; the session slot of each round)}: one or more looks
Samples = dict[str, tuple[list[list[float]], list[int]]]


@dataclass(frozen=True)
class AutoSettings:
    """How long and how much auto measures. `duration_s`: timed seconds per comparison and batch size; `budget_s`:
    total wall time of the search, builds included (the final comparison always runs); `max_candidates`: close
    candidates tried at most; `warmup`: untimed rounds per comparison (None: the bench default per device);
    `sessions` per model, taking turns (their offsets enter the interval); `min_gain`: the least median gain that
    pays; `max_extra_looks`: timings on new sessions after the first one, while a comparison points to a gain but
    does not pay yet (module docstring)."""

    duration_s: float = 1.0
    budget_s: float = 60.0
    max_candidates: int = 8
    warmup: int | None = None
    sessions: int = 5
    min_gain: float = 0.01
    max_extra_looks: int = 2
    threads: int | None = None
    seed: int = 0
    timer: Timer = time.perf_counter
    session_factory: SessionFactory = make_session

    def __post_init__(self):
        if not self.duration_s > 0 or not self.budget_s > 0 or self.max_candidates < 0:
            raise UsageError(f"auto: duration ({self.duration_s}) and budget ({self.budget_s}) must be > 0 s and "
                             f"max_candidates ({self.max_candidates}) >= 0")
        if self.sessions < 1 or not 0 <= self.min_gain < 1:
            raise UsageError(f"auto: sessions ({self.sessions}) must be >= 1 and min_gain ({self.min_gain}) in "
                             f"[0, 1)")
        if self.max_extra_looks < 0:
            raise UsageError(f"auto: max_extra_looks ({self.max_extra_looks}) must be >= 0")


@dataclass
class AutoOutcome:
    """What auto emits: `model` (the best compiled model, the simplified graph or the input), the pipeline report of
    the best compiled model, and `report` (JSON-able: every decision with its ratios)."""

    model: onnx.ModelProto
    pipeline_report: PipelineReport
    report: dict


def resolve_device(provider: str) -> str:
    """"cpu" or "cuda" for a provider option ("auto": CUDA when onnxruntime can run it)."""
    if provider not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown provider {provider!r}; use auto, cuda or cpu")
    if provider == "cuda" and not cuda_available():
        raise UsageError("--provider cuda: no CUDA device or CUDA provider available")
    return "cuda" if provider == "cuda" or (provider == "auto" and cuda_available()) else "cpu"


def with_provider(pipeline: Sequence[Pass], device: str) -> list[Pass]:
    """The cost-model passes (those with a `provider` field) set to estimate for `device`, unless the user's spec
    already chose another provider than the field's default."""
    result = []
    for pass_ in pipeline:
        field = next((f for f in dataclasses.fields(pass_) if f.name == "provider"), None)
        if field is not None and pass_.provider == field.default != device:
            pass_ = dataclasses.replace(pass_, provider=device)
        result.append(pass_)
    return result


def _promise(candidate: dict) -> float:
    """The cost model's estimated time after / before for a candidate (smaller: more promising); inf when the
    estimate gives no time pair, so that those keep the pass's own order after the ones that do."""
    estimate = candidate.get("estimate") or {}
    for key, before in estimate.items():
        partner = key.replace("before", "after")
        after = estimate.get(partner)
        if partner != key and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (before, after)) \
                and before > 0:
            return after / before
    return math.inf


def close_candidates(records: list[dict]) -> list[dict]:
    """The close candidates the passes left unapplied, most promising first: {pass index, pass, id, where, ...}."""
    found = [{"index": index, "pass": record["pass"], **candidate}
             for index, record in enumerate(records) for candidate in record.get("candidates", ())
             if candidate["verdict"] == "close" and not candidate["applied"]]
    return sorted(found, key=_promise)  # stable: equal promise keeps the pipeline's order


def variant(pipeline: Sequence[Pass], chosen: dict[int, set[str]]) -> list[Pass]:
    """`pipeline` with the pass at each index of `chosen` also applying those close candidates (`apply_close`)."""
    result = []
    for index, pass_ in enumerate(pipeline):
        ids = chosen.get(index)
        if ids and pass_.apply_close != "all":
            merged = set(filter(None, pass_.apply_close.split("+"))) | ids
            pass_ = dataclasses.replace(pass_, apply_close="+".join(sorted(merged)))
        result.append(pass_)
    return result


def _applied(report: PipelineReport, index: int, candidate_id: str) -> bool:
    return any(c.id == candidate_id and c.applied for c in report.records[index].result.candidates)


class _Measure:
    """Interleaved timing of several models at every batch size on one device, in looks (module docstring)."""

    def __init__(self, settings: AutoSettings, device: str, batches: Sequence[int], input_shapes):
        self.settings, self.device, self.batches, self.input_shapes = settings, device, list(batches), input_shapes
        self.warmup = DEFAULT_WARMUP[device] if settings.warmup is None else settings.warmup

    def samples(self, models: Sequence[onnx.ModelProto], labels: Sequence[str], look: int = 0) -> Samples:
        """One look: the models timed interleaved on new sessions, a random order per round seeded by the settings'
        seed + `look`, and the look's session slots numbered from `sessions` * `look` (new slots, to pool)."""
        s = self.settings
        result = {}
        for batch in self.batches:
            slots = [create_slot(lambda i, batch=batch: prepare(
                models[i], labels[i], provider=self.device, batch=batch, input_shapes=self.input_shapes,
                threads=s.threads, seed=s.seed, timer=s.timer, session_factory=s.session_factory), len(models), slot)
                for slot in range(s.sessions)]  # creation order rotated per slot (create_slot)
            runners = [[p.run for p in per_model] for per_model in zip(*slots)]
            # Each slot's ratio is a median of its rounds: two rounds a slot (interleave's least) let one
            # disturbed call swing a slot. Three rounds a slot at least, whatever the duration.
            times = interleave(runners, warmup=self.warmup, duration=s.duration_s, timer=s.timer, rewarm=1,
                               seed=s.seed + look, min_rounds=MIN_ROUNDS_PER_SESSION * s.sessions)
            result[str(batch)] = (times, [s.sessions * look + g for g in session_slots(len(times[0]), s.sessions)])
            del slots, runners  # free the sessions before the next batch size
        return result

    def looks(self, models: Sequence[onnx.ModelProto], labels: Sequence[str],
              extend: Callable[[Samples], str | None], deadline: float) -> tuple[Samples, int, str]:
        """(pooled samples, looks, why they stopped): a first look, then more while `extend(pooled)` gives a reason
        (None: decided), at most `max_extra_looks` more, each only when it ends before `deadline` (perf_counter
        time) at the first look's pace."""
        begin = time.perf_counter()
        pooled = self.samples(models, labels)
        pace, looks = time.perf_counter() - begin, 1
        while (why := extend(pooled)) is not None:
            if looks > self.settings.max_extra_looks:
                return pooled, looks, f"{why}; max_extra_looks ({self.settings.max_extra_looks}) reached"
            if time.perf_counter() + pace > deadline:
                return pooled, looks, f"{why}; not timed again: another look ({pace:.1f} s) would exceed the budget"
            more = self.samples(models, labels, looks)
            pooled = {batch: ([a + b for a, b in zip(times, more[batch][0])], slots + more[batch][1])
                      for batch, (times, slots) in pooled.items()}
            looks += 1
        return pooled, looks, "decided" if looks == 1 else f"decided after {looks} looks"

    def ratios(self, samples: Samples, reference: int, other: int) -> dict[str, dict]:
        """{batch: ratio of model `other` to model `reference`} (< 1: faster), with its 95 % interval over the
        session slots of every look."""
        return {batch: {**ratio_to_first(times[reference], times[other], self.settings.seed, groups=slots),
                        "rounds": len(times[other]), "median_ms": _median_ms(times[other]),
                        "reference_median_ms": _median_ms(times[reference])}
                for batch, (times, slots) in samples.items()}


def _median_ms(times: list[float]) -> float:
    ordered = sorted(times)
    middle = len(ordered) // 2
    return 1e3 * (ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2)


def slower_with_confidence(per_batch: dict[str, dict]) -> bool:
    """At some batch size, the 95 % interval of the ratio (other / reference) lies above 1."""
    return any(record["ci95"][0] > 1.0 + 1e-9 for record in per_batch.values())


def faster_with_confidence(per_batch: dict[str, dict]) -> bool:
    """At every batch size, the 95 % interval of the ratio (other / reference) lies below 1."""
    return bool(per_batch) and all(record["ci95"][1] < 1.0 - 1e-9 for record in per_batch.values())  # not rounding


def pays(per_batch: dict[str, dict], min_gain: float) -> bool:
    """Faster with confidence, and by at least `min_gain` in the ratio itself, at every batch size."""
    return faster_with_confidence(per_batch) and all(
        record["ratio"] <= 1.0 - min_gain + 1e-12 for record in per_batch.values())


def points_to_gain(per_batch: dict[str, dict], min_gain: float) -> bool:
    """Does not pay yet, but its ratio is <= 1 - `min_gain` at every batch size: only the interval is too wide, and
    another look may decide it (module docstring)."""
    return not pays(per_batch, min_gain) and all(r["ratio"] <= 1.0 - min_gain + 1e-12 for r in per_batch.values())


def autotune(original: onnx.ModelProto, pipeline: Sequence[Pass], compiled: onnx.ModelProto,
             pipeline_report: PipelineReport, build: Build, *, device: str, batches: Sequence[int],
             settings: AutoSettings = AutoSettings(), input_shapes=None) -> AutoOutcome:
    """Decide the close candidates of `pipeline_report` by measurement and choose what to emit (module docstring).

    `compiled` / `pipeline_report`: the conservative pipeline's result; `build` rebuilds from the original."""
    started = time.perf_counter()
    measure = _Measure(settings, device, batches, input_shapes)
    # Reserved: the final comparison always runs. Each model's sessions are created and warmed up apart: about half
    # a timed duration each, measured on the zoo's 64 px networks.
    comparison_cost = settings.duration_s * len(measure.batches) * (1 + 0.5 * settings.sessions)
    final_cost = 1.5 * comparison_cost
    pipeline = list(pipeline)
    candidates = close_candidates(pipeline_report.as_dict())
    report: dict = {"device": device, "batches": list(measure.batches), "duration_s": settings.duration_s,
                    "budget_s": settings.budget_s, "max_candidates": settings.max_candidates,
                    "sessions": settings.sessions, "min_gain": settings.min_gain,
                    "max_extra_looks": settings.max_extra_looks,
                    "rule": (f"kept when, at every batch size, the 95 % interval of its latency ratio (Student's t over "
                             f"the session slots of every look) lies below 1 and the ratio is <= {1 - settings.min_gain:g}; timed "
                             f"again on new sessions (at most {settings.max_extra_looks} times, pooled) while only "
                             f"the interval stands in the way"),
                    "close_candidates": len(candidates), "decisions": [], "not_timed": []}
    best, best_report, chosen = compiled, pipeline_report, {}

    def extend(pooled: Samples) -> str | None:
        if points_to_gain(measure.ratios(pooled, 0, 1), settings.min_gain):
            return "its ratio points to a gain at every batch size but does not pay yet"
        return None

    for rank, candidate in enumerate(candidates):
        decision = {"pass": candidate["pass"], "id": candidate["id"], "where": candidate["where"],
                    "estimate": candidate.get("estimate", {})}
        elapsed = time.perf_counter() - started
        if rank >= settings.max_candidates:
            why = f"cap of {settings.max_candidates} candidates reached"
        elif elapsed + comparison_cost + final_cost > settings.budget_s:
            why = f"total budget of {settings.budget_s:g} s spent ({elapsed:.1f} s used)"
        elif "+" in candidate["id"]:
            why = "its id contains '+', the separator of apply_close"
        else:
            why = None
        if why:
            report["not_timed"].append({**decision, "why": why})
            continue
        trial = {**chosen, candidate["index"]: chosen.get(candidate["index"], set()) | {candidate["id"]}}
        try:
            model, trial_report = build(variant(pipeline, trial))
            if not _applied(trial_report, candidate["index"], candidate["id"]):
                report["not_timed"].append({**decision, "why": "the pass did not apply it on top of the rewrites "
                                                               "kept so far"})
                continue
            # More looks only within the budget that leaves the final comparison its reserve.
            samples, looks, stop = measure.looks([best, model], ["best so far", candidate["id"]], extend,
                                                 started + settings.budget_s - final_cost)
            ratios = measure.ratios(samples, 0, 1)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own hierarchy; a variant is never fatal
            report["not_timed"].append({**decision, "why": f"could not be built or run: {first_line(error)}"})
            continue
        kept = pays(ratios, settings.min_gain)
        report["decisions"].append({**decision, "decision": "kept" if kept else "dropped",
                                    "against": "best so far", "ratios": ratios, "looks": looks, "stop": stop})
        if kept:
            best, best_report, chosen = model, trial_report, trial
    report["kept"] = [d["id"] for d in report["decisions"] if d["decision"] == "kept"]
    # The final comparison may end past the budget by its reserve, never more.
    report["emitted"], model = _final(original, pipeline, best, build, measure, report,
                                      started + settings.budget_s + final_cost)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return AutoOutcome(model, best_report, report)


def _compare(measure: _Measure, samples: Samples, simplified: bool) -> dict[str, dict]:
    """The final comparison's ratios from samples of (input, [simplified,] compiled)."""
    final = {"compiled_vs_input": measure.ratios(samples, 0, 2 if simplified else 1)}
    if simplified:
        final["simplified_vs_input"] = measure.ratios(samples, 0, 1)
        final["compiled_vs_simplified"] = measure.ratios(samples, 1, 2)
    return final


def _choose(final: dict[str, dict], min_gain: float) -> tuple[str, str]:
    """(what to emit, why) from the final comparison (module docstring): "compiled", "simplified" or "input"."""
    simplified = "simplified_vs_input" in final
    compiled_pays = pays(final["compiled_vs_input"], min_gain)
    if compiled_pays and (not simplified or not slower_with_confidence(final["compiled_vs_simplified"])):
        return "compiled", "the compiled model pays against the input" + (
            " and is not slower with confidence than the simplified graph" if simplified else "")
    if simplified and pays(final["simplified_vs_input"], min_gain):
        return "simplified", ("the simplified graph pays against the input, and the compiled model " +
                              ("is slower with confidence than it" if compiled_pays else "does not pay"))
    if compiled_pays:
        return "compiled", ("the compiled model pays against the input; the simplified graph measured faster than it "
                            "but does not pay against the input")
    return "input", ("neither the compiled model nor the simplified graph pays against the input: the input is "
                     "emitted unchanged" if simplified else
                     "the compiled model does not pay against the input: the input is emitted unchanged")


def _better_in_sight(final: dict[str, dict], min_gain: float) -> str | None:
    """Why another look may change the choice: a better choice than the current one points to a gain against the
    input (`points_to_gain`) and, for the compiled model, is not slower with confidence than the simplified graph."""
    what, _ = _choose(final, min_gain)
    if what != "compiled" and points_to_gain(final["compiled_vs_input"], min_gain) and not slower_with_confidence(
            final.get("compiled_vs_simplified", {})):
        return "the compiled model's ratio to the input points to a gain at every batch size but does not pay yet"
    if what == "input" and "simplified_vs_input" in final and points_to_gain(final["simplified_vs_input"], min_gain):
        return "the simplified graph's ratio to the input points to a gain at every batch size but does not pay yet"
    return None


def _final(original: onnx.ModelProto, pipeline: list[Pass], best: onnx.ModelProto, build: Build, measure: _Measure,
           report: dict, deadline: float) -> tuple[str, onnx.ModelProto]:
    """Time the best compiled model against the input and the simplified graph, in looks while a better choice is in
    sight; return (what, model) to emit: the compiled model or the simplified graph where it pays against the
    input, else the input (module docstring)."""
    min_gain = measure.settings.min_gain
    simplify = [p for p in pipeline if p.name == SIMPLIFY]
    models, labels = [original, best], ["input", "compiled"]
    simplified = None
    if simplify:
        simplified, _ = build(simplify)
        models.insert(1, simplified)
        labels.insert(1, "simplified")
    else:
        report["simplified_note"] = f"the pipeline has no {SIMPLIFY} pass: compared with the input only"
    samples, report["final_looks"], report["final_stop"] = measure.looks(
        models, labels, lambda pooled: _better_in_sight(_compare(measure, pooled, simplified is not None), min_gain),
        deadline)
    report["final"] = final = _compare(measure, samples, simplified is not None)
    report["compiled_faster_with_confidence"] = faster_with_confidence(final["compiled_vs_input"])
    what, report["why"] = _choose(final, min_gain)
    if what == "compiled":
        return what, best
    report["passes_note"] = "report['passes'] describes the compiled model, which was not emitted"
    if what == "simplified":
        return what, simplified
    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    return "input", copy
