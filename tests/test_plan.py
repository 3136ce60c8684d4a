"""``quire plan``: the capacity arithmetic on hand-built benchmark levels (the seeds' worked example,
headroom rounding, SLO filtering, Little's law and Erlang C, the HPA target, bad input), then the
real CLI on a benchmark file that ``quire bench serve --save`` wrote against a real tiny server."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from quire.bench.plan import (
    LevelCapacity,
    OfferedLoad,
    PlanSLO,
    assess_run,
    erlang_c_queue,
    littles_law,
    make_plan,
    pick_capacity,
    replicas_for,
    resolve_lengths,
)
from quire.bench.plan_report import format_levels, format_plan, hpa_quantity, plan_to_dict, plot_plan
from quire.bench.report import BenchRun, load_run, save_run
from quire.bench.stats import LevelResult, Percentiles
from quire.entrypoints.cli import main

from server_fixtures import ServerProcess, running_server

IN_LEN, OUT_LEN = 100, 200  # 300 tokens a request


def _level(
    concurrency: int | None,
    req_s: float,
    ttft_p99: float | None,
    tpot_p99: float | None,
    e2e_mean_ms: float,
    *,
    failed: int = 0,
    rate: float | None = None,
) -> LevelResult:
    """A level of 10 good requests at ``req_s``; p50/p90 are set apart from p99 so a test notices
    a planner reading the wrong percentile."""
    ok = 10

    def pct(p99: float | None) -> Percentiles:
        return Percentiles() if p99 is None else Percentiles(mean=p99 / 3, p50=p99 / 4, p90=p99 / 2, p99=p99)

    return LevelResult(
        concurrency=concurrency,
        request_rate=rate,
        requests=ok + failed,
        ok=ok,
        failed=failed,
        wall_s=ok / req_s,
        output_tokens=ok * OUT_LEN,
        input_tokens=ok * IN_LEN,
        output_tok_s=req_s * OUT_LEN,
        total_tok_s=req_s * (IN_LEN + OUT_LEN),
        req_s=req_s,
        ttft_ms=pct(ttft_p99),
        tpot_ms=pct(tpot_p99),
        e2e_ms=Percentiles(mean=e2e_mean_ms, p50=e2e_mean_ms, p90=e2e_mean_ms, p99=e2e_mean_ms),
    )


def _run(*levels: LevelResult, mode: str = "serve") -> BenchRun:
    config = {"workload": {"input_len": IN_LEN, "output_len": OUT_LEN}}
    return BenchRun(mode=mode, levels=levels, config=config)


# c=1: fast; c=8: the capacity within a 500 ms / 50 ms SLO; c=16 misses TTFT only; c=32 misses
# TPOT only (while carrying more); c=64 had failures.
SWEEP = _run(
    _level(1, 0.4, 80.0, 12.0, 2500.0),
    _level(8, 2.0, 200.0, 20.0, 4000.0),
    _level(16, 2.6, 900.0, 30.0, 6000.0),
    _level(32, 3.0, 300.0, 80.0, 10000.0),
    _level(64, 3.2, 100.0, 10.0, 12000.0, failed=2),
)
SLO = PlanSLO(ttft_ms=500, tpot_ms=50)


def test_seeds_worked_example_three_replicas_then_four_with_headroom() -> None:
    # 3.0e6 tokens/h offered, 1.2e6 tokens/h per replica -> ceil(2.5) = 3; * 1.3 -> ceil(3.25) = 4.
    assert replicas_for(3.0e6, 1.2e6) == 3
    assert replicas_for(3.0e6, 1.2e6, 1.3) == 4
    per_replica_req_s = 1.2e6 / 3600 / (IN_LEN + OUT_LEN)
    run = _run(_level(4, per_replica_req_s, 100.0, 10.0, 3000.0))
    load = OfferedLoad(IN_LEN, OUT_LEN, tokens_per_hour=3.0e6)
    plan = make_plan(run, PlanSLO(ttft_ms=1000), load, headroom=1.3)
    assert plan.unit == "tokens/h"
    assert plan.capacity_per_replica == pytest.approx(1.2e6)
    assert (plan.replicas_before_headroom, plan.replicas) == (3, 4)
    assert plan.utilization == pytest.approx(2.5 / 4)
    assert "ceil(2.500) = 3" in format_plan(plan) and "ceil(3.250) = 4" in format_plan(plan)


def test_replica_rounding() -> None:
    assert replicas_for(2.4e6, 1.2e6) == 2  # exact: no spare replica
    assert replicas_for(2.4e6 + 1, 1.2e6) == 3
    assert replicas_for(0.1 * 3, 0.3) == 1  # 1.0000000000000002 is float noise, not a second replica
    assert replicas_for(0.01, 5.0) == 1  # any load needs one replica
    assert replicas_for(2.0, 1.0, 1.5) == 3
    assert replicas_for(2.0, 1.0, 1.0) == 2


def test_slo_filtering_ttft_only_tpot_only_and_failures() -> None:
    levels = {level.name: level for level in assess_run(SWEEP, SLO)}
    assert levels["c=1"].meets_slo and levels["c=8"].meets_slo
    assert not levels["c=16"].meets_slo and levels["c=16"].why_not == "TTFT p99 900.0 > 500 ms"
    assert not levels["c=32"].meets_slo and levels["c=32"].why_not == "TPOT p99 80.0 > 50 ms"
    assert not levels["c=64"].meets_slo and levels["c=64"].why_not == "2 failed"
    capacity = pick_capacity(tuple(levels.values()), SLO)
    assert capacity.name == "c=8" and capacity.req_s == 2.0
    # Only the checked target counts: without a TPOT target c=32 qualifies and carries more.
    assert pick_capacity(assess_run(SWEEP, PlanSLO(ttft_ms=500)), SLO).name == "c=32"
    # Another percentile reads other numbers: at p50 (a quarter of p99 here) c=16 meets 500 ms.
    at_p50 = {
        level.name: level for level in assess_run(SWEEP, PlanSLO(ttft_ms=500, tpot_ms=50, percentile=50))
    }
    assert at_p50["c=16"].meets_slo and at_p50["c=16"].ttft_ms == 225.0


def test_no_level_meets_the_slo_names_the_nearest_miss() -> None:
    with pytest.raises(ValueError, match=r"nearest, c=1, has TTFT p99 80.0 > 10 ms"):
        make_plan(SWEEP, PlanSLO(ttft_ms=10), OfferedLoad(IN_LEN, OUT_LEN, request_rate=1.0))


def test_littles_law_and_erlang_c_by_hand() -> None:
    assert littles_law(1.25, 4.0) == 5.0
    # M/M/1 at rho 0.5: Lq = rho^2 / (1 - rho) = 0.5.
    assert erlang_c_queue(1, 0.5) == pytest.approx(0.5)
    # M/M/2 carrying 1 Erlang: P(wait) = 1/3, Lq = 1/3 * 0.5 / 0.5 = 1/3.
    assert erlang_c_queue(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c_queue(8, 0.0) == 0.0
    assert math.isinf(erlang_c_queue(4, 4.0))
    assert 0 < erlang_c_queue(512, 400.0) < 1  # no overflow at hundreds of slots


def test_plan_by_rate_queue_and_hpa_target_by_hand() -> None:
    plan = make_plan(SWEEP, SLO, OfferedLoad(IN_LEN, OUT_LEN, request_rate=5.0), headroom=1.3)
    assert plan.capacity.name == "c=8" and plan.unit == "req/s"
    # ceil(5 / 2) = 3; ceil(5 * 1.3 / 2) = ceil(3.25) = 4.
    assert (plan.replicas_before_headroom, plan.replicas) == (3, 4)
    assert plan.per_replica_req_s == pytest.approx(1.25)
    # a = lambda * W = 1.25 req/s * 4 s = 5 busy of S = 8 slots (the level's concurrency).
    assert plan.slots == 8 and plan.busy == pytest.approx(5.0)
    assert plan.queue_depth == pytest.approx(erlang_c_queue(8, 5.0))
    assert plan.queue_wait_s == pytest.approx(plan.queue_depth / 1.25)
    assert plan.in_system == pytest.approx(5.0 + plan.queue_depth)
    # HPA: mu * (SLO TTFT - TTFT) / h = 2 req/s * 0.3 s / 1.3 = 0.4615... waiting per pod.
    assert plan.hpa_target == pytest.approx(2.0 * 0.3 / 1.3)
    assert hpa_quantity(plan.hpa_target) == "462m"
    assert hpa_quantity(2.0) == "2" and hpa_quantity(1.25) == "1250m"
    text = format_plan(plan)
    assert 'averageValue: "462m"' in text and "--max-num-seqs 8" in text
    data = json.loads(json.dumps(plan_to_dict(plan), allow_nan=False))
    assert data["replicas"] == 4 and data["capacity"]["name"] == "c=8" and data["hpa_quantity"] == "462m"


def test_rate_level_slots_come_from_littles_law() -> None:
    # A Poisson level: 3 req/s for 1.5 s each holds ceil(4.5) = 5 requests in flight.
    run = _run(_level(None, 3.0, 100.0, 10.0, 1500.0, rate=3.0))
    plan = make_plan(run, SLO, OfferedLoad(IN_LEN, OUT_LEN, request_rate=3.0), headroom=1.0)
    assert plan.slots == 5 and plan.replicas == 1
    # Without a TTFT target there is no queue budget, so no HPA target.
    assert (
        make_plan(run, PlanSLO(tpot_ms=50), OfferedLoad(IN_LEN, OUT_LEN, request_rate=1.0)).hpa_target is None
    )


def test_table_lists_every_level_with_its_verdict() -> None:
    table = format_levels(make_plan(SWEEP, SLO, OfferedLoad(IN_LEN, OUT_LEN, request_rate=1.0)))
    for name in ("c=1", "c=8", "c=16", "c=32", "c=64"):
        assert name in table
    assert "TTFT p99" in table and table.count("yes") == 2 and "no (2 failed)" in table


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PlanSLO(), "--slo-ttft-ms"),
        (lambda: PlanSLO(ttft_ms=-5), "positive"),
        (lambda: PlanSLO(ttft_ms=5, percentile=95), "percentile"),
        (lambda: OfferedLoad(IN_LEN, OUT_LEN, request_rate=-1.0), "positive"),
        (lambda: OfferedLoad(IN_LEN, OUT_LEN), "exactly one"),
        (lambda: OfferedLoad(IN_LEN, OUT_LEN, request_rate=1.0, tokens_per_hour=1e6), "exactly one"),
        (lambda: replicas_for(1.0, 1.0, 0.9), "headroom must be >= 1.0"),
        (lambda: make_plan(SWEEP, SLO, OfferedLoad(IN_LEN, OUT_LEN, request_rate=1.0), 0.5), "headroom"),
        (lambda: resolve_lengths(SWEEP, 128, None), "measured at input 100 / output 200"),
        (lambda: resolve_lengths(BenchRun(mode="serve", levels=()), None, 5), "--input-len and --output-len"),
        (lambda: assess_run(_run(_level(4, 1.0, None, None, 0.0), mode="offline"), SLO), "no TTFT/TPOT"),
        (lambda: LevelCapacity("x", 1, None, 1.0, 1.0, 1.0, None, None, None, True, "why"), "why_not"),
    ],
)
def test_bad_input_is_a_clear_value_error(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_resolve_lengths_defaults_to_the_benchmarks() -> None:
    assert resolve_lengths(SWEEP, None, None) == (IN_LEN, OUT_LEN)
    assert resolve_lengths(SWEEP, IN_LEN, OUT_LEN) == (IN_LEN, OUT_LEN)
    assert resolve_lengths(BenchRun(mode="serve", levels=()), 7, 9) == (7, 9)


def test_cli_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sweep.json"
    save_run(SWEEP, path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cases = [
        ([str(path), "--slo-ttft-ms", "500", "--rate", "-2"], "offered load must be a positive"),
        ([str(path), "--rate", "2"], "give an SLO"),
        ([str(path), "--slo-ttft-ms", "500", "--rate", "2", "--headroom", "0.8"], "headroom"),
        ([str(bad), "--slo-ttft-ms", "500", "--rate", "2"], "cannot read bench results"),
        ([str(tmp_path / "missing.json"), "--slo-ttft-ms", "500", "--rate", "2"], "cannot read"),
        ([str(path), "--slo-ttft-ms", "1", "--rate", "2"], "no benchmark level meets the SLO"),
    ]
    for args, message in cases:
        assert main(["plan", *args]) == 2, args
        assert "error: " in (err := capsys.readouterr().err) and message in err, (args, err)
    with pytest.raises(SystemExit) as exc:  # argparse: neither --rate nor --tokens-per-hour
        main(["plan", str(path), "--slo-ttft-ms", "500"])
    assert exc.value.code == 2


# A small closed-loop sweep over the tiny checkpoint's 512-id vocabulary.
BENCH_ARGS = "--concurrency 1,2 --input-len 8 --output-len 4 --num-requests 4 --vocab-lo 10 --vocab-hi 500 --no-progress"


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir: Callable[[str], Path]) -> Iterator[ServerProcess]:
    pytest.importorskip("aiohttp")
    with running_server(str(tiny_model_dir("llama"))) as server:
        yield server


@pytest.fixture(scope="module")
def saved_benchmark(tiny_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results file written by the real ``quire bench serve --save`` against a real tiny server."""
    out = tmp_path_factory.mktemp("plan") / "bench.json"
    target = ["--base-url", tiny_server.url, "--model", tiny_server.args[-1]]
    assert main(["bench", "serve", *target, *BENCH_ARGS.split(), "--save", str(out)]) == 0
    return out


def test_plan_cli_end_to_end_on_a_saved_benchmark(
    saved_benchmark: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    run = load_run(saved_benchmark)
    capacity = max(level.req_s for level in run.levels)  # a generous SLO: every level meets it
    png = tmp_path / "plan.png"
    rate = 2.5 * capacity
    args = ["plan", str(saved_benchmark), "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000"]
    assert main([*args, "--rate", repr(rate), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "c=1" in out and "c=2" in out and out.count("yes") == 2
    assert "ceil(2.500) = 3" in out and "ceil(3.250) = 4" in out and "averageValue:" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    # Same load in tokens/h (8 + 4 tokens a request), as JSON.
    assert main([*args, "--tokens-per-hour", repr(rate * 12 * 3600), "--json", "--headroom", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["unit"] == "tokens/h" and data["replicas"] == 3 and data["replicas_before_headroom"] == 3
    assert data["load"]["input_len"] == 8 and data["load"]["output_len"] == 4
    assert data["capacity"]["req_s"] == pytest.approx(capacity)
    # Another request shape than the one benchmarked is refused.
    assert main([*args, "--rate", "1", "--input-len", "64"]) == 2
    assert "measured at input 8 / output 4" in capsys.readouterr().err


def test_plan_runs_the_benchmark_itself_with_bench_args(
    tiny_server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "run.json"
    bench = f"--base-url {tiny_server.url} --model {tiny_server.args[-1]} {BENCH_ARGS} --save {saved}"
    args = ["plan", "--bench", bench, "--slo-ttft-ms", "60000", "--rate", "0.5", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # the benchmark's own table went to stderr, not into the JSON
    assert "TTFT p99" in captured.err and f"saved {saved}" in captured.err
    assert [level["name"] for level in data["levels"]] == ["c=1", "c=2"]
    # The plan is the one the saved file gives.
    again = make_plan(load_run(saved), PlanSLO(ttft_ms=60000), OfferedLoad(8, 4, request_rate=0.5))
    assert data["replicas"] == again.replicas and data["capacity"]["req_s"] == again.capacity.req_s
    # Flags are checked before a benchmark runs: nothing listens on port 9.
    bad = ["plan", "--bench", "--base-url http://127.0.0.1:9 --model m", "--slo-ttft-ms", "5", "--rate", "0"]
    assert main(bad) == 2 and "offered load must be a positive" in capsys.readouterr().err
    assert main(["plan", "--slo-ttft-ms", "5", "--rate", "1"]) == 2
    assert "give either a results file" in capsys.readouterr().err


def test_plot_plan_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "plan.png"
    plot_plan(make_plan(SWEEP, SLO, OfferedLoad(IN_LEN, OUT_LEN, request_rate=5.0)), out)
    assert out.read_bytes()[:4] == b"\x89PNG"
