"""The async engine client with the engine core in a thread, and the ZMQ message codec. No HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from quire import LLM, SamplingParams
from quire.config import EngineArgs
from quire.core.outputs import EngineCoreOutput, StepStats
from quire.core.request import EngineCoreRequest
from quire.frontend import protocol
from quire.frontend.async_client import EngineDeadError, InProcessEngineClient, RequestStream
from quire.frontend.process_client import ProcessEngineClient
from quire.sampling import CompletionOutput, RequestOutput
from quire.tokenizer import Tokenizer


def _args(model: Path) -> EngineArgs:
    return EngineArgs(
        model=str(model), dtype="float32", num_kv_blocks=64, max_model_len=256, show_progress=False
    )


async def _collect(client: InProcessEngineClient, prompt, params: SamplingParams) -> RequestOutput:
    text: dict[int, str] = {}
    tokens: dict[int, list[int]] = {}
    last = None
    async for delta in client.generate(prompt, params):
        for seq in delta.outputs:
            text[seq.index] = text.get(seq.index, "") + seq.text
            tokens.setdefault(seq.index, []).extend(seq.token_ids)
        last = delta
    assert last is not None and last.finished
    for seq in last.outputs:
        seq.text, seq.token_ids = text[seq.index], tokens[seq.index]
    return last


def test_in_process_client_matches_offline(tiny_llama_dir: Path) -> None:
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = LLM(**vars(_args(tiny_llama_dir))).generate("hello world", params)[0].outputs[0]

    async def run() -> None:
        client = InProcessEngineClient(_args(tiny_llama_dir))
        await client.start()
        try:
            result = await _collect(client, "hello world", params)
            assert result.outputs[0].token_ids == expected.token_ids
            assert result.outputs[0].text == expected.text
            # Several at once, n=2, and a stop string cut on the client side.
            stop = expected.text[3:5]
            runs = await asyncio.gather(
                _collect(client, "hello world", SamplingParams(max_tokens=10, temperature=0.0, stop=[stop])),
                _collect(
                    client,
                    {"prompt_token_ids": [5, 6, 7]},
                    SamplingParams(n=2, max_tokens=4, ignore_eos=True),
                ),
            )
            assert runs[0].outputs[0].text == expected.text[: expected.text.find(stop)]
            assert runs[0].outputs[0].finish_reason == "stop"
            assert [len(s.token_ids) for s in runs[1].outputs] == [4, 4]
            await _settle(client)
            assert client.last_stats is not None and client.last_stats.kv_cache_usage == 0.0
            assert client.num_unfinished_requests == 0 and client.num_unfinished_seqs == 0
        finally:
            await client.shutdown()
        with pytest.raises(EngineDeadError):
            await anext(client.generate("x", params))

    asyncio.run(run())


async def _settle(client: InProcessEngineClient) -> None:
    deadline = time.monotonic() + 10
    while client.last_stats is None or client.last_stats.num_running or client.last_stats.kv_cache_usage:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


def test_abort_frees_blocks_at_once(tiny_llama_dir: Path) -> None:
    async def run() -> None:
        client = InProcessEngineClient(_args(tiny_llama_dir))
        await client.start()
        try:
            params = SamplingParams(max_tokens=200, ignore_eos=True)
            generator = client.generate({"prompt_token_ids": list(range(10, 50))}, params)
            first = await anext(generator)
            assert not first.finished
            assert client.last_stats is not None and client.last_stats.kv_cache_usage > 0
            await generator.aclose()  # closing the iterator aborts the request
            await _settle(client)
            assert client.num_unfinished_requests == 0
            with pytest.raises(ValueError, match="context length"):
                await anext(client.generate({"prompt_token_ids": [5] * 300}, params))
        finally:
            await client.shutdown()

    asyncio.run(run())


def test_stream_merges_unread_deltas() -> None:
    async def run() -> None:
        stream = RequestStream("r", 1)

        def delta(text: str, ids: list[int], finish: str | None) -> RequestOutput:
            seq = CompletionOutput(0, text, ids, finish_reason=finish)
            return RequestOutput("r", None, [1], [seq], finished=finish is not None)

        stream.put(delta("a", [1], None))
        stream.put(delta("b", [2], None))
        stream.put(delta("c", [3], "length"))
        outputs = [out async for out in stream]
        assert len(outputs) == 1
        assert outputs[0].outputs[0].text == "abc" and outputs[0].outputs[0].token_ids == [1, 2, 3]
        assert outputs[0].finished and outputs[0].outputs[0].finish_reason == "length"

    asyncio.run(run())


def test_protocol_round_trip() -> None:
    request = EngineCoreRequest(
        "r1",
        [1, 2, 3],
        SamplingParams(n=2, stop=["x"], logit_bias={7: 1.5}, seed=3),
        frozenset({2}),
        12.5,
        priority=1,
    )
    decoded = protocol.input_decoder().decode(protocol.input_encoder().encode(protocol.AddRequest(request)))
    assert isinstance(decoded, protocol.AddRequest) and decoded.request == request

    class FakeLogprobs:  # the sampler's TokenLogprobs shape
        def __init__(self) -> None:
            self.token_id, self.logprob, self.rank = 5, -0.5, 1
            self.top_token_ids, self.top_logprobs = [5, 6], [-0.5, -1.0]

    output = EngineCoreOutput("r1", 1, [5], [vars(FakeLogprobs())], "length", None, 16, 3.0)
    stats = StepStats(1, 2, 0.25, 10, 8, 2, 0, 100, 50)
    batch = protocol.output_decoder().decode(
        protocol.output_encoder().encode(protocol.OutputBatch([output], stats))
    )
    assert isinstance(batch, protocol.OutputBatch) and batch.stats == stats
    got = batch.outputs[0]
    assert (got.request_id, got.index, got.new_token_ids, got.finish_reason) == ("r1", 1, [5], "length")
    assert got.new_logprobs[0].top_token_ids == [5, 6] and got.num_cached_tokens == 16


def test_process_client_send_never_blocks_without_engine(tiny_llama_dir: Path) -> None:
    # A PUSH socket with no connected peer blocks a plain send forever: that froze the event loop
    # (and so SIGTERM) when an abort or the Shutdown message went to an engine that had just died.
    client = ProcessEngineClient(
        _args(tiny_llama_dir), str(tiny_llama_dir), Tokenizer.from_dir(tiny_llama_dir)
    )
    client._bind()  # sockets and directory, but no engine process connected
    socket_dir = client.socket_dir
    assert socket_dir is not None and Path(socket_dir).is_dir()
    sender = threading.Thread(
        target=lambda: [client._send(m) for m in (protocol.AbortRequests(["r"]), protocol.Shutdown())],
        daemon=True,
    )
    sender.start()
    sender.join(5)
    assert not sender.is_alive(), "a send to a missing engine blocked"
    asyncio.run(client.shutdown())
    assert not Path(socket_dir).exists()


def test_process_client_restarts_after_engine_kill(tiny_llama_dir: Path) -> None:
    async def run() -> None:
        client = ProcessEngineClient(
            _args(tiny_llama_dir), str(tiny_llama_dir), Tokenizer.from_dir(tiny_llama_dir)
        )
        deaths: list[str] = []
        client.add_death_listener(deaths.append)
        await client.start()
        try:
            first_dir, first_pid = client.socket_dir, client.pid
            assert first_dir is not None and first_pid is not None
            params = SamplingParams(max_tokens=200, ignore_eos=True)
            generator = client.generate({"prompt_token_ids": [5, 6, 7]}, params)
            await anext(generator)
            os.kill(first_pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError, match="exited"):
                async for _ in generator:
                    pass
            assert len(deaths) == 1 and "exited" in deaths[0]
            assert not client.is_ready and client.num_unfinished_seqs == 0
            assert client.last_stats is not None and client.last_stats.num_running == 0
            with pytest.raises(EngineDeadError):
                await anext(client.generate("x", params))

            await client.restart()
            assert client.is_ready and client.pid != first_pid and client.socket_dir != first_dir
            assert not Path(first_dir).exists()
            result = await _collect(client, {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4))
            assert len(result.outputs[0].token_ids) == 4
            assert len(deaths) == 1  # a restart is not a death
        finally:
            await client.shutdown()
        assert deaths == deaths[:1] and client.socket_dir is not None
        assert not Path(client.socket_dir).exists()

    asyncio.run(run())


def test_process_client_gives_up_on_an_engine_that_never_finishes_loading(tiny_llama_dir: Path) -> None:
    # Before: _wait_ready had no deadline, so an engine hung while loading kept readiness at 503
    # forever. Importing torch alone takes longer than this timeout, so the engine cannot be ready.
    async def run() -> None:
        client = ProcessEngineClient(
            _args(tiny_llama_dir), str(tiny_llama_dir), Tokenizer.from_dir(tiny_llama_dir), load_timeout=0.2
        )
        with pytest.raises(EngineDeadError, match="did not finish loading within 0.2 s"):
            await client.start()
        proc = client._proc
        assert proc is not None and proc.poll() is not None  # killed, not left loading
        socket_dir = client.socket_dir
        await client.shutdown()
        assert socket_dir is None or not Path(socket_dir).exists()

    asyncio.run(run())
    with pytest.raises(ValueError, match="load_timeout"):
        ProcessEngineClient(
            _args(tiny_llama_dir), str(tiny_llama_dir), Tokenizer.from_dir(tiny_llama_dir), load_timeout=0
        )
