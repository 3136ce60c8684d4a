"""The messages between the API server process and the engine-core process.

Typed msgspec structs, msgpack on the wire. Inputs (add / abort / finish_stopped / shutdown) flow
to the engine; one ``OutputBatch`` per engine step flows back, so the per-token cost on the wire is
one list entry, not one message.

The engine side encodes its own dataclasses (``EngineCoreOutput``, ``TokenLogprobs``) directly and
the API side decodes them into the mirror structs below: msgspec encodes a dataclass as a map of
its fields, so no per-output conversion loop runs in the step loop, and the API process never
imports torch (``TokenLogprobs`` lives next to the sampler).
"""

from __future__ import annotations

import msgspec

from quire.core.outputs import StepStats
from quire.core.request import EngineCoreRequest
from quire.frontend.core_builder import EngineInfo

# -- API -> engine ----------------------------------------------------------------------------


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    request: EngineCoreRequest


class AbortRequests(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]


class FinishStopped(msgspec.Struct, tag="stop", array_like=True):
    """A stop string (found on the API side) ended one sequence: free it in the engine."""

    request_id: str
    index: int


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


EngineInput = AddRequest | AbortRequests | FinishStopped | Shutdown


# -- engine -> API ----------------------------------------------------------------------------


class TokenLogprobsMsg(msgspec.Struct):
    """Mirror of ``quire.worker.sampler.TokenLogprobs`` (same field names)."""

    token_id: int
    logprob: float
    rank: int
    top_token_ids: list[int]
    top_logprobs: list[float]


class CoreOutput(msgspec.Struct):
    """Mirror of ``quire.core.outputs.EngineCoreOutput`` (same field names), duck-typed for the
    ``OutputProcessor``."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobsMsg] = []
    finish_reason: str | None = None
    stop_reason: int | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None


class RequestError(msgspec.Struct, array_like=True):
    """The engine refused a request (e.g. ``RequestRejected``); the message is user-facing."""

    request_id: str
    message: str


class OutputBatch(msgspec.Struct, tag="outputs", array_like=True):
    """Everything one engine step produced, plus the step's stats."""

    outputs: list[CoreOutput]
    stats: StepStats | None = None
    errors: list[RequestError] = []


class Ready(msgspec.Struct, tag="ready", array_like=True):
    info: EngineInfo


class EngineFailed(msgspec.Struct, tag="failed", array_like=True):
    """The engine could not start, or its step loop crashed; it exits right after sending this."""

    message: str


EngineOutput = OutputBatch | Ready | EngineFailed


def input_encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def input_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(EngineInput)


def output_encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def output_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(EngineOutput)
