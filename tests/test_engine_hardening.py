"""No single request can take the engine down (issue 11, defects 1 and 10), on a real tiny model.

- The three requests that used to kill the engine are refused by ``SamplingParams`` itself.
- With that validation bypassed, the sampler still stays inside the vocabulary and the engine
  keeps serving.
- A request the model runner refuses (a token id past the vocabulary) finishes with
  ``finish_reason="error"`` while the requests beside it complete, offline and through the
  in-process async client; its KV blocks return to the pool.
- A tokenizer whose ids reach past the model's vocabulary is refused at start-up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import shutil
from pathlib import Path

import msgspec
import pytest

from quire import LLM, SamplingParams
from quire.config import EngineArgs
from quire.frontend.async_client import EngineDeadError, InProcessEngineClient
from quire.frontend.input_processor import InputProcessor
from quire.frontend.llm_engine import LLMEngine
from quire.frontend.output_processor import OutputKind
from quire.models.demo import build_tokenizer
from quire.sampling import RequestOutput
from quire.tokenizer import Tokenizer

VOCAB = 512  # the tiny checkpoints' vocabulary
PROMPT = "the quick brown fox"

KILLERS = {
    "top_p": {"top_p": 1e-50},
    "repetition_penalty": {"repetition_penalty": 1e-50},
    "temperature+min_tokens": {"temperature": 1e39, "min_tokens": 3},
}


def _args(model: Path) -> EngineArgs:
    return EngineArgs(
        model=str(model), dtype="float32", num_kv_blocks=64, max_model_len=256, show_progress=False
    )


def _unchecked(**fields: object) -> SamplingParams:
    """SamplingParams with validation bypassed, as hand-built objects or older clients could be."""
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for name, value in fields.items():
        object.__setattr__(params, name, value)
    return params


def _greedy(max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> LLMEngine:
    return LLMEngine(_args(tiny_llama_dir))


def _run(engine: LLMEngine) -> dict[str, RequestOutput]:
    finished: dict[str, RequestOutput] = {}
    for _ in range(500):
        if not engine.has_unfinished_requests():
            return finished
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    raise AssertionError("the engine did not finish")


def _add_out_of_vocab_request(engine: LLMEngine, request_id: str) -> None:
    """Queue a request whose prompt holds an id past the vocabulary, skipping the input checks
    that would refuse it (as a bug upstream, or a mismatched tokenizer, could)."""
    processed, request = engine.input_processor.make_request(request_id, PROMPT, _greedy())
    bad = dataclasses.replace(request, prompt_token_ids=[*processed.token_ids, VOCAB + 7])
    engine.core.add_request(bad)
    engine.output_processor.add_request(
        request_id, PROMPT, bad.prompt_token_ids, bad.params, bad.arrival_time, OutputKind.FINAL_ONLY
    )


def _assert_pool_empty(engine: LLMEngine) -> None:
    kv = engine.core.kv
    kv.pool.check_invariants()
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert kv.num_live_requests() == 0
    assert not engine.core.has_unfinished()


# ---- defect 1: validation ----


@pytest.mark.parametrize("fields", list(KILLERS.values()), ids=list(KILLERS))
def test_requests_that_killed_the_engine_are_refused_by_validation(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(fields))):
        SamplingParams(max_tokens=4, **fields)
    # The engine process decodes requests into the same class, so it refuses them as well.
    with pytest.raises(msgspec.ValidationError, match=next(iter(fields))):
        msgspec.msgpack.decode(msgspec.msgpack.encode(_unchecked(**fields)), type=SamplingParams)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"min_p": math.nan}, "min_p"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": math.nan}, "presence_penalty"),
        ({"frequency_penalty": -math.inf}, "frequency_penalty"),
        ({"logit_bias": {3: math.nan}}, "logit_bias"),
        ({"logit_bias": {3: 1e30}}, "logit_bias"),
        ({"logit_bias": {2**64: 1.0}}, "logit_bias"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"top_k": 2**31}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 2**64}, "max_tokens"),
        ({"min_tokens": 2**64, "max_tokens": None}, "min_tokens"),
        ({"n": 2**64}, "n"),
        ({"stop_token_ids": [2**64]}, "stop_token_ids"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_out_of_range_parameters_name_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**fields)


def test_bounds_are_inclusive_and_top_k_larger_than_the_vocabulary_is_allowed() -> None:
    SamplingParams(temperature=100.0, top_p=1e-6, repetition_penalty=0.01, seed=2**63 - 1, top_k=2**31 - 1)
    SamplingParams(repetition_penalty=100.0, seed=-(2**63), top_k=-1, logit_bias={"5": -100})


# ---- defect 1: the sampler and the engine survive what validation would have refused ----


def test_unvalidated_killer_parameters_still_generate_and_the_engine_keeps_serving(
    tiny_llama_dir: Path,
) -> None:
    llm = LLM(**vars(_args(tiny_llama_dir)))
    outputs = llm.generate([PROMPT] * len(KILLERS), [_unchecked(**f) for f in KILLERS.values()])
    for output in outputs:
        completion = output.outputs[0]
        assert completion.finish_reason == "length"
        assert len(completion.token_ids) == 4
        assert all(0 <= t < VOCAB for t in completion.token_ids)
    after = llm.generate(PROMPT, _greedy())[0].outputs[0]
    assert after.finish_reason == "length" and len(after.token_ids) == 6


# ---- defect 1: a request the runner refuses fails alone ----


def test_refused_request_fails_while_the_others_complete_unchanged(engine: LLMEngine) -> None:
    engine.add_request(PROMPT, _greedy(), request_id="alone")
    expected = _run(engine)["alone"].outputs[0]

    engine.add_request(PROMPT, _greedy(), request_id="good")
    engine.add_request("another prompt", SamplingParams(max_tokens=5, seed=1), request_id="sampled")
    _add_out_of_vocab_request(engine, "bad")
    finished = _run(engine)

    assert finished["bad"].outputs[0].finish_reason == "error"
    assert finished["bad"].outputs[0].token_ids == []
    good = finished["good"].outputs[0]
    assert good.finish_reason == "length"
    assert good.token_ids == expected.token_ids  # no corruption from sharing a step with it
    assert finished["sampled"].outputs[0].finish_reason == "length"
    _assert_pool_empty(engine)

    engine.add_request(PROMPT, _greedy(), request_id="after")
    assert _run(engine)["after"].outputs[0].token_ids == expected.token_ids


def test_refused_request_with_parallel_samples_fails_every_sample(engine: LLMEngine) -> None:
    processed, request = engine.input_processor.make_request("bad-n", PROMPT, _greedy())
    params = SamplingParams(n=3, max_tokens=4, ignore_eos=True)
    bad = dataclasses.replace(request, prompt_token_ids=[*processed.token_ids, VOCAB], params=params)
    engine.core.add_request(bad)
    engine.output_processor.add_request(
        "bad-n", PROMPT, bad.prompt_token_ids, params, bad.arrival_time, OutputKind.FINAL_ONLY
    )
    engine.add_request(PROMPT, _greedy(), request_id="beside")
    finished = _run(engine)
    assert [c.finish_reason for c in finished["bad-n"].outputs] == ["error"] * 3
    assert finished["beside"].outputs[0].finish_reason == "length"
    _assert_pool_empty(engine)


def test_unattributed_runner_failure_fails_its_step_only(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = engine.core.executor
    real_execute = runner.execute
    calls = {"n": 0}

    def fail_once(plan):
        calls["n"] += 1
        if calls["n"] == 2:  # mid-generation: blocks allocated, tokens already produced
            raise RuntimeError("injected kernel failure")
        return real_execute(plan)

    monkeypatch.setattr(runner, "execute", fail_once)
    engine.add_request(PROMPT, _greedy(), request_id="hit")
    finished = _run(engine)
    assert finished["hit"].outputs[0].finish_reason == "error"
    assert len(finished["hit"].outputs[0].token_ids) == 1
    _assert_pool_empty(engine)
    engine.add_request(PROMPT, _greedy(), request_id="next")
    assert _run(engine)["next"].outputs[0].finish_reason == "length"


def test_async_client_delivers_error_finish_and_keeps_serving(tiny_llama_dir: Path) -> None:
    async def run() -> None:
        client = InProcessEngineClient(_args(tiny_llama_dir))
        await client.start()
        try:
            assert client.input_processor is not None
            processed, request = client.input_processor.make_request("bad", PROMPT, _greedy())
            bad = dataclasses.replace(request, prompt_token_ids=[*processed.token_ids, VOCAB + 1])

            async def drain(stream) -> RequestOutput:
                last = None
                async for delta in stream:
                    last = delta
                assert last is not None and last.finished
                return last

            async def good() -> RequestOutput:
                last = None
                async for delta in client.generate(PROMPT, _greedy()):
                    last = delta
                assert last is not None
                return last

            bad_out, good_out = await asyncio.gather(drain(client.add_request(processed, bad)), good())
            assert bad_out.outputs[0].finish_reason == "error"
            assert good_out.finished and good_out.outputs[0].finish_reason == "length"
            assert client.is_ready and client.num_unfinished_seqs == 0
            again = await good()
            assert again.outputs[0].finish_reason == "length"
        finally:
            await client.shutdown()

    asyncio.run(run())


# ---- defect 10: tokenizer / model vocabulary mismatch ----


@pytest.fixture(scope="module")
def mismatched_model_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (vocabulary 512) with a tokenizer of 1024 ids."""
    out = tmp_path_factory.mktemp("mismatch") / "model"
    shutil.copytree(tiny_llama_dir, out)
    build_tokenizer(1024).save(str(out / "tokenizer.json"))
    return out


def test_tokenizer_larger_than_the_model_is_refused_at_start(mismatched_model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer has 1024 token ids.*vocabulary has 512"):
        LLM(**vars(_args(mismatched_model_dir)))

    async def start() -> None:
        client = InProcessEngineClient(_args(mismatched_model_dir))
        with pytest.raises(EngineDeadError, match=r"1024 .*512"):
            await client.start()

    asyncio.run(start())


def test_input_processor_refuses_a_mismatched_tokenizer(mismatched_model_dir: Path) -> None:
    tokenizer = Tokenizer.from_dir(mismatched_model_dir)
    with pytest.raises(ValueError, match=r"1024 .*512"):
        InputProcessor(tokenizer, VOCAB, 256, 1024)


def test_text_prompts_are_range_checked_like_token_id_prompts(tiny_llama_dir: Path) -> None:
    processor = InputProcessor(Tokenizer.from_dir(tiny_llama_dir), VOCAB, 256, 1024)
    token_ids = processor.process_prompt(PROMPT).token_ids
    # As if the model were smaller than the tokenizer (a check that start-up would have refused).
    processor.vocab_size = max(token_ids)
    with pytest.raises(ValueError, match=f"vocabulary of {max(token_ids)}"):
        processor.process_prompt(PROMPT)
    with pytest.raises(ValueError, match="prompt token ids must be integers"):
        processor.process_prompt({"prompt_token_ids": token_ids})


def test_an_input_frame_the_engine_cannot_decode_fails_only_its_request(tmp_path: Path) -> None:
    """Decoding in the engine process re-runs ``SamplingParams`` validation: a frame that fails it
    (sent by an older or buggy API process) becomes that request's error, not a dead step loop."""
    import os

    import zmq

    from quire.core.request import EngineCoreRequest
    from quire.frontend import protocol
    from quire.frontend.core_process import _ZmqTransport

    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    input_addr, output_addr = f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/out"
    push.bind(input_addr)
    pull.bind(output_addr)
    transport = _ZmqTransport(input_addr, output_addr, parent_pid=os.getppid())
    try:
        encode = protocol.input_encoder().encode
        request = EngineCoreRequest("req-bad", [1, 2, 3], _unchecked(**KILLERS["top_p"]), frozenset([0]), 0.0)
        push.send(encode(protocol.AddRequest(request)))
        push.send(b"\xc1 not msgpack")  # no request id to answer: dropped
        push.send(encode(protocol.AbortRequests(["req-other"])))
        messages: list[object] = []
        for _ in range(50):  # the frames arrive asynchronously over the socket
            messages += transport.receive(block=True) or []
            if len(messages) >= 2:
                break
        assert len(messages) == 2, messages
        error, abort = messages
        assert isinstance(error, protocol.RequestError) and error.request_id == "req-bad"
        assert "top_p" in error.message
        assert isinstance(abort, protocol.AbortRequests) and abort.request_ids == ["req-other"]
    finally:
        transport.close()
        push.close(0)
        pull.close(0)
        ctx.term()
