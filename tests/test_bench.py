"""``quire bench``: statistics on synthetic records, the seeded workload, the report and its JSON,
and one end-to-end run against a real ``quire serve`` of the tiny checkpoint. No timing assertions:
the numbers depend on the machine."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from quire.bench.client import ServeTarget, fetch_vocab_size
from quire.bench.report import BenchRun, format_table, load_run, save_run
from quire.bench.runner import SweepConfig, run_offline, run_serve
from quire.bench.stats import SLO, LevelResult, Percentiles, RequestRecord, aggregate, percentile
from quire.bench.workload import WARMUP, WorkloadConfig, arrival_offsets, fit_to_vocab, make_prompts
from quire.entrypoints.cli import build_parser

from server_fixtures import ServerProcess, running_server


@pytest.mark.parametrize(
    "data", [[5.0], [3.0, 1.0], [1.0, 2.0, 3.0, 4.0], list(np.linspace(-3, 17, 101)) + [1e6]]
)
@pytest.mark.parametrize("p", [0, 1, 25, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy(data: list[float], p: float) -> None:
    assert percentile(data, p) == pytest.approx(float(np.percentile(data, p)))


def test_percentile_of_nothing_is_none_and_rejects_bad_p() -> None:
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def _record(ttft: float, e2e: float, tokens: int, chunks: tuple[float, ...] = ()) -> RequestRecord:
    return RequestRecord(
        ok=True, ttft_s=ttft, e2e_s=e2e, output_tokens=tokens, prompt_tokens=10, chunk_times=chunks
    )


def test_tpot_and_itl_of_one_record() -> None:
    # 5 tokens: first at 0.1 s, done at 0.5 s -> 4 gaps of 0.1 s.
    record = _record(0.1, 0.5, 5, (0.1, 0.2, 0.3, 0.4, 0.5))
    assert record.tpot_s == pytest.approx(0.1)
    assert record.itl_s == pytest.approx([0.1] * 4)
    # Two tokens a chunk: each 0.2 s gap between chunks is 0.1 s per token.
    packed = _record(0.1, 0.5, 6, (0.1, 0.3, 0.5))
    assert packed.itl_s == pytest.approx([0.1, 0.1])
    assert _record(0.1, 0.1, 1, (0.1,)).tpot_s is None


def test_aggregate_throughput_latency_and_goodput() -> None:
    records = [
        _record(0.05, 0.45, 5, (0.05, 0.15, 0.25, 0.35, 0.45)),  # TTFT 50 ms, TPOT 100 ms
        _record(0.30, 0.50, 5, (0.30, 0.35, 0.40, 0.45, 0.50)),  # TTFT 300 ms, TPOT 50 ms
        _record(0.05, 0.25, 5, (0.05, 0.10, 0.15, 0.20, 0.25)),  # TTFT 50 ms, TPOT 50 ms
        RequestRecord(ok=False, error="HTTP 503: busy"),
    ]
    level = aggregate(records, 2.0, concurrency=4, slo=SLO(ttft_ms=100, tpot_ms=60))
    assert (level.requests, level.ok, level.failed) == (4, 3, 1)
    assert level.first_error == "HTTP 503: busy"
    assert level.output_tok_s == pytest.approx(15 / 2.0)
    assert level.total_tok_s == pytest.approx((15 + 30) / 2.0)
    assert level.req_s == pytest.approx(1.5)
    assert level.goodput_req_s == pytest.approx(0.5)  # only the third meets both targets
    assert level.ttft_ms.p50 == pytest.approx(50.0)
    assert level.tpot_ms.p99 == pytest.approx(np.percentile([100, 50, 50], 99))
    assert level.itl_ms.mean == pytest.approx(np.mean([100] * 4 + [50] * 8))
    assert level.e2e_ms.p90 == pytest.approx(np.percentile([450, 500, 250], 90))
    # Goodput with one target only, and none without any.
    assert aggregate(records, 2.0, concurrency=4, slo=SLO(tpot_ms=60)).goodput_req_s == pytest.approx(1.0)
    assert aggregate(records, 2.0, concurrency=4).goodput_req_s is None


def test_workload_is_seeded_and_levels_are_independent() -> None:
    config = WorkloadConfig(input_len=16, output_len=4, num_requests=5, vocab_lo=100, vocab_hi=500, seed=7)
    first = make_prompts(config, 0)
    assert first == make_prompts(config, 0)
    assert len(first) == 5 and all(len(p) == 16 and all(100 <= t < 500 for t in p) for p in first)
    # Another level, the warm-up and another seed all give other prompts.
    assert not {tuple(p) for p in first} & {tuple(p) for p in make_prompts(config, 1)}
    assert not {tuple(p) for p in first} & {tuple(p) for p in make_prompts(config, 0, 5, purpose=WARMUP)}
    other_seed = WorkloadConfig(
        input_len=16, output_len=4, num_requests=5, vocab_lo=100, vocab_hi=500, seed=8
    )
    assert make_prompts(other_seed, 0) != first


def test_shared_prefix_is_shared_within_a_level_only() -> None:
    config = WorkloadConfig(input_len=12, num_requests=4, vocab_hi=1000, shared_prefix_len=8)
    level0, level1 = make_prompts(config, 0), make_prompts(config, 1)
    assert len({tuple(p[:8]) for p in level0}) == 1
    assert len({tuple(p[8:]) for p in level0}) == 4
    assert level0[0][:8] != level1[0][:8]


def test_poisson_arrivals_are_seeded_and_increasing() -> None:
    config = WorkloadConfig(seed=3)
    offsets = arrival_offsets(config, 0, 4.0, 200)
    assert offsets == arrival_offsets(config, 0, 4.0, 200)
    assert offsets[0] == 0.0 and all(b >= a for a, b in zip(offsets, offsets[1:], strict=False))
    assert offsets != arrival_offsets(config, 1, 4.0, 200)
    with pytest.raises(ValueError):
        arrival_offsets(config, 0, 0.0, 3)


@pytest.mark.parametrize(
    "kwargs",
    [{"input_len": 0}, {"vocab_lo": 10, "vocab_hi": 10}, {"shared_prefix_len": 200}, {"num_requests": 0}],
)
def test_workload_config_rejects_nonsense(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        WorkloadConfig(**kwargs)


def _sample_run() -> BenchRun:
    records = [
        _record(0.01 * i, 0.1 + 0.01 * i, 4, (0.01 * i, 0.05, 0.08, 0.1 + 0.01 * i)) for i in range(1, 5)
    ]
    levels = (
        aggregate(records, 1.0, concurrency=1, slo=SLO(ttft_ms=20)),
        aggregate([RequestRecord(ok=False, error="boom")], 0.5, concurrency=8),
    )
    return BenchRun(mode="serve", levels=levels, label="quire-test", config={"model": "m", "workload": {}})


def test_report_table_has_the_columns() -> None:
    table = format_table(_sample_run())
    for column in ("level", "ok", "failed", "out tok/s", "total tok/s", "req/s", "elapsed s", "goodput"):
        assert column in table
    for metric in ("TTFT", "TPOT", "ITL", "E2E"):
        for p in ("p50", "p90", "p99"):
            assert f"{metric} {p}" in table
    assert "c=1" in table and "c=8" in table and "quire-test" in table
    assert "first error at c=8: boom" in table


def test_save_load_round_trip(tmp_path: Path) -> None:
    run = _sample_run()
    path = tmp_path / "run.json"
    save_run(run, path)
    data = json.loads(path.read_text())  # strict JSON: no NaN for the empty level
    assert data["label"] == "quire-test" and data["levels"][1]["ttft_ms"]["p50"] is None
    assert load_run(path) == run
    data["format_version"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format_version"):
        load_run(path)


def test_level_result_validates_counts() -> None:
    with pytest.raises(ValueError):
        LevelResult(None, None, 3, 1, 1, 1.0, 0, 0, 0.0, 0.0, 0.0, ttft_ms=Percentiles())


def test_cli_parses_bench_commands() -> None:
    parser = build_parser()
    ns = parser.parse_args(
        ["bench", "serve", "--model", "m", "--concurrency", "1,8,32", "--slo-ttft-ms", "200"]
    )
    assert ns.concurrency == (1, 8, 32) and ns.slo_ttft_ms == 200
    ns = parser.parse_args(["bench", "serve", "--model", "m", "--request-rate", "2.5"])
    assert ns.request_rate == (2.5,)
    ns = parser.parse_args(["bench", "plot", "a.json", "b.json", "-o", "out.png"])
    assert ns.results == ["a.json", "b.json"]
    with pytest.raises(ValueError):
        SweepConfig(concurrency=(1, 2), request_rates=(1.0,))


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from quire.bench.plot import plot_runs

    out = tmp_path / "out.png"
    plot_runs([_sample_run(), _sample_run()], out)
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir: Callable[[str], Path]) -> Iterator[ServerProcess]:
    """``quire serve`` of the tiny Llama checkpoint (vocabulary: 512 ids)."""
    with running_server(str(tiny_model_dir("llama"))) as server:
        yield server


def test_bench_serve_against_a_real_server(tiny_server: ServerProcess) -> None:
    pytest.importorskip("aiohttp")
    model = tiny_server.args[-1]
    # The tiny checkpoint's vocabulary has 512 ids.
    workload = WorkloadConfig(input_len=8, output_len=4, num_requests=4, vocab_lo=10, vocab_hi=500)
    sweep = SweepConfig(concurrency=(1, 2), warmup=1, slo=SLO(ttft_ms=60_000, tpot_ms=60_000))
    run = run_serve(ServeTarget(base_url=tiny_server.url, model=model), workload, sweep, progress=False)
    assert [level.concurrency for level in run.levels] == [1, 2]
    for level in run.levels:
        assert (level.ok, level.failed) == (4, 0), level.first_error
        assert level.output_tokens == 16 and level.input_tokens == 32
        for value in (level.output_tok_s, level.total_tok_s, level.req_s, level.goodput_req_s):
            assert value is not None and math.isfinite(value) and value > 0
        for stat in (level.ttft_ms, level.tpot_ms, level.itl_ms, level.e2e_ms):
            assert stat.p50 is not None and math.isfinite(stat.p99)
    assert "c=2" in format_table(run)


def test_bench_serve_fits_the_default_id_range_to_the_served_vocabulary(tiny_server: ServerProcess) -> None:
    # Was: the README's example drew ids up to 30000 against the demo's 2048 and every request
    # failed; the server now reports vocab_size in /v1/models and the range is cut to it.
    pytest.importorskip("aiohttp")
    target = ServeTarget(base_url=tiny_server.url, model=tiny_server.args[-1])
    assert fetch_vocab_size(target) == 512
    workload = WorkloadConfig(input_len=8, output_len=2, num_requests=2)  # default ids up to 30000
    run = run_serve(target, workload, SweepConfig(concurrency=(2,)), progress=False)
    assert (run.levels[0].ok, run.levels[0].failed) == (2, 0), run.levels[0].first_error
    assert run.config["workload"]["vocab_hi"] == 512


def test_fetch_vocab_size_is_none_where_the_server_does_not_say() -> None:
    assert fetch_vocab_size(ServeTarget(base_url="http://127.0.0.1:9", model="m"), timeout_s=2) is None
    fitted = fit_to_vocab(WorkloadConfig(vocab_lo=100, vocab_hi=30000), 64)
    assert (fitted.vocab_lo, fitted.vocab_hi) == (32, 64)
    assert fit_to_vocab(WorkloadConfig(vocab_hi=500), 512).vocab_hi == 500


def test_bench_offline_runs_the_same_workload(tiny_llama_dir: Path) -> None:
    workload = WorkloadConfig(input_len=8, output_len=4, num_requests=4, vocab_lo=10, vocab_hi=500)
    engine = {"model": str(tiny_llama_dir), "dtype": "float32", "kv_cache_memory": "32MiB", "max_num_seqs": 2}
    run = run_offline(
        {**engine, "max_model_len": 512, "show_progress": False}, workload, warmup=1, progress=False
    )
    (level,) = run.levels
    assert run.mode == "offline" and level.concurrency == 2
    assert (level.ok, level.output_tokens, level.input_tokens) == (4, 16, 32)
    assert math.isfinite(level.output_tok_s) and level.output_tok_s > 0


def test_bench_offline_fits_the_default_id_range_to_a_small_vocabulary(tiny_llama_dir: Path) -> None:
    workload = WorkloadConfig(input_len=8, output_len=2, num_requests=2)  # default ids go up to 30000
    engine = {
        "model": str(tiny_llama_dir),
        "kv_cache_memory": "32MiB",
        "max_model_len": 512,
        "show_progress": False,
    }
    run = run_offline(engine, workload, progress=False)
    assert run.levels[0].ok == 2
    assert run.config["workload"]["vocab_hi"] == 512


def test_benchmarks_carry_their_own_tools() -> None:
    # Was: benchmarks/*.py ran ../shared/bench/{loadgen,make_model}.py, outside the repository,
    # so they failed in a fresh clone.
    import subprocess
    import sys

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    for path in bench_dir.rglob("*"):
        if path.is_file() and path.suffix in (".py", ".md", ".sh"):
            text = path.read_text()
            assert "shared/bench" not in text and '"shared"' not in text, path
    for tool in ("loadgen.py", "make_model.py"):
        result = subprocess.run(
            [sys.executable, str(bench_dir / "tools" / tool), "--help"], capture_output=True, text=True
        )
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
