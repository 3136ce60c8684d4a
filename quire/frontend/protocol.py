"""The messages between the API server process and the engine-core process.

Typed msgspec structs, msgpack on the wire. Inputs (add / abort / finish_stopped / shutdown) flow
to the engine; one ``OutputBatch`` per engine step flows back, so the per-token cost on the wire is
one list entry, not one message.

Both sides use the engine core's own dataclasses (``EngineCoreOutput``, ``TokenLogprobs``, both in
the torch-free ``quire.core.outputs``): msgspec encodes and decodes dataclasses natively, so no
per-output conversion loop runs in the step loop or in the API process.
"""

from __future__ import annotations

import msgspec

from quire.core.outputs import EngineCoreOutput, StepStats
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


class RequestError(msgspec.Struct, array_like=True):
    """The engine refused a request (e.g. ``RequestRejected``); the message is user-facing."""

    request_id: str
    message: str


class OutputBatch(msgspec.Struct, tag="outputs", array_like=True):
    """Everything one engine step produced, plus the step's stats."""

    outputs: list[EngineCoreOutput]
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
