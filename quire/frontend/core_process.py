"""The engine core's busy loop, and the process that runs it behind ZMQ for the server.

``EngineCoreLoop`` is transport-free: it takes input messages from a ``receive`` callable and
hands each step's ``OutputBatch`` to a ``publish`` callable. The in-process client drives it in a
thread with a queue; ``main()`` below drives it in its own process with two ZMQ sockets:

    API process  --PUSH-->  input socket   --PULL-->  engine process
    API process  <--PULL--  output socket  <--PUSH--  engine process

The API process binds both sockets and starts this module as ``python -m
quire.frontend.core_process``; the engine connects, builds the model, sends ``Ready`` and loops.
It exits when told to (``Shutdown``), and on its own when its parent process is gone, so a
killed server never leaves an orphan holding the accelerator.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import zmq

from quire.config import EngineArgs
from quire.core.engine_core import EngineCore
from quire.frontend import protocol
from quire.frontend.core_builder import build_engine_core

logger = logging.getLogger(__name__)

# How long an idle engine blocks on its input before checking that its parent is still alive.
IDLE_POLL_S = 0.25
# The API process puts both IPC sockets in a fresh temporary directory named like this.
SOCKET_DIR_PREFIX = "quire-engine-"

Receive = Callable[
    [bool], "list[protocol.EngineInput | protocol.RequestError] | None"
]  # block? -> messages, None = stop
Publish = Callable[[protocol.OutputBatch], None]


class EngineCoreLoop:
    """Drains inputs, steps while there is work, publishes one batch per step, blocks when idle."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core

    def handle(
        self, message: protocol.EngineInput | protocol.RequestError, errors: list[protocol.RequestError]
    ) -> bool:
        """Apply one input; False means shut down. A ``RequestError`` is an input the transport
        could not decode: it goes back to the API as that request's error."""
        core = self.core
        if isinstance(message, protocol.RequestError):
            errors.append(message)
        elif isinstance(message, protocol.AddRequest):
            try:
                core.add_request(message.request)
            except ValueError as exc:  # RequestRejected or a duplicate id: the request's problem
                errors.append(protocol.RequestError(message.request.request_id, str(exc)))
            except Exception as exc:  # anything else is still this request's alone: refuse it, go on
                logger.exception("engine core could not add request %s", message.request.request_id)
                errors.append(
                    protocol.RequestError(
                        message.request.request_id,
                        f"the engine could not accept the request ({type(exc).__name__})",
                    )
                )
        elif isinstance(message, protocol.AbortRequests):
            for request_id in message.request_ids:
                core.abort(request_id)
        elif isinstance(message, protocol.FinishStopped):
            core.finish_stopped(message.request_id, message.index)
        elif isinstance(message, protocol.Shutdown):
            return False
        return True

    def run(self, receive: Receive, publish: Publish) -> None:
        core = self.core
        was_busy = False
        while True:
            busy = core.has_unfinished()
            if was_busy and not busy:
                # The last request just finished: the memory kept for the next step's activations
                # goes back to the OS until work returns (EngineCore.release_idle_memory).
                core.release_idle_memory()
            was_busy = busy
            messages = receive(not busy)
            if messages is None:
                return
            errors: list[protocol.RequestError] = []
            for message in messages:
                if not self.handle(message, errors):
                    return
            # A step also runs after inputs that arrived while idle: an abort's finished ids reach
            # the runner, and the API sees fresh stats (KV usage back to zero) at once.
            if busy or messages:
                outputs, stats = core.step()
                publish(protocol.OutputBatch(outputs, stats, errors))


class _ZmqTransport:
    """The engine process's end of the two sockets."""

    def __init__(self, input_addr: str, output_addr: str, parent_pid: int) -> None:
        self.ctx = zmq.Context(io_threads=1)
        self.input = self.ctx.socket(zmq.PULL)
        self.output = self.ctx.socket(zmq.PUSH)
        self.input.setsockopt(zmq.LINGER, 0)
        # A final EngineFailed must reach the API before the process exits.
        self.output.setsockopt(zmq.LINGER, 2000)
        for sock in (self.input, self.output):
            # No high-water mark: a PUSH at its HWM blocks, which would freeze the step loop while
            # the API catches up. Memory stays bounded by the work admitted, and a dead parent is
            # noticed at the next step.
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
        self.input.connect(input_addr)
        self.output.connect(output_addr)
        self.parent_pid = parent_pid
        self.decoder = protocol.input_decoder()
        self.encoder = protocol.output_encoder()
        self.poller = zmq.Poller()
        self.poller.register(self.input, zmq.POLLIN)

    def parent_alive(self) -> bool:
        return os.getppid() == self.parent_pid

    def receive(self, block: bool) -> list[protocol.EngineInput | protocol.RequestError] | None:
        if not self.parent_alive():
            logger.warning("the API server process is gone; engine core exiting")
            return None
        if block and not self.poller.poll(IDLE_POLL_S * 1000):
            return []
        messages = []
        while True:
            try:
                frame = self.input.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return messages
            message = self._decode(frame.buffer)
            if message is not None:
                messages.append(message)

    def _decode(self, buffer: memoryview) -> protocol.EngineInput | protocol.RequestError | None:
        """One input message. Decoding re-runs ``SamplingParams`` validation, so a frame that fails
        it must cost only its own request, never the step loop."""
        try:
            return self.decoder.decode(buffer)
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            request_id = _add_request_id(buffer)
            logger.error("dropped an input message the engine cannot decode (%s)", type(exc).__name__)
            if request_id is None:
                return None  # not a request: nobody waits for an answer
            return protocol.RequestError(request_id, f"the engine could not decode the request: {exc}")

    def publish(self, batch: protocol.OutputBatch | protocol.Ready | protocol.EngineFailed) -> None:
        self.output.send(self.encoder.encode(batch), copy=False)

    def close(self) -> None:
        self.input.close()
        self.output.close()
        self.ctx.term()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="quire engine-core process (started by the API server)")
    parser.add_argument("--input-addr", required=True)
    parser.add_argument("--output-addr", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--engine-args", required=True, help="EngineArgs as JSON")
    parser.add_argument("--log-level", default="WARNING")
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=ns.log_level.upper(), format="%(asctime)s %(levelname)s engine-core: %(message)s"
    )
    # Ctrl-C in a terminal reaches the whole process group; the API process decides when the
    # engine stops (after draining), so the engine ignores SIGINT and exits on Shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    args = msgspec.json.decode(ns.engine_args, type=EngineArgs)
    transport = _ZmqTransport(ns.input_addr, ns.output_addr, ns.parent_pid)
    try:
        try:
            core, info = build_engine_core(args, ns.model_path)
        except Exception as exc:  # any load failure is reported to the API, which tells the user
            logger.exception("engine core failed to start")
            transport.publish(protocol.EngineFailed(f"{type(exc).__name__}: {exc}"))
            return 1
        transport.publish(protocol.Ready(info))
        try:
            EngineCoreLoop(core).run(transport.receive, transport.publish)
        except Exception as exc:
            logger.exception("engine core step loop crashed")
            transport.publish(protocol.EngineFailed(f"{type(exc).__name__}: {exc}"))
            return 1
        return 0
    finally:
        transport.close()
        if not transport.parent_alive():
            _remove_socket_dir(ns.input_addr)


def _add_request_id(buffer: memoryview) -> str | None:
    """The request id of an ``AddRequest`` frame decoded without its types, or None."""
    try:
        tag, request = msgspec.msgpack.decode(buffer)
        request_id = request["request_id"] if tag == "add" and isinstance(request, dict) else None
    except Exception:
        return None
    return request_id if isinstance(request_id, str) else None


def _remove_socket_dir(addr: str) -> None:
    """An orphaned engine removes the socket directory its dead parent can no longer clean up."""
    path = Path(addr.removeprefix("ipc://")).parent
    if addr.startswith("ipc://") and path.name.startswith(SOCKET_DIR_PREFIX):
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
