"""Latency measurement (`cnnc.runtime.bench`), its report writers, and `cnnc bench`.

Every statistic is checked on a deterministic clock: runners advance a fake clock by scripted amounts, so the
samples, percentiles, ratios and the A B A B order are known exactly. No test asserts a wall-clock speed. The CUDA
path runs for real only where onnxruntime can use a GPU (the tests say why they skip otherwise); its fallbacks are
also driven here on the CPU through an injected session factory.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from click.testing import CliRunner
from helpers import make_model, run_model

from cnnc.cli import cli
from cnnc.cli.table import table as text_table
from cnnc.errors import UsageError
from cnnc.runtime import bench, bench_report
from cnnc.runtime.environment import device_slug
from cnnc.runtime.feeds import concrete_inputs, make_feeds, static_output_shapes
from cnnc.runtime.peers import peer_models
from cnnc.runtime.session import cuda_available, make_session
from cnnc.runtime.stats import ratio_to_first, slot_interval, summarize, t_quantile

NO_GPU = "no CUDA device usable by onnxruntime on this machine (onnxruntime falls back to its CPU provider)"


class FakeClock:
    """A clock that only moves when a fake runner says it took time."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def runner(self, durations, log=None, name=None):
        durations = list(durations)
        calls = iter(range(10**9))

        def run():
            index = next(calls)
            self.now += durations[index % len(durations)]
            if log is not None:
                log.append(name)
        return run


def _conv_model(seed: int = 0, channels: int = 4, batch="N") -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weight = (0.3 * rng.standard_normal((channels, 3, 3, 3))).astype(np.float32)
    bias = (0.1 * rng.standard_normal(channels)).astype(np.float32)
    return make_model([oh.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
                       oh.make_node("Relu", ["c"], ["y"])],
                      [("x", [batch, 3, 8, 6])], [("y", [batch, channels, 8, 6])], [("w", weight), ("b", bias)])


def _dynamic_model() -> onnx.ModelProto:
    """NonZero: an output whose shape depends on the input's values, so no static output shape exists."""
    graph = oh.make_graph([oh.make_node("NonZero", ["x"], ["y"])], "dynamic",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.INT64, [2, "K"])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# ------------------------------------------------------------------------------------------- statistics


def test_summarize_known_samples():
    samples = [k * 1e-3 for k in range(1, 11)]  # 1..10 ms
    stats = summarize(samples, batch=4)
    assert stats["n"] == 10
    assert stats["min_ms"] == pytest.approx(1.0)
    assert stats["max_ms"] == pytest.approx(10.0)
    assert stats["p50_ms"] == pytest.approx(5.5)
    assert stats["p90_ms"] == pytest.approx(9.1)  # linear interpolation: rank 0.9 * 9 = 8.1
    assert stats["p99_ms"] == pytest.approx(9.91)
    assert stats["mean_ms"] == pytest.approx(5.5)
    assert stats["std_ms"] == pytest.approx(np.sqrt(55 / 6))  # sample standard deviation of 1..10
    assert stats["throughput_per_s"] == pytest.approx(4 / 5.5e-3)


def test_summarize_single_sample_and_empty():
    stats = summarize([2e-3], batch=1)
    assert stats["std_ms"] == 0.0 and stats["p99_ms"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        summarize([], batch=1)


def test_ratio_to_first_exact_and_seeded():
    rng = np.random.default_rng(0)
    first = (1 + rng.random(50)) * 1e-3
    half = first / 2
    ratio = ratio_to_first(first, half)
    assert ratio["ratio"] == pytest.approx(0.5)
    assert ratio["speedup"] == pytest.approx(2.0)
    assert ratio["paired_median"] == pytest.approx(0.5)
    assert ratio["ci95"] == pytest.approx([0.5, 0.5])  # every resample keeps the pairing: the ratio is exact
    noisy = first * (0.8 + 0.4 * rng.random(50))
    a, b = ratio_to_first(first, noisy), ratio_to_first(first, noisy)
    assert a == b  # seeded bootstrap: the same samples give the same interval
    assert a["ci95"][0] <= a["ratio"] <= a["ci95"][1]
    with pytest.raises(ValueError):
        ratio_to_first(first, first[:-1])
    with pytest.raises(ValueError, match="positive"):
        ratio_to_first(first, np.zeros_like(first))


def test_session_slots_interval_holds_the_offset_the_rounds_cannot_see():
    """Two sessions per model; session 1 of the candidate runs 4 % slower than its session 0 (an offset that lasts
    the session's life). Rounds alone give a tight interval; over the session slots the interval is Student's t on
    the slots' log ratios, wide enough to hold both, centred on their geometric mean."""
    rng = np.random.default_rng(1)
    first = (1 + 0.01 * rng.standard_normal(200)) * 1e-3
    slots = bench.session_slots(200, 2)
    other = first * np.where(np.asarray(slots) == 1, 1.04, 1.0) * (1 + 0.002 * rng.standard_normal(200))
    plain = ratio_to_first(first, other)
    grouped = ratio_to_first(first, other, groups=slots)
    assert plain["ci95"][1] - plain["ci95"][0] < 0.02
    assert grouped["slots"] == pytest.approx([1.0, 1.04], abs=2e-3)
    assert grouped["ratio"] == pytest.approx(np.sqrt(1.04), abs=2e-3)
    assert grouped["ci95"][0] <= 1.0 and grouped["ci95"][1] >= 1.04
    with pytest.raises(ValueError, match="one id per round"):
        ratio_to_first(first, other, groups=slots[:-1])
    single = ratio_to_first(first, other, groups=[0] * 200)  # one slot: the rounds' bootstrap
    assert single == {**plain}


def test_identical_models_are_called_different_at_the_nominal_rate_over_three_sessions():
    """Two models of equal speed, three sessions each, every session with its own lasting offset (sd 1 %) and rounds
    with 1 % noise: over 600 seeded runs the 95 % interval excludes 1.00 about 5 % of the time (a percentile
    bootstrap over the three slots excluded it about 25 % of the time)."""
    rng = np.random.default_rng(7)
    slots = np.asarray(bench.session_slots(90, 3))
    excluded = 0
    for _ in range(600):
        offsets = 1 + 0.01 * rng.standard_normal((2, 3))
        first = 1e-3 * offsets[0][slots] * (1 + 0.01 * rng.standard_normal(90))
        other = 1e-3 * offsets[1][slots] * (1 + 0.01 * rng.standard_normal(90))
        low, high = ratio_to_first(first, other, groups=slots)["ci95"]
        excluded += not low <= 1.0 <= high
    assert 0.02 <= excluded / 600 <= 0.08, excluded


@pytest.mark.parametrize(("probability", "df", "expected"), [
    (0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 4, 2.7764), (0.975, 30, 2.0423),  # printed tables
    (0.995, 1, 63.6567), (0.995, 7, 3.4995), (0.999, 5, 5.8934),
    (1 - 1e-5, 2, 0.99998 / np.sqrt(2 * 0.99999 * 1e-5)),  # df = 2 has a closed form: (2p - 1) / sqrt(2p(1 - p))
])
def test_t_quantile_matches_the_tables_and_the_closed_form(probability, df, expected):
    assert t_quantile(probability, df) == pytest.approx(expected, rel=2e-4)


def test_t_quantile_rejects_what_it_cannot_compute():
    for probability, df in ((0.5, 3), (1.0, 3), (0.9, 0)):
        with pytest.raises(ValueError):
            t_quantile(probability, df)


def test_slot_interval_at_a_family_wise_level_is_wider_and_is_ratio_to_firsts_at_95():
    """slot_interval gives the interval from stored slots alone, at any level (how bench/zoo.py scores a
    confirmation at a family-wise level); at 95 % it is ratio_to_first's over the same slots."""
    rng = np.random.default_rng(3)
    slots = bench.session_slots(120, 6)
    first = 1e-3 * (1 + 0.01 * rng.standard_normal(120))
    other = first * 1.03 * (1 + 0.01 * rng.standard_normal(120))
    result = ratio_to_first(first, other, groups=slots)
    at_95 = slot_interval(result["slots"])
    assert at_95["ci"] == pytest.approx(result["ci95"]) and at_95["ratio"] == pytest.approx(result["ratio"])
    wide = slot_interval(result["slots"], 1 - 0.05 / 20)
    assert wide["level"] == pytest.approx(0.9975)
    assert wide["ci"][0] < result["ci95"][0] <= result["ratio"] <= result["ci95"][1] < wide["ci"][1]
    logs = np.log(result["slots"])
    half = t_quantile(1 - 0.025 / 20, 5) * logs.std(ddof=1) / np.sqrt(6)
    assert wide["ci"] == pytest.approx([np.exp(logs.mean() - half), np.exp(logs.mean() + half)])
    with pytest.raises(ValueError, match="two slots"):
        slot_interval([1.0])


# ------------------------------------------------------------------------------------------- interleaving


def test_interleave_order_and_samples_on_fake_clock():
    clock, log = FakeClock(), []
    runners = [clock.runner([0.003, 0.001], log, "A"), clock.runner([0.002], log, "B"),
               clock.runner([0.010], log, "C")]
    samples = bench.interleave(runners, warmup=2, iters=4, timer=clock, order="fixed")
    assert log == ["A", "B", "C"] * 6  # 2 warm-up rounds then 4 timed rounds, always round-robin
    # Warm-up consumed calls 0 and 1 of A, so the timed calls of A alternate from the start of its script again.
    assert samples[0] == pytest.approx([0.003, 0.001, 0.003, 0.001])
    assert samples[1] == pytest.approx([0.002] * 4)
    assert samples[2] == pytest.approx([0.010] * 4)


def test_interleave_rewarm_calls_precede_each_timed_call_untimed():
    clock, log = FakeClock(), []
    runners = [clock.runner([0.100, 0.001], log, "A"), clock.runner([0.050, 0.002], log, "B")]
    samples = bench.interleave(runners, warmup=0, iters=3, timer=clock, rewarm=1, order="fixed")
    assert log == ["A", "A", "B", "B"] * 3
    # The untimed call takes the slow first step of each script: only the second (hot) call is timed.
    assert samples == [pytest.approx([0.001] * 3), pytest.approx([0.002] * 3)]


def test_interleave_shuffles_each_round_seeded_and_keeps_samples_per_runner():
    """Every timed round runs each runner once, in a seeded random order; samples stay with their runner, so that
    sample i of every runner comes from round i (the paired ratios need it)."""
    clock, log = FakeClock(), []
    runners = [clock.runner([0.001], log, name) for name in "ABCD"]
    samples = bench.interleave(runners, warmup=0, iters=400, timer=clock)
    rounds = [log[i:i + 4] for i in range(0, len(log), 4)]
    assert all(sorted(r) == list("ABCD") for r in rounds)
    first = {name: sum(r[0] == name for r in rounds) for name in "ABCD"}
    assert all(70 <= n <= 130 for n in first.values()), first  # each position about a quarter of the rounds
    assert len({tuple(r) for r in rounds}) > 12  # many orders, not a rotation
    assert all(len(s) == 400 and s == pytest.approx([0.001] * 400) for s in samples)
    again = []
    bench.interleave([clock.runner([0.001], again, name) for name in "ABCD"], warmup=0, iters=400, timer=clock)
    assert again == log  # seeded
    with pytest.raises(UsageError):
        bench.interleave(runners, warmup=0, iters=1, timer=clock, order="sideways")


def test_interleave_duration_min_and_max_rounds():
    clock = FakeClock()
    runners = [clock.runner([1.0]), clock.runner([1.0])]
    assert len(bench.interleave(runners, warmup=0, duration=10.0, timer=clock)[0]) == 5  # 2 s per round
    assert len(bench.interleave(runners, warmup=0, duration=0.1, timer=clock, min_rounds=3)[1]) == 3
    assert len(bench.interleave(runners, warmup=0, duration=1e9, timer=clock, max_rounds=7)[0]) == 7


def test_interleave_rotates_each_models_sessions_round_by_round():
    clock, log = FakeClock(), []
    runners = [[clock.runner([0.001], log, "A0"), clock.runner([0.002], log, "A1")],
               [clock.runner([0.003], log, "B0"), clock.runner([0.004], log, "B1")]]
    samples = bench.interleave(runners, warmup=1, iters=4, timer=clock, order="fixed")
    assert log[:4] == ["A0", "A1", "B0", "B1"]  # the warm-up warms every session
    assert log[4:] == ["A0", "B0", "A1", "B1"] * 2  # round r runs on slot r mod 2 for every model
    assert samples == [pytest.approx([0.001, 0.002] * 2), pytest.approx([0.003, 0.004] * 2)]
    assert bench.session_slots(4, 2) == [0, 1, 0, 1]
    # A duration gives every session at least two timed rounds.
    assert len(bench.interleave(runners, warmup=0, duration=1e-9, timer=clock, min_rounds=1)[0]) == 4
    with pytest.raises(UsageError, match="at least one session"):
        bench.interleave([[]], warmup=0, iters=1, timer=clock)
    with pytest.raises(UsageError, match="give at least 4"):
        bench.interleave(runners, warmup=0, iters=3, timer=clock)


@pytest.mark.parametrize("kwargs", [{}, {"iters": 3, "duration": 1.0}, {"iters": 0}, {"duration": -1.0}])
def test_interleave_rejects_bad_limits(kwargs):
    with pytest.raises(UsageError):
        bench.interleave([lambda: None], warmup=0, **kwargs)


# ------------------------------------------------------------------------------------------- inputs


def test_concrete_inputs_batch_and_symbolic_dims():
    model = _conv_model()
    assert concrete_inputs(model, 5)["x"][0] == (5, 3, 8, 6)
    assert concrete_inputs(model, None)["x"][0] == (1, 3, 8, 6)
    fixed = _conv_model(batch=2)
    assert concrete_inputs(fixed, None)["x"][0] == (2, 3, 8, 6)
    with pytest.raises(UsageError, match="fixed batch of 2"):
        concrete_inputs(fixed, 4)
    spatial = make_model([oh.make_node("Relu", ["x"], ["y"])], [("x", ["N", 3, "H", "W"])],
                         [("y", ["N", 3, "H", "W"])])
    with pytest.raises(UsageError, match="--input-shape x"):
        concrete_inputs(spatial, 2)
    # The batch replaces the leading dim of a given shape; the other dims come from it.
    assert concrete_inputs(spatial, 2, ["x:1,3,5,7"])["x"][0] == (2, 3, 5, 7)
    with pytest.raises(UsageError, match="does not fit"):
        concrete_inputs(spatial, 2, ["x:1,4,5,7"])
    with pytest.raises(UsageError, match="unknown input"):
        concrete_inputs(spatial, 2, ["z:1,3,5,7"])


def test_static_output_shapes():
    shapes = concrete_inputs(_conv_model(), 3)
    assert static_output_shapes(_conv_model(), shapes) == {"y": ((3, 4, 8, 6), np.dtype(np.float32))}
    dynamic = _dynamic_model()
    assert static_output_shapes(dynamic, concrete_inputs(dynamic, 1)) is None


# ------------------------------------------------------------------------------------------- sessions on the CPU


class RecordingFactory:
    """Wraps make_session and records the arguments of every session it creates."""

    def __init__(self, refuse_graph: bool = False, on_cpu: bool = True):
        self.calls, self.refuse_graph, self.on_cpu = [], refuse_graph, on_cpu

    def __call__(self, model, provider, optimization, threads, config, cuda_options):
        self.calls.append({"provider": provider, "optimization": optimization, "threads": threads,
                           "config": dict(config), "cuda_options": dict(cuda_options or {})})
        if self.refuse_graph and (cuda_options or {}).get("enable_cuda_graph") == "1":
            raise RuntimeError("CUDA graph refused: node Foo is on the CPU provider")
        return make_session(model, "cpu" if self.on_cpu else provider, optimization, threads, config, cuda_options)


def test_prepare_cpu_binds_io_and_computes_the_model():
    factory, clock = RecordingFactory(), FakeClock()
    prepared = bench.prepare(_conv_model(), "m", provider="cpu", batch=2, threads=1, timer=clock,
                             session_factory=factory)
    # Spinning is off by default (see runtime/bench.py): both thread pools get the config entries.
    assert factory.calls == [{"provider": "cpu", "optimization": "all", "threads": 1,
                              "config": {"session.set_denormal_as_zero": "1", "session.intra_op.allow_spinning": "0",
                                         "session.inter_op.allow_spinning": "0"}, "cuda_options": {}}]
    info = prepared.info
    assert info["provider"] == "CPUExecutionProvider" and info["device"] == "cpu"
    assert info["io_binding"] and not info["cuda_graph"]
    assert info["inputs"] == {"x": {"shape": [2, 3, 8, 6], "dtype": "float32"}}
    assert info["session_create_ms"] == 0.0 and info["first_run_ms"] == 0.0  # the fake clock never moved
    # The pre-bound output buffer holds what the model computes on the bound input.
    _session, _binding, buffers = prepared.keep_alive
    prepared.run()
    feeds = make_feeds(concrete_inputs(_conv_model(), 2))
    expected = run_model(_conv_model(), feeds)[0]
    np.testing.assert_allclose(buffers[-1].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_spinning_off_sets_the_config_entries():
    factory = RecordingFactory()
    bench.prepare(_conv_model(), "m", provider="cpu", batch=1, spinning=False, denormal_as_zero=False,
                  session_factory=factory)
    assert factory.calls[0]["config"] == {"session.set_denormal_as_zero": "0",
                                          "session.intra_op.allow_spinning": "0",
                                          "session.inter_op.allow_spinning": "0"}


def test_cuda_graph_refused_falls_back_to_plain_session(monkeypatch):
    """CUDA asked, the graph session refused: the plain CUDA session is used and the reason recorded. The factory
    runs it on the CPU (this machine may have no GPU), which must then be reported as CPU, not as CUDA."""
    factory = RecordingFactory(refuse_graph=True)
    prepared = bench.prepare(_conv_model(), "m", provider="cuda", batch=1, session_factory=factory)
    assert [c["cuda_options"] for c in factory.calls] == [
        {"cudnn_conv_algo_search": "EXHAUSTIVE", "enable_cuda_graph": "1"},
        {"cudnn_conv_algo_search": "EXHAUSTIVE"}]
    info = prepared.info
    assert not info["cuda_graph"]
    assert "CUDA graph refused" in info["cuda_graph_note"]
    assert info["provider"] == "CPUExecutionProvider" and info["device"] == "cpu"
    assert any("measured on the CPU" in note for note in info["notes"])


def test_cuda_graph_not_tried_when_outputs_are_dynamic():
    factory = RecordingFactory()
    dynamic = _dynamic_model()
    prepared = bench.prepare(dynamic, "m", provider="cuda", batch=1, session_factory=factory)
    assert [c["cuda_options"].get("enable_cuda_graph") for c in factory.calls] == [None]
    assert prepared.info["cuda_graph_note"].startswith("not tried: an output shape is not static")


def test_auto_provider_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(bench, "cuda_available", lambda: False)
    ticks = iter(range(10**9))
    report = bench.bench_models([_conv_model(0), _conv_model(1)], ["a", "b"], batch=1, provider="auto",
                                warmup=1, iters=3, timer=lambda: next(ticks) * 1e-3)
    assert report["settings"]["device_kind"] == "cpu" and report["settings"]["devices_used"] == ["cpu"]
    assert {m["provider"] for m in report["comparisons"][0]["models"]} == {"CPUExecutionProvider"}
    with pytest.raises(UsageError, match="no CUDA device"):
        bench.bench_models([_conv_model()], provider="cuda", iters=1)


def test_mixed_devices_get_no_ratio():
    prepared = [bench.PreparedModel("a", lambda: None, {"device": "cuda", "provider": "CUDAExecutionProvider",
                                                         "notes": []}),
                bench.PreparedModel("b", lambda: None, {"device": "cpu", "provider": "CPUExecutionProvider",
                                                         "notes": []})]
    comparison = bench._comparison([[p] for p in prepared], [[1e-3, 2e-3], [3e-3, 4e-3]], batch=1, seed=0)
    assert comparison["models"][1]["ratio_to_first"] is None
    assert "no ratio" in comparison["models"][1]["notes"][0]


def test_report_keeps_a_bounded_sample_of_long_runs(monkeypatch):
    monkeypatch.setattr(bench, "MAX_SAMPLES_KEPT", 10)
    prepared = [bench.PreparedModel(label, lambda: None, {"device": "cpu", "provider": "CPUExecutionProvider",
                                                          "notes": []}) for label in "ab"]
    times = [[(1 + k) * 1e-3 for k in range(25)], [(1 + k) * 5e-4 for k in range(25)]]
    comparison = bench._comparison([[p] for p in prepared], times, batch=1, seed=0)
    first = comparison["models"][0]
    assert first["samples_kept_every"] == 3 and first["samples_ms"] == pytest.approx([1.0 + 3 * k for k in range(9)])
    assert first["stats"]["n"] == 25 and first["stats"]["p50_ms"] == pytest.approx(13.0)  # from every sample
    assert comparison["models"][1]["ratio_to_first"]["ratio"] == pytest.approx(0.5)
    # Three session slots: thinning keeps every 4th round, not every 3rd, which would all be slot 0.
    three = [[bench.PreparedModel(label, lambda: None, {"device": "cpu", "provider": "CPUExecutionProvider",
                                                        "notes": []}) for _ in range(3)] for label in "ab"]
    thinned = bench._comparison(three, times, batch=1, seed=0)
    assert thinned["models"][0]["samples_kept_every"] == 4 and thinned["sessions_per_model"] == 3


# ------------------------------------------------------------------------------------------- the whole bench


def _report(tmp_path, batches=(1, 3)):
    """A report from real CPU sessions timed on a clock that advances 1 ms per reading."""
    ticks = iter(range(10**9))
    report = bench.bench_models([_conv_model(0), _conv_model(1, channels=6)], ["base", "other"], batch=list(batches),
                                provider="cpu", warmup=1, iters=4, timer=lambda: next(ticks) * 1e-3)
    return report


def test_bench_models_report(tmp_path):
    report = _report(tmp_path)
    assert [c["batch"] for c in report["comparisons"]] == [1, 3]
    for comparison in report["comparisons"]:
        assert comparison["rounds"] == 4
        base, other = comparison["models"]
        for model in (base, other):
            assert model["provider"] == "CPUExecutionProvider"
            assert model["stats"]["n"] == 4 and model["stats"]["p50_ms"] == pytest.approx(1.0)
            assert len(model["samples_ms"]) == 4
            assert {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "throughput_per_s"} <= set(model["stats"])
        assert base["ratio_to_first"]["ratio"] == 1.0
        assert other["ratio_to_first"]["ratio"] == pytest.approx(1.0)
        assert other["inputs"]["x"]["shape"][0] == comparison["batch"]
    env, settings = report["environment"], report["settings"]
    assert {"device", "cpu", "onnxruntime", "loadavg_1_5_15", "python"} <= set(env)
    assert settings["optimization"] == "ORT_ENABLE_ALL" and settings["denormal_as_zero"]
    assert device_slug(report).startswith("cpu-") and device_slug(report).endswith("t")
    json.dumps(report)  # JSON-able as it is


def test_bench_models_with_several_sessions_per_model():
    ticks = iter(range(10**9))
    report = bench.bench_models([_conv_model(0), _conv_model(1)], ["base", "other"], batch=1, provider="cpu",
                                warmup=1, iters=6, sessions=3, timer=lambda: next(ticks) * 1e-3)
    comparison = report["comparisons"][0]
    assert report["settings"]["sessions_per_model"] == 3 and comparison["sessions_per_model"] == 3
    for model in comparison["models"]:
        assert model["sessions"] == 3 and len(model["session_create_ms_each"]) == 3
        assert model["stats"]["n"] == 6
    assert comparison["models"][1]["ratio_to_first"]["ratio"] == pytest.approx(1.0)
    with pytest.raises(UsageError, match="sessions"):
        bench.bench_models([_conv_model(0)], sessions=0, iters=1)


def test_each_session_slot_creates_the_models_in_a_rotated_order():
    created = []
    slots = [bench.create_slot(lambda i, slot=slot: created.append((slot, i)) or f"m{i}s{slot}", 3, slot)
             for slot in range(4)]
    assert slots == [[f"m{i}s{slot}" for i in range(3)] for slot in range(4)]  # returned in model order
    assert [i for _, i in created] == [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]  # each model in each position in turn


def test_bench_models_rotates_session_creation_over_the_slots():
    order = []

    def recording_factory(model, *args, **kwargs):
        order.append(model.graph.name)
        return make_session(model, *args, **kwargs)

    models = [_conv_model(0), _conv_model(1)]
    models[0].graph.name, models[1].graph.name = "a", "b"
    bench.bench_models(models, ["a", "b"], batch=1, provider="cpu", warmup=1, iters=4, sessions=2,
                       session_factory=recording_factory)
    assert order == ["a", "b", "b", "a"]


def test_labels_and_errors():
    with pytest.raises(UsageError, match="labels"):
        bench.bench_models([_conv_model()], ["a", "b"], iters=1)
    with pytest.raises(UsageError, match="provider"):
        bench.bench_models([_conv_model()], provider="tpu", iters=1)
    with pytest.raises(UsageError, match="batch"):
        bench.bench_models([_conv_model()], batch=[0], iters=1)
    report = bench.bench_models([_conv_model(), _conv_model()], ["same", "same"], provider="cpu", warmup=0, iters=1)
    assert [m["label"] for m in report["comparisons"][0]["models"]] == ["same #1", "same #2"]


def test_peers_absent_and_present(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxsim", None)  # `import onnxsim` raises ImportError
    monkeypatch.setitem(sys.modules, "onnxslim", None)
    peers, notes = peer_models(_conv_model())
    assert peers == [] and len(notes) == 2 and all("not installed" in n for n in notes)

    class FakeOnnxsim:
        @staticmethod
        def simplify(model):
            return model, False

    class BrokenOnnxslim:
        @staticmethod
        def slim(model):
            raise RuntimeError("cannot slim")

    monkeypatch.setitem(sys.modules, "onnxsim", FakeOnnxsim)
    monkeypatch.setitem(sys.modules, "onnxslim", BrokenOnnxslim)
    report = bench.bench_models([_conv_model()], ["mine"], provider="cpu", warmup=0, iters=2, peers=True)
    assert [m["label"] for m in report["comparisons"][0]["models"]] == ["mine", "onnxsim"]
    assert any("own output check failed" in n for n in report["notes"])
    assert any("onnxslim failed: RuntimeError: cannot slim" in n for n in report["notes"])


# ------------------------------------------------------------------------------------------- report writers


def test_writers_json_markdown_text(tmp_path):
    report = _report(tmp_path, batches=(2,))
    report["notes"].append("a note")
    path = bench_report.write_json(report, tmp_path / "r.json")
    assert bench_report.read_json(path) == json.loads(json.dumps(report))
    assert '"samples_ms": [1.0, 1.0, 1.0, 1.0]' in path.read_text()  # number lists on one line
    text = bench_report.markdown(report, "t")
    assert text.startswith("# t\n")
    assert "| batch | model | provider | p50 | p90 | p99 |" in text
    assert "| 2 | base | cpu | 1 ms | 1 ms | 1 ms |" in text
    assert "| 2 | other | cpu |" in text and "1.000 | 1.000-1.000 | 1.00x" in text
    assert "- a note" in text and "ORT_ENABLE_ALL" in text
    table = text_table(bench_report.table_rows(report), bench_report.TABLE_HEADERS)
    assert table.splitlines()[0].split()[:4] == ["batch", "model", "provider", "p50"]
    assert len(table.splitlines()) == 4


def test_format_ms_units():
    assert bench_report.format_ms(0.0042) == "4.2 µs"
    assert bench_report.format_ms(0.99999) == "1 ms"
    assert bench_report.format_ms(12.34) == "12.3 ms"
    assert bench_report.format_ms(2500) == "2.5 s"
    assert bench_report.format_ms(None) == "-"


def test_plot_is_a_real_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional 'plot' extra")
    import matplotlib.image

    report = _report(tmp_path, batches=(1, 2))
    report["comparisons"][0]["models"][1]["samples_ms"] = [0.4, 0.5, 0.6, 0.5]
    report["comparisons"][0]["models"][1]["ratio_to_first"] = {"ratio": 0.5, "speedup": 2.0, "paired_median": 0.5,
                                                               "ci95": [0.4, 0.6]}
    path = bench_report.write_plot(report, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 400 and image.shape[1] > 400
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    report = _report(tmp_path, batches=(1,))
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UsageError, match="needs matplotlib"):
        bench_report.write_plot(report, tmp_path / "r.png")


# ------------------------------------------------------------------------------------------- the CLI


def test_cli_bench_done_when(tmp_path):
    """The issue's command: two models, --batch 4, JSON + Markdown + PNG, on the CPU."""
    pytest.importorskip("matplotlib", reason="matplotlib is the optional 'plot' extra")
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_conv_model(0), a)
    onnx.save(_conv_model(1, channels=8), b)
    out = {kind: tmp_path / f"r.{kind}" for kind in ("json", "md", "png")}
    result = CliRunner().invoke(cli, ["bench", str(a), str(b), "--batch", "4", "--provider", "cpu", "--warmup", "2",
                                      "--iters", "20", "--json", str(out["json"]), "--md", str(out["md"]),
                                      "--plot", str(out["png"])])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "a.onnx" in result.stdout and "b.onnx" in result.stdout and "p99" in result.stdout
    report = json.loads(out["json"].read_text())
    models = report["comparisons"][0]["models"]
    assert report["comparisons"][0]["batch"] == 4 and [m["label"] for m in models] == ["a.onnx", "b.onnx"]
    assert models[1]["ratio_to_first"]["ratio"] > 0 and models[0]["provider"] == "CPUExecutionProvider"
    assert "| 4 | a.onnx | cpu |" in out["md"].read_text()
    assert out["png"].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--iters", "2", "--duration", "1"], "not both"),
    (["--batch", "1,x"], "bad --batch"),
    (["--label", "only-one", "--label", "two", "--label", "three"], "label"),
])
def test_cli_bench_usage_errors(tmp_path, args, message):
    a = tmp_path / "a.onnx"
    onnx.save(_conv_model(), a)
    result = CliRunner().invoke(cli, ["bench", str(a), str(a), *args])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and message in result.stderr


def test_cli_bench_bad_model_is_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    result = CliRunner().invoke(cli, ["bench", str(bad), "--iters", "1"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "error:" in result.stderr


# ------------------------------------------------------------------------------------------- CUDA (real GPU)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason=NO_GPU)
def test_cuda_bench_uses_device_buffers_and_a_cuda_graph():
    prepared = bench.prepare(_conv_model(), "m", provider="cuda", batch=2)
    info = prepared.info
    assert info["provider"] == "CUDAExecutionProvider" and info["device"] == "cuda"
    assert info["cuda_graph"], info.get("cuda_graph_note")
    _session, _binding, buffers = prepared.keep_alive
    assert all(buffer.device_name().lower() == "cuda" for buffer in buffers)
    for _ in range(3):  # replays of the captured graph
        prepared.run()
    expected = run_model(_conv_model(), make_feeds(concrete_inputs(_conv_model(), 2)))[0]
    np.testing.assert_allclose(buffers[-1].numpy(), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason=NO_GPU)
def test_cuda_report_names_the_gpu_and_versions():
    report = bench.bench_models([_conv_model(0), _conv_model(1)], provider="auto", batch=[1, 4], warmup=5, iters=10)
    assert report["settings"]["devices_used"] == ["cuda"]
    assert report["environment"]["gpu"] and report["environment"]["cudnn"]
    assert device_slug(report).startswith("cuda-")
    assert all(m["ratio_to_first"] is not None for c in report["comparisons"] for m in c["models"])


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason=NO_GPU)
def test_cuda_graph_falls_back_when_outputs_are_dynamic():
    dynamic = _dynamic_model()
    prepared = bench.prepare(dynamic, "m", provider="cuda", batch=1)
    assert not prepared.info["cuda_graph"] and prepared.info["cuda_graph_note"].startswith("not tried")
    prepared.run()
