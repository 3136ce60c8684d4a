"""The ``quire`` command line: ``quire generate``, ``quire serve`` and ``quire bench``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

from quire.config import (
    KV_CACHE_DTYPE_ALIASES,
    KV_CACHE_DTYPES,
    QUANTIZATION_METHODS,
    QUANTIZED_ACTIVATIONS,
    EngineArgs,
)
from quire.serving.ray_cli import add_replica_arguments
from quire.structured.tool_parsers import tool_parser_names


def _note_default_model(ns: argparse.Namespace) -> None:
    """Say which model runs when none is given (the real default, or the random demo)."""
    if ns.model is None:
        from quire.models.default_model import default_model

        print(default_model().notice, file=sys.stderr)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="local Hugging Face model directory or .gguf file (default: demo)",
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--kv-cache-memory", default="1GiB", help="KV cache budget, e.g. 2GiB or 512MiB")
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        # The aliases are choices too, so a typo is refused here, before any engine starts.
        choices=[*KV_CACHE_DTYPES, *KV_CACHE_DTYPE_ALIASES],
        help="dtype of the KV cache: auto (default) = the model's compute dtype; bfloat16/bf16 under "
        "fp32 compute halves the KV memory (twice the tokens for the same --kv-cache-memory) and the "
        "bytes attention reads per step, but K/V are rounded to bf16, so logits move slightly",
    )
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--no-chunked-prefill", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quantization",
        default=None,
        choices=list(QUANTIZATION_METHODS),
        help="keep a Hugging Face checkpoint's decoder linears in int8 (Q8_0) or int4 (Q4_1) blocks; "
        "not for .gguf files, which are used as stored",
    )
    parser.add_argument("--quantized-activations", default=None, choices=list(QUANTIZED_ACTIVATIONS), help="int8: quantize activations entering Q8_0/Q4_0/Q4_1 weights (faster decode, less exact)")  # fmt: skip


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        model=ns.model,
        dtype=ns.dtype,
        device=ns.device,
        max_model_len=ns.max_model_len,
        max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        kv_cache_memory=ns.kv_cache_memory,
        block_size=ns.block_size,
        enable_prefix_caching=not ns.no_prefix_caching,
        enable_chunked_prefill=not ns.no_chunked_prefill,
        seed=ns.seed,
        quantization=ns.quantization,
        quantized_activations=ns.quantized_activations,
        kv_cache_dtype=ns.kv_cache_dtype,
    )


def _generate(ns: argparse.Namespace) -> int:
    from quire.frontend.llm_engine import LLMEngine
    from quire.frontend.output_processor import OutputKind
    from quire.sampling import SamplingParams

    _note_default_model(ns)
    params = SamplingParams(
        max_tokens=ns.max_tokens,
        temperature=ns.temperature,
        top_p=ns.top_p,
        top_k=ns.top_k,
        seed=ns.sampling_seed,
        stop=ns.stop or None,
        ignore_eos=ns.ignore_eos,
    )
    engine = LLMEngine(engine_args_from(ns))
    prompt: str | dict = ns.prompt
    if ns.chat:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": ns.prompt}])
        prompt = {"prompt_token_ids": engine.tokenizer.encode(text, add_special_tokens=False)}
    engine.add_request(prompt, params, kind=OutputKind.DELTA)
    finish_reason = None
    while engine.has_unfinished_requests():
        for result in engine.step():
            completion = result.outputs[0]
            sys.stdout.write(completion.text)
            sys.stdout.flush()
            finish_reason = completion.finish_reason or finish_reason
    sys.stdout.write("\n")
    print(f"[finish_reason={finish_reason}]", file=sys.stderr)
    return 0


def _serve(ns: argparse.Namespace) -> int:
    from quire.server.serve import serve
    from quire.server.settings import ServerSettings

    _note_default_model(ns)
    api_keys = list(ns.api_key or [])
    settings = ServerSettings(
        host=ns.host,
        port=ns.port,
        served_model_names=tuple(ns.served_model_name or ()),
        api_keys=tuple(api_keys),
        api_key_file=ns.api_key_file,
        requests_per_minute=ns.requests_per_minute,
        tokens_per_minute=ns.tokens_per_minute,
        max_waiting=ns.max_waiting,
        max_body_bytes=ns.max_body_bytes,
        max_prompt_bytes=ns.max_prompt_bytes,
        request_timeout=ns.request_timeout if ns.request_timeout > 0 else None,
        shutdown_timeout=ns.shutdown_timeout,
        log_prompts=ns.log_prompts,
        header_timeout=ns.header_timeout,
        body_timeout=ns.body_timeout,
        max_engine_restarts=ns.max_engine_restarts,
        engine_restart_window=ns.engine_restart_window,
        engine_load_timeout=ns.engine_load_timeout,
        trust_request_chat_template=ns.trust_request_chat_template,
        enable_auto_tool_choice=ns.enable_auto_tool_choice,
        tool_call_parser=ns.tool_call_parser,
        chat_template=ns.chat_template,
        generation_config=ns.generation_config,
        allowed_origins=tuple(ns.allowed_origins or ()),
        allowed_methods=tuple(ns.allowed_methods),
        allowed_headers=tuple(ns.allowed_headers),
        root_path=ns.root_path,
        ssl_keyfile=ns.ssl_keyfile,
        ssl_certfile=ns.ssl_certfile,
    )
    # One JSON line per request is part of the service, whatever --log-level says for the rest.
    logging.getLogger("quire.requests").setLevel(logging.INFO)
    from quire.serving.ray_cli import serve_on_ray, wants_ray

    if wants_ray(ns):
        return serve_on_ray(engine_args_from(ns), settings, ns)
    return serve(engine_args_from(ns), settings, log_level=ns.log_level)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    parser.add_argument(
        "--served-model-name",
        # vLLM's spelling (`--served-model-name a b`) keeps working; repeating the option or
        # separating names with commas adds more. check_served_model_names() refuses the one
        # ambiguous case: a model path swallowed as a name.
        nargs="+",
        action="extend",
        type=_served_names,
        default=None,
        metavar="NAME",
        help="name(s) clients use as 'model' (default: the model path); give the model path first, "
        "or use --served-model-name=NAME",
    )
    parser.add_argument(
        "--api-key", action="append", help="accept this Bearer key (repeatable); none = no auth"
    )
    parser.add_argument("--api-key-file", default=None, help="JSON file of keys, tenants and rate limits")
    parser.add_argument(
        "--requests-per-minute", type=float, default=None, help="default per-tenant request rate"
    )
    parser.add_argument("--tokens-per-minute", type=float, default=None, help="default per-tenant token rate")
    parser.add_argument(
        "--max-waiting", type=int, default=256, help="sequences queued beyond --max-num-seqs before 503s"
    )
    parser.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body accepted")
    parser.add_argument(
        "--max-prompt-bytes",
        type=int,
        default=2 << 20,
        help="largest text prompt (UTF-8 bytes) accepted; checked before tokenizing",
    )
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (0: none)")
    parser.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="seconds to let requests finish after SIGTERM"
    )
    parser.add_argument(
        "--log-prompts", action="store_true", help="put prompt and completion text in request logs"
    )
    parser.add_argument(
        "--header-timeout", type=float, default=30.0, help="seconds a client has to send a request's headers"
    )
    parser.add_argument(
        "--body-timeout", type=float, default=30.0, help="seconds a client has to send a request's body (408)"
    )
    parser.add_argument(
        "--max-engine-restarts",
        type=int,
        default=3,
        help="restarts of a dead engine allowed within --engine-restart-window; beyond: exit 1",
    )
    parser.add_argument(
        "--engine-restart-window", type=float, default=600.0, help="seconds over which engine restarts count"
    )
    parser.add_argument(
        "--engine-load-timeout",
        type=float,
        default=1800.0,
        help="seconds an engine (re)start may take to load the model before it counts as failed",
    )
    parser.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="accept chat templates sent with requests (chat_template_kwargs.chat_template); off: 400",
    )
    parser.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='allow tool_choice "auto" (the default with tools): the model\'s output is parsed for calls',
    )
    parser.add_argument(
        "--tool-call-parser",
        default=None,
        choices=tool_parser_names(),
        help='the model\'s tool-call output format, for tool_choice "auto"',
    )
    add_http_arguments(parser)


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    """Chat template and sampling defaults, CORS, proxy prefix and TLS (vLLM's flag names)."""
    parser.add_argument(
        "--chat-template",
        default=None,
        help="chat template to use instead of the model's: a file path, or the template itself",
    )
    parser.add_argument(
        "--generation-config",
        default="auto",
        help="default sampling parameters: 'auto' (the model's generation_config.json), "
        "'vllm' or 'none' (neutral), or a folder holding a generation_config.json",
    )
    parser.add_argument(
        "--allowed-origins",
        type=_json_list,
        default=None,
        help="CORS: JSON list of allowed origins, e.g. '[\"https://app.example\"]' (default: no CORS)",
    )
    parser.add_argument(
        "--allowed-methods", type=_json_list, default=["*"], help='CORS: JSON list of methods (default ["*"])'
    )
    parser.add_argument(
        "--allowed-headers", type=_json_list, default=["*"], help='CORS: JSON list of headers (default ["*"])'
    )
    parser.add_argument(
        "--root-path", default="", help="path prefix a reverse proxy strips before forwarding, e.g. /llm"
    )
    parser.add_argument("--ssl-keyfile", default=None, help="TLS private key file (with --ssl-certfile)")
    parser.add_argument("--ssl-certfile", default=None, help="TLS certificate file (with --ssl-keyfile)")


def _json_list(text: str) -> list[str]:
    """An argparse type for a JSON list of strings, as vLLM's CORS flags take."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings such as '[\"*\"]', got {text!r}")
    return value


def _served_names(text: str) -> list[str]:
    """One ``--served-model-name`` value: a name, or several separated by commas."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a model name, got {text!r}")
    return names


def check_served_model_names(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    """Refuse ``--served-model-name NAME /path/to/model``: the option takes one or more values,
    so argparse reads the path as a second name and quire would silently serve the demo model."""
    names = _flatten(getattr(ns, "served_model_name", None) or [])
    if getattr(ns, "command", None) != "serve" or ns.model is not None:
        ns.served_model_name = names or None
        return
    paths = [name for name in names if os.path.exists(name)]
    if paths:
        parser.error(
            f"{paths[0]!r} was read as a --served-model-name, so no model was given and quire would "
            f"serve its demo model. Put the model first (quire serve {paths[0]} --served-model-name "
            f"NAME) or write --served-model-name=NAME"
        )
    ns.served_model_name = names or None


def _flatten(values: list[str | list[str]]) -> list[str]:
    # action="extend" with nargs="+" and a list-returning type gives a list of lists.
    out: list[str] = []
    for value in values:
        out.extend(value if isinstance(value, list) else [value])
    return out


def _csv(kind: type) -> Callable[[str], tuple]:
    """An argparse type for comma-separated values such as ``1,8,32``."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__}s, got {text!r}"
            ) from exc

    return parse


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request (EOS ignored)")
    parser.add_argument("--num-requests", type=int, default=64, help="measured requests per level")
    parser.add_argument(
        "--shared-prefix-len", type=int, default=0, help="leading tokens shared within a level"
    )
    parser.add_argument("--vocab-lo", type=int, default=100, help="prompt token ids are drawn from [lo, hi)")
    parser.add_argument(
        "--vocab-hi",
        type=int,
        default=30000,
        help="cut to the model's vocabulary where it is smaller (offline, or a server that reports it)",
    )
    parser.add_argument("--warmup", type=int, default=0, help="uncounted requests before each level")
    parser.add_argument("--label", default="", help="name of this run in tables, files and plots")
    parser.add_argument("--save", default=None, metavar="FILE.json", help="write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _workload_from(ns: argparse.Namespace):
    from quire.bench.workload import WorkloadConfig

    return WorkloadConfig(
        input_len=ns.input_len,
        output_len=ns.output_len,
        num_requests=ns.num_requests,
        vocab_lo=ns.vocab_lo,
        vocab_hi=ns.vocab_hi,
        seed=ns.seed,
        shared_prefix_len=ns.shared_prefix_len,
    )


def _finish_bench(ns: argparse.Namespace, run) -> int:
    from quire.bench.report import format_table, save_run

    print(format_table(run))
    if ns.save:
        save_run(run, ns.save)
        print(f"saved {ns.save}", file=sys.stderr)
    if getattr(ns, "plot", None):
        from quire.bench.plot import plot_runs

        plot_runs([run], ns.plot)
        print(f"plotted {ns.plot}", file=sys.stderr)
    # Non-zero when any request failed, so scripts notice a broken server.
    return 1 if any(level.failed for level in run.levels) else 0


def _bench_serve(ns: argparse.Namespace) -> int:
    from quire.bench.client import ServeTarget
    from quire.bench.runner import SweepConfig, run_serve
    from quire.bench.stats import SLO

    rates = ns.request_rate or ()
    concurrency = ns.concurrency if ns.concurrency is not None else (() if rates else (1, 8, 32))
    sweep = SweepConfig(
        concurrency=concurrency,
        request_rates=rates,
        warmup=ns.warmup,
        slo=SLO(ttft_ms=ns.slo_ttft_ms, tpot_ms=ns.slo_tpot_ms),
    )
    target = ServeTarget(
        base_url=ns.base_url,
        model=ns.model,
        api_key=ns.api_key,
        timeout_s=ns.timeout,
        temperature=ns.temperature,
    )
    run = run_serve(target, _workload_from(ns), sweep, label=ns.label, progress=not ns.no_progress)
    return _finish_bench(ns, run)


def _bench_offline(ns: argparse.Namespace) -> int:
    from dataclasses import asdict

    from quire.bench.runner import run_offline

    _note_default_model(ns)
    engine_kwargs = {**asdict(engine_args_from(ns)), "show_progress": not ns.no_progress}
    run = run_offline(
        engine_kwargs, _workload_from(ns), warmup=ns.warmup, label=ns.label, progress=not ns.no_progress
    )
    return _finish_bench(ns, run)


def _bench_plot(ns: argparse.Namespace) -> int:
    from quire.bench.plot import plot_runs
    from quire.bench.report import load_run

    plot_runs([load_run(path) for path in ns.results], ns.output)
    print(f"plotted {ns.output}", file=sys.stderr)
    return 0


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmark a server (serve), the offline engine, or plot results")
    modes = bench.add_subparsers(dest="bench_command", required=True)

    srv = modes.add_parser("serve", help="load-test any OpenAI-compatible /v1/completions server")
    srv.add_argument("--base-url", default="http://127.0.0.1:8000")
    srv.add_argument("--model", required=True, help="the model name the server serves")
    srv.add_argument("--api-key", default=None, help="sent as a Bearer token")
    srv.add_argument(
        "--concurrency", type=_csv(int), default=None, help="comma-separated levels (default 1,8,32)"
    )
    srv.add_argument(
        "--request-rate",
        type=_csv(float),
        default=None,
        help="Poisson arrivals at these requests/s (comma-separated levels) instead of a concurrency sweep",
    )
    srv.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT target")
    srv.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT target")
    srv.add_argument("--temperature", type=float, default=0.0)
    srv.add_argument("--timeout", type=float, default=1800.0, help="seconds per request")
    srv.add_argument("--seed", type=int, default=0, help="seed of prompts and arrival times")
    srv.add_argument("--plot", default=None, metavar="FILE.png", help="plot throughput and p99 latencies")
    add_workload_arguments(srv)
    srv.set_defaults(handler=_bench_serve)

    off = modes.add_parser("offline", help="the same workload through LLM.generate in this process")
    add_engine_arguments(off)  # its --seed seeds both the engine and the prompts
    add_workload_arguments(off)
    off.set_defaults(handler=_bench_offline)

    plot = modes.add_parser("plot", help="overlay saved results (--save files) in one chart")
    plot.add_argument("results", nargs="+", help="JSON files written by --save")
    plot.add_argument("-o", "--output", required=True, metavar="FILE.png")
    plot.set_defaults(handler=_bench_plot)


def _plan_results(ns: argparse.Namespace) -> str:
    """The results file to plan from: the one given, or one ``quire bench serve ARGS`` writes now
    (the same command, run in this process; its table goes to stderr under --json)."""
    import contextlib
    import shlex
    import tempfile

    if (ns.results is None) == (ns.bench is None):
        raise ValueError("give either a results file (quire bench serve --save FILE) or --bench 'ARGS'")
    if ns.results is not None:
        return ns.results
    bench = parse_args(["bench", "serve", *shlex.split(ns.bench)])
    if bench.save is None:
        bench.save = os.path.join(tempfile.mkdtemp(prefix="quire-plan-"), "bench.json")
    # The bench table's goodput column then counts requests within the plan's SLO.
    bench.slo_ttft_ms = bench.slo_ttft_ms if bench.slo_ttft_ms is not None else ns.slo_ttft_ms
    bench.slo_tpot_ms = bench.slo_tpot_ms if bench.slo_tpot_ms is not None else ns.slo_tpot_ms
    with contextlib.redirect_stdout(sys.stderr if ns.json else sys.stdout):
        bench.handler(bench)  # failed requests fail their level's SLO check; no need to stop here
    return bench.save


def _plan(ns: argparse.Namespace) -> int:
    from quire.bench.plan import (
        OfferedLoad,
        PlanSLO,
        check_headroom,
        check_offered,
        make_plan,
        resolve_lengths,
    )
    from quire.bench.plan_report import format_levels, format_plan, plan_to_dict, plot_plan
    from quire.bench.report import load_run

    # Every flag is checked before --bench spends minutes measuring.
    slo = PlanSLO(ttft_ms=ns.slo_ttft_ms, tpot_ms=ns.slo_tpot_ms, percentile=ns.percentile)
    check_offered(ns.rate, ns.tokens_per_hour)
    check_headroom(ns.headroom)
    run = load_run(_plan_results(ns))
    input_len, output_len = resolve_lengths(run, ns.input_len, ns.output_len)
    load = OfferedLoad(input_len, output_len, request_rate=ns.rate, tokens_per_hour=ns.tokens_per_hour)
    plan = make_plan(run, slo, load, headroom=ns.headroom)
    if ns.json:
        print(json.dumps(plan_to_dict(plan), indent=2))
    else:
        print(format_levels(plan))
        print()
        print(format_plan(plan))
    if ns.plot:
        plot_plan(plan, ns.plot)
        print(f"plotted {ns.plot}", file=sys.stderr)
    return 0


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser("plan", help="replicas, queue depth and HPA target for a load, from bench results")
    plan.add_argument("results", nargs="?", default=None, help="JSON written by quire bench serve --save")
    plan.add_argument(
        "--bench",
        default=None,
        metavar="ARGS",
        help="instead of a results file, run quire bench serve ARGS first, e.g. "
        "--bench '--base-url URL --model NAME --concurrency 1,8,32 --save run.json'",
    )
    plan.add_argument("--slo-ttft-ms", type=float, default=None, help="time-to-first-token target")
    plan.add_argument("--slo-tpot-ms", type=float, default=None, help="time-per-output-token target")
    plan.add_argument("--percentile", type=int, default=99, choices=(50, 90, 99), help="SLO percentile")
    load = plan.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, default=None, help="offered load in requests/s")
    load.add_argument(
        "--tokens-per-hour", type=float, default=None, help="offered load in (prompt + output) tokens/hour"
    )
    plan.add_argument("--input-len", type=int, default=None, help="prompt tokens (default: the benchmark's)")
    plan.add_argument("--output-len", type=int, default=None, help="output tokens (default: the benchmark's)")
    plan.add_argument("--headroom", type=float, default=1.3, help="spare capacity factor (>= 1)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--plot", default=None, metavar="FILE.png", help="latency against load, SLO lines")
    plan.set_defaults(handler=_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quire", description="quire: an LLM inference server")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt and stream the text to stdout")
    add_engine_arguments(gen)
    gen.add_argument("--prompt", default="Once upon a time", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(handler=_generate)

    srv = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    add_engine_arguments(srv)
    add_server_arguments(srv)
    add_replica_arguments(srv)
    srv.set_defaults(handler=_serve)

    add_bench_parser(sub)
    add_plan_parser(sub)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a ``quire`` command line, with the checks argparse cannot express on its own."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    check_served_model_names(parser, ns)
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return ns.handler(ns)
    except ValueError as exc:  # user errors: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
