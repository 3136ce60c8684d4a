"""Structured output in the engine: grammar-constrained decoding with llguidance.

The tiny models have random weights, so nothing but the grammar can make their output valid:
every test that checks validity at temperature 1.0 shows that the mask, not the model, decides.
"""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import msgspec
import pytest
import torch

from quire import LLM, SamplingParams
from quire.core.request import EngineCoreRequest
from quire.frontend.protocol import AddRequest, input_decoder, input_encoder
from quire.structured.backend import LRUCache, get_backend_class, validate_structured_outputs
from quire.structured.bitmask import TokenBitmask, apply_token_bitmask_
from quire.structured.params import StructuredOutputsParams as Structured
from quire.worker.sampler import Sampler, SamplingState

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "code", "tags", "address", "active"],
    "additionalProperties": False,
}

GBNF = r"""
root   ::= "(" expr ")"
expr   ::= term (("+" | "*") term)*
term   ::= [0-9] | "(" expr ")"
"""

LARK = r"""
start: greeting " " NAME "!"
greeting: "hi" | "hello"
NAME: /[a-z]{2,6}/
"""


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    return LLM(str(tiny_llama_dir), max_model_len=1024, max_num_seqs=64, show_progress=False)


def constrained(max_tokens: int = 400, temperature: float = 1.0, **kwargs) -> SamplingParams:
    extra = {
        k: kwargs.pop(k)
        for k in list(kwargs)
        if k in ("n", "seed", "logit_bias", "logprobs", "stop_token_ids")
    }
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature, structured_outputs=Structured(**kwargs), **extra
    )


def prompts(count: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {"prompt_token_ids": torch.randint(3, 512, (5 + i % 7,), generator=gen).tolist()}
        for i in range(count)
    ]


def texts(results) -> list[str]:
    """Every completion's text, each checked to have ended by its grammar (not cut by max_tokens)."""
    out = []
    for result in results:
        for completion in result.outputs:
            assert completion.finish_reason == "stop", (completion.finish_reason, completion.text)
            out.append(completion.text)
    return out


def _balanced(text: str) -> bool:
    """The GBNF language above: '(' expr ')' with expr = term (op term)*, term = digit | (expr)."""

    def expr(i: int) -> int:
        i = term(i)
        while i < len(text) and text[i] in "+*":
            i = term(i + 1)
        return i

    def term(i: int) -> int:
        if i < len(text) and text[i].isdigit():
            return i + 1
        if i < len(text) and text[i] == "(":
            i = expr(i + 1)
            if i < len(text) and text[i] == ")":
                return i + 1
        return -(10**9)

    return text.startswith("(") and term(0) == len(text)


# ---- validity under random weights ----


def test_json_schema_outputs_always_validate(llm: LLM) -> None:
    results = llm.generate(prompts(50), constrained(json=PERSON_SCHEMA))
    outputs = texts(results)
    assert len(outputs) == 50
    for text in outputs:
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)
    assert len(set(outputs)) > 10  # really sampled, not one forced string


def test_json_object_is_a_json_object(llm: LLM) -> None:
    params = [constrained(max_tokens=600, json_object=True, seed=i) for i in range(8)]
    results = llm.generate(prompts(8, seed=1), params)
    for completion in (r.outputs[0] for r in results):
        if completion.finish_reason == "length":  # any JSON object may be long; only then is it cut
            continue
        assert completion.finish_reason == "stop"
        assert isinstance(json.loads(completion.text), dict)
    assert sum(r.outputs[0].finish_reason == "stop" for r in results) >= 4


@pytest.mark.parametrize(
    ("spec", "check"),
    [
        ({"regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        (
            {"choice": ["yes", "no", 'say "hi"', "naïve\nline"]},
            lambda t: t in ["yes", "no", 'say "hi"', "naïve\nline"],
        ),
        ({"grammar": LARK}, lambda t: re.fullmatch(r"(hi|hello) [a-z]{2,6}!", t)),
        ({"grammar": GBNF}, _balanced),
    ],
    ids=["regex", "choice", "lark", "gbnf"],
)
def test_regex_choice_and_grammars_match(llm: LLM, spec: dict, check) -> None:
    results = llm.generate(prompts(12, seed=2), constrained(max_tokens=300, **spec))
    for text in texts(results):
        assert check(text), text


def test_choice_is_exact_and_reaches_every_option(llm: LLM) -> None:
    options = ["a", "ab", "abc"]  # prefixes of each other: the grammar must not stop early or run on
    seen = set()
    for seed in range(4):
        params = constrained(choice=options, logit_bias={2: 5.0}, seed=seed)
        results = llm.generate(prompts(16, seed=seed), params)
        seen.update(texts(results))
    assert seen <= set(options)
    assert len(seen) >= 2


def test_max_tokens_cut_gives_length_and_a_valid_prefix(llm: LLM) -> None:
    results = llm.generate(prompts(4, seed=3), constrained(max_tokens=6, json=PERSON_SCHEMA))
    backend = get_backend_class().create(llm.tokenizer, llm.engine.info.vocab_size)
    compiled = backend.compile(Structured(json=PERSON_SCHEMA))
    for completion in (r.outputs[0] for r in results):
        assert completion.finish_reason == "length"
        assert len(completion.token_ids) == 6
        assert backend.new_matcher(compiled).accept_many(completion.token_ids)  # a prefix of a valid output


def test_eos_only_where_the_grammar_accepts(llm: LLM) -> None:
    # A +100 bias on every end-of-sequence id: unconstrained, the first token would be EOS.
    eos = sorted(llm.tokenizer.eos_token_ids)
    bias = {t: 100.0 for t in eos}
    free = llm.generate(prompts(4, seed=4), SamplingParams(max_tokens=20, logit_bias=bias))
    assert all(len(r.outputs[0].token_ids) == 1 for r in free)
    results = llm.generate(prompts(16, seed=4), constrained(regex=r"[a-z]{5,8}", logit_bias=bias))
    for completion in (r.outputs[0] for r in results):
        assert completion.finish_reason == "stop"
        assert re.fullmatch(r"[a-z]{5,8}", completion.text)
        # The bias makes EOS win as soon as it is allowed: at the first token reaching 5 letters.
        assert len(llm.tokenizer.decode(completion.token_ids[:-2])) < 5
        assert completion.token_ids[-1] in eos
        assert not set(completion.token_ids[:-1]) & set(eos)


def test_offline_chat_with_a_schema(llm: LLM) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    results = llm.chat(
        [[{"role": "user", "content": f"question {i}"}] for i in range(4)], constrained(json=schema)
    )
    for text in texts(results):
        jsonschema.validate(json.loads(text), schema)


def test_n_greater_than_one(llm: LLM) -> None:
    results = llm.generate(prompts(2, seed=5), constrained(json=PERSON_SCHEMA, n=5))
    outputs = texts(results)
    assert len(outputs) == 10
    for text in outputs:
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)


def test_forced_preemption_mid_output_still_validates(tiny_llama_dir) -> None:
    llm = LLM(
        str(tiny_llama_dir),
        max_model_len=512,
        num_kv_blocks=16,
        max_num_batched_tokens=64,
        max_num_seqs=8,
        show_progress=False,
    )
    schema = {
        "type": "object",
        "properties": {
            "words": {
                "type": "array",
                "items": {"type": "string", "maxLength": 5},
                "minItems": 5,
                "maxItems": 6,
            }
        },
        "required": ["words"],
        "additionalProperties": False,
    }
    manager = llm.engine.core.executor.structured
    replayed: list[int] = []
    add_request = manager.add_request

    def spy(request_id, params, output_token_ids) -> None:
        replayed.append(len(output_token_ids))
        add_request(request_id, params, output_token_ids)

    manager.add_request = spy
    # At most 6 x 5 characters, each at worst a 6-character \u escape: always done in 230 tokens.
    params = [constrained(max_tokens=230, json=schema, seed=i) for i in range(8)]
    results = llm.generate(prompts(8, seed=6), params)
    assert llm.engine.core.scheduler.num_preemptions_total > 0
    assert max(replayed) > 0  # a sequence came back mid-output and its tokens were replayed
    for text in texts(results):
        jsonschema.validate(json.loads(text), schema)
    assert llm.engine.core.kv.num_free_blocks == llm.engine.info.num_blocks


def test_unconstrained_rows_are_untouched_by_constrained_neighbours(llm: LLM) -> None:
    plain = prompts(4, seed=7)
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = [r.outputs[0].token_ids for r in llm.generate(plain, greedy)]
    mixed_prompts = plain[:2] + prompts(3, seed=8) + plain[2:]
    mixed_params = [greedy, greedy] + [constrained(json=PERSON_SCHEMA)] * 3 + [greedy, greedy]
    mixed = llm.generate(mixed_prompts, mixed_params)
    assert [r.outputs[0].token_ids for r in mixed[:2] + mixed[5:]] == alone
    for result in mixed[2:5]:
        jsonschema.validate(json.loads(result.outputs[0].text), PERSON_SCHEMA)


def test_logprobs_are_those_of_the_raw_model(llm: LLM) -> None:
    prompt = prompts(1, seed=9)
    constrained_out = llm.generate(prompt, constrained(regex=r"[0-9]{4}", temperature=0.0, logprobs=3))
    free_out = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=3))
    masked, raw = constrained_out[0].outputs[0].logprobs[0], free_out[0].outputs[0].logprobs[0]
    # The same top alternatives, with the same values and ranks: both come from the raw logits.
    for token_id, logprob in raw.items():
        assert masked[token_id].logprob == pytest.approx(logprob.logprob, abs=1e-5)
        assert masked[token_id].rank == logprob.rank
    digit = constrained_out[0].outputs[0].token_ids[0]
    assert re.fullmatch("[0-9]+", llm.tokenizer.decode([digit]))


# ---- invalid constraints and refused combinations ----


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"regex": "[a-"}, "unclosed character class"),
        ({"json": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "strin"),
        ({"json": {"$ref": "#/$defs/missing"}}, "missing"),
        ({"grammar": "start: undefined_rule"}, "undefined_rule"),
        ({"grammar": 'root ::= "a" missing'}, "missing"),
    ],
    ids=["regex", "schema-type", "schema-ref", "lark", "gbnf"],
)
def test_invalid_constraints_are_value_errors_with_the_engines_message(
    llm: LLM, spec: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_structured_outputs(Structured(**spec))
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate(prompts(1), constrained(**spec))
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ignore_eos": True}, "ignore_eos"),
        ({"min_tokens": 3}, "min_tokens"),
        ({"stop": ["}"]}, "stop strings"),
    ],
)
def test_combinations_that_break_validity_are_refused(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(max_tokens=10, structured_outputs=Structured(json_object=True), **kwargs)


def test_stop_token_ids_other_than_eos_are_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate(prompts(1), constrained(regex="[a-z]+", stop_token_ids=[100]))
    eos = sorted(llm.tokenizer.eos_token_ids)
    out = llm.generate(prompts(1), constrained(regex="[a-z]{3}", stop_token_ids=eos))[0].outputs[0]
    assert re.fullmatch("[a-z]{3}", out.text)


def test_params_survive_the_msgspec_wire() -> None:
    params = SamplingParams(
        max_tokens=50, n=2, structured_outputs=Structured(json=PERSON_SCHEMA, disable_any_whitespace=True)
    )
    request = EngineCoreRequest("r1", [1, 2, 3], params, frozenset({0}), 0.0)
    decoded = input_decoder().decode(input_encoder().encode(AddRequest(request)))
    assert isinstance(decoded, AddRequest)
    got = decoded.request.params.structured_outputs
    assert isinstance(got, Structured)
    assert got.cache_key == params.structured_outputs.cache_key
    assert json.loads(got.json) == PERSON_SCHEMA
    choice = SamplingParams(structured_outputs=Structured(choice=["a", "b"]))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(choice), type=SamplingParams) == choice


# ---- the runner hook ----


def test_bitmask_fills_while_the_forward_runs(tiny_llama_dir) -> None:
    """The fill runs on another thread during the forward, not before or after it. A handshake
    proves it whatever the thread scheduling: the forward, once started, waits (bounded) for
    the fill to report in, and the fill waits (bounded) for the forward to have started. A fill
    run before the forward, or after it, on any thread, finds no forward in progress."""
    llm = LLM(str(tiny_llama_dir), max_model_len=256, show_progress=False)
    runner = llm.engine.core.executor
    backend = runner.structured.backend
    in_forward, fill_reported = threading.Event(), threading.Event()
    seen: list[tuple[bool, bool]] = []  # (a forward was running, the fill ran off the engine thread)
    engine_thread = threading.get_ident()
    original_fill, model_call = backend.fill_bitmask, runner.model.forward

    def fill(matchers, bitmask) -> None:
        seen.append((in_forward.wait(timeout=10), threading.get_ident() != engine_thread))
        fill_reported.set()
        original_fill(matchers, bitmask)

    def forward(*args, **kwargs):
        in_forward.set()
        try:
            fill_reported.wait(timeout=10)  # every step here samples a constrained row
            return model_call(*args, **kwargs)
        finally:
            in_forward.clear()
            fill_reported.clear()

    backend.fill_bitmask = fill  # type: ignore[method-assign]
    runner.model.forward = forward  # type: ignore[method-assign]
    results = llm.generate(prompts(2, seed=10), constrained(regex=r"[a-z]{4}", max_tokens=10))
    assert texts(results)
    assert seen and all(overlapped and off_thread for overlapped, off_thread in seen), seen


def test_a_token_the_grammar_refuses_fails_only_that_request(tiny_llama_dir) -> None:
    llm = LLM(str(tiny_llama_dir), max_model_len=256, show_progress=False)
    manager = llm.engine.core.executor.structured
    manager.finish_bitmask = lambda: None  # simulate the bug: the mask is never applied
    free = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    results = llm.generate(prompts(3, seed=11), [free, constrained(regex=r"[0-9]{6}", max_tokens=30), free])
    assert results[1].outputs[0].finish_reason == "error"
    assert [r.outputs[0].finish_reason for r in (results[0], results[2])] == ["length", "length"]
    assert manager.num_requests == 0
    assert llm.engine.core.kv.num_free_blocks == llm.engine.info.num_blocks


def test_a_grammar_past_the_parser_limits_fails_its_request_not_the_batch(llm: LLM) -> None:
    # Valid, but its lexer would need more states than the engine allows: the matcher breaks at
    # its first mask. Without the check it would allow only end-of-sequence and "stop" unfinished.
    free = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    hostile = constrained(regex="(a{1000}){1000}", max_tokens=20)
    results = llm.generate(prompts(3, seed=12), [free, hostile, free])
    assert results[1].outputs[0].finish_reason == "error"
    assert [len(r.outputs[0].token_ids) for r in (results[0], results[2])] == [8, 8]
    assert llm.engine.core.executor.structured.num_requests == 0


def test_compiled_grammars_are_cached_by_constraint(tiny_llama_dir) -> None:
    llm = LLM(str(tiny_llama_dir), max_model_len=256, show_progress=False)
    cache = llm.engine.core.executor.structured.cache
    llm.generate(prompts(4), constrained(regex=r"[a-z]{3}", max_tokens=10))
    llm.generate(prompts(2), constrained(regex=r"[a-z]{3}", max_tokens=10))
    assert len(cache) == 1 and cache.misses == 1 and cache.hits == 5
    llm.generate(prompts(1), constrained(regex=r"[a-z]{4}", max_tokens=10))
    assert len(cache) == 2


def test_lru_cache_is_bounded() -> None:
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)  # "b" is the least recently used
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3


# ---- the sampler's side ----


def test_sampler_masks_in_place_only_the_constrained_rows() -> None:
    vocab = 70
    logits = torch.randn(3, vocab)
    words = torch.zeros(1, 3, dtype=torch.int32)
    words[0, 2] = 1 << 3  # only token 67 allowed
    allowed = TokenBitmask([1], words)
    sampler = Sampler(vocab, "cpu", seed=0)
    states = [SamplingState.create(SamplingParams(temperature=t), [1]) for t in (0.0, 1.0, 0.0)]
    out = sampler(logits, states, allowed)
    assert out.token_ids[1] == 67
    assert out.token_ids[0] == int(logits[0].argmax()) and out.token_ids[2] == int(logits[2].argmax())
    processed = sampler.processed_logits(logits, states, allowed)
    assert torch.isinf(processed[1]).sum() == vocab - 1
    assert torch.equal(processed[0], logits[0]) and torch.equal(processed[2], logits[2])

    whole = logits.clone()
    apply_token_bitmask_(whole, TokenBitmask([0, 1, 2], torch.full((3, 3), -1, dtype=torch.int32)))
    assert torch.equal(whole, logits)  # all bits set: nothing banned


def test_backend_registry_and_protocol() -> None:
    backend_class = get_backend_class("llguidance")
    assert isinstance(backend_class, type) and callable(backend_class.validate)
    with pytest.raises(ValueError, match="unknown structured output backend"):
        get_backend_class("nope")


def _ref_chain(depth: int) -> dict:
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(depth)}
    defs[f"d{depth}"] = {"type": "string", "maxLength": 8}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def test_deep_ref_chains_and_rule_chains_do_not_overflow_the_stack(llm: LLM) -> None:
    """llguidance compiles recursively: a 3,000-deep $ref chain (106 KB) or Lark rule chain
    used to overflow an 8 MiB thread stack and kill the process with a segfault. Validation and
    compilation run on a large-stack thread, so both compile and generate."""
    chain = _ref_chain(3000)
    validate_structured_outputs(Structured(json=chain))
    lark = "start: r0\n" + "\n".join(f'r{i}: "x" r{i + 1}' for i in range(3000)) + '\nr3000: "y"\n'
    validate_structured_outputs(Structured(grammar=lark))
    (first,) = texts(llm.generate(prompts(1), constrained(json=chain, seed=1)))
    value = json.loads(first)  # the chain ends in a string of at most 8 characters
    assert isinstance(value, str) and len(value) <= 8
    # The rule chain forces 3,000 "x" then "y": max_tokens cuts it, every token on the path.
    (cut,) = llm.generate(prompts(1), constrained(grammar=lark, max_tokens=20, seed=2))[0].outputs
    assert cut.finish_reason == "length" and cut.text and set(cut.text) == {"x"}


def test_schema_options_cannot_loosen_the_output(llm: LLM) -> None:
    """A schema's own llguidance "x-guidance" options cannot change the separators (" = " is not
    JSON), turn whitespace back on or skip keywords the engine does not implement."""
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
        "x-guidance": {"key_separator": " = ", "item_separator": " ; ", "whitespace_flexible": True},
    }
    results = llm.generate(prompts(6), constrained(json=schema, seed=3))
    for text in texts(results):
        assert json.loads(text) == {"a": json.loads(text)["a"]} and " " not in text
    with pytest.raises(ValueError, match="Unimplemented"):
        validate_structured_outputs(
            Structured(
                json={
                    "type": "object",
                    "not_a_keyword_x": 1,
                    "if": {"weird": 1},
                    "x-guidance": {"lenient": True},
                }
            )
        )


def test_unknown_string_formats_are_annotations_not_errors(llm: LLM) -> None:
    """JSON Schema's "format" is an annotation validators need not check; pydantic writes formats
    llguidance does not know (SecretStr: "password", bytes: "binary", Path: "path"). They are
    dropped, the known ones (e.g. "uuid") still enforced."""
    schema = {
        "type": "object",
        "properties": {
            "secret": {"type": "string", "format": "password", "maxLength": 6},
            "id": {"type": "string", "format": "uuid"},
            "choice": {"enum": [{"format": "kept as data"}]},
        },
        "required": ["secret", "id", "choice"],
        "additionalProperties": False,
    }
    results = llm.generate(prompts(4), constrained(json=schema, seed=4))
    for text in texts(results):
        value = json.loads(text)
        jsonschema.validate(value, schema)
        assert re.fullmatch(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}", value["id"])
        assert value["choice"] == {"format": "kept as data"}


def test_deeply_nested_schemas_are_value_errors() -> None:
    deep: dict = {"type": "string"}
    for _ in range(2000):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(ValueError, match="deep|recursion"):
        validate_structured_outputs(Structured(json=deep))
