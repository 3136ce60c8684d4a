"""The server's engine client: the engine core in its own process, reached over ZMQ.

The API process binds two IPC sockets in a private temporary directory, starts
``python -m quire.frontend.core_process`` and waits for ``Ready``. A reader task then folds each
step's ``OutputBatch`` into the request streams. If the engine process dies, the reader notices
within a second (the process's exit code, or its ``EngineFailed`` message), every running request
ends with ``EngineDeadError``, and death listeners are told (the server's supervisor then calls
``restart()``: a fresh process with fresh sockets in a fresh directory; the tokenizer stays).

No send ever blocks: the input socket has no high-water mark, so a send can only fail to queue
when no engine is connected -- a dead engine, whose state died with it -- and then it is dropped
rather than blocking the event loop (a blocking send to a dead engine used to hang SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from typing import NoReturn

import msgspec
import zmq
import zmq.asyncio

from quire.config import EngineArgs
from quire.frontend import protocol
from quire.frontend.async_client import EngineClient, EngineDeadError
from quire.frontend.core_builder import EngineInfo
from quire.frontend.core_process import SOCKET_DIR_PREFIX
from quire.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# How often a quiet output socket makes the reader check that the engine process still runs.
LIVENESS_POLL_MS = 1000
SHUTDOWN_WAIT_S = 10.0


class ProcessEngineClient(EngineClient):
    """Runs the engine core in a child process; ``tokenizer`` is loaded by the caller (it also
    validates the model directory before anything slow starts)."""

    def __init__(
        self,
        args: EngineArgs,
        model_path: str,
        tokenizer: Tokenizer,
        log_level: str = "WARNING",
        load_timeout: float | None = None,
    ) -> None:
        super().__init__()
        if load_timeout is not None and not load_timeout > 0:
            raise ValueError(f"load_timeout must be a positive number of seconds, got {load_timeout}")
        self.args = args
        # An engine that neither reports Ready nor exits (a hung load, a stuck device) would keep
        # readiness at 503 forever; past this it is killed and treated as a failed start.
        self.load_timeout = load_timeout
        self.model_path = model_path
        self._tokenizer = tokenizer
        self._log_level = log_level
        self._dir: str | None = None
        self._ctx: zmq.Context | None = None
        self._actx: zmq.asyncio.Context | None = None
        self._input: zmq.Socket | None = None
        self._output: zmq.asyncio.Socket | None = None
        self._encoder = protocol.input_encoder()
        self._decoder = protocol.output_decoder()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False  # shutdown() was called: no restart after that

    def _bind(self) -> tuple[str, str]:
        """Bind both sockets in a private directory; sockets are made inside the event loop."""
        self._dir = tempfile.mkdtemp(prefix=SOCKET_DIR_PREFIX)
        self._ctx = zmq.Context()
        self._actx = zmq.asyncio.Context()
        self._input = self._ctx.socket(zmq.PUSH)
        self._output = self._actx.socket(zmq.PULL)
        for sock in (self._input, self._output):
            sock.setsockopt(zmq.LINGER, 0)
            # No high-water mark: a send never waits for the engine to catch up; see _send.
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
        input_addr, output_addr = f"ipc://{self._dir}/input", f"ipc://{self._dir}/output"
        self._input.bind(input_addr)
        self._output.bind(output_addr)
        return input_addr, output_addr

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def socket_dir(self) -> str | None:
        """The current IPC socket directory (a new one per engine process)."""
        return self._dir

    @property
    def is_ready(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None and self._dead is None and self._ready:
            self._mark_dead(f"the engine core process exited with code {self._proc.returncode}")
        return super().is_ready

    async def start(self) -> None:
        await self._launch()

    async def restart(self) -> None:
        """Replace the dead engine process: stop its reader, reap it, drop its sockets and
        directory, then start a fresh one and wait for ``Ready``. Requests that were running have
        already failed; the tokenizer stays. Raises ``EngineDeadError`` if the new one fails to load."""
        if self._closed:
            raise EngineDeadError("the engine was shut down")
        if self._dead is None:
            self._mark_dead("restart requested", expected=True)
        await self._release()
        await self._launch()

    async def _launch(self) -> None:
        input_addr, output_addr = self._bind()
        command = [
            sys.executable,
            "-m",
            "quire.frontend.core_process",
            "--input-addr",
            input_addr,
            "--output-addr",
            output_addr,
            "--parent-pid",
            str(os.getpid()),
            "--model-path",
            self.model_path,
            "--engine-args",
            msgspec.json.encode(self.args).decode(),
            "--log-level",
            self._log_level,
        ]
        self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        info = await self._wait_ready()
        self._set_ready(self._tokenizer, info)
        self._reader = asyncio.create_task(self._read_outputs(), name="engine-output-reader")

    async def _wait_ready(self) -> EngineInfo:
        proc, sock = self._proc, self._output
        assert proc is not None and sock is not None
        loop = asyncio.get_running_loop()
        deadline = None if self.load_timeout is None else loop.time() + self.load_timeout
        while True:
            if deadline is not None and loop.time() >= deadline:
                proc.kill()
                await asyncio.to_thread(proc.wait)
                self._fail_start(
                    f"the engine did not finish loading within {self.load_timeout:g} s (--engine-load-timeout)"
                )
            poll_ms = (
                LIVENESS_POLL_MS
                if deadline is None
                else min(LIVENESS_POLL_MS, (deadline - loop.time()) * 1000)
            )
            if await sock.poll(max(1, int(poll_ms)), zmq.POLLIN):
                message = self._decoder.decode(await sock.recv())
                if isinstance(message, protocol.Ready):
                    return message.info
                if isinstance(message, protocol.EngineFailed):
                    self._fail_start(f"the engine failed to start: {message.message}")
            elif proc.poll() is not None:
                self._fail_start(f"the engine core process exited with code {proc.returncode} while loading")

    def _fail_start(self, reason: str) -> NoReturn:
        # During a restart the client is already dead (no second round of listeners); the
        # supervisor sees this exception and decides whether to try again.
        self._mark_dead(reason)
        raise EngineDeadError(reason)

    async def _read_outputs(self) -> None:
        proc, sock, decode = self._proc, self._output, self._decoder.decode
        assert proc is not None and sock is not None
        try:
            while self._dead is None:
                if not await sock.poll(LIVENESS_POLL_MS, zmq.POLLIN):
                    if proc.poll() is not None:
                        self._mark_dead(f"the engine core process exited with code {proc.returncode}")
                    continue
                frame = await sock.recv(copy=False)
                message = decode(frame.buffer)
                if isinstance(message, protocol.OutputBatch):
                    self._on_batch(message)
                elif isinstance(message, protocol.EngineFailed):
                    self._mark_dead(message.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here would hang every stream; fail them loudly instead
            logger.exception("engine output reader crashed")
            self._mark_dead(f"output processing failed: {type(exc).__name__}: {exc}")

    def _send(self, message: protocol.EngineInput) -> None:
        self._try_send(message)

    def _try_send(self, message: protocol.EngineInput) -> bool:
        """Queue ``message`` for the engine without ever blocking; False if it was dropped.

        With no high-water mark the only reason a PUSH cannot queue is that no engine is
        connected: it died (the reader notices within a second and fails its requests), and the
        message is about state that died with it. A blocking send would wait forever instead."""
        sock = self._input
        if sock is None or sock.closed:
            return False
        try:
            sock.send(self._encoder.encode(message), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            logger.debug("no engine connected; dropped a %s message", type(message).__name__)
            return False
        return True

    async def shutdown(self) -> None:
        """Stop the engine (politely if it runs, else by signal), always within a bounded time,
        and remove the socket directory. Safe at any point: loading, running, dead, restarting."""
        self._closed = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            # A loading engine reads no messages yet, and a dead connection takes none.
            if not (self._ready and self._dead is None and self._try_send(protocol.Shutdown())):
                proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, SHUTDOWN_WAIT_S)
            except subprocess.TimeoutExpired:
                logger.warning("engine core did not exit in %.0f s; killing it", SHUTDOWN_WAIT_S)
        self._mark_dead("the engine was shut down", expected=True)
        await self._release()

    async def _release(self) -> None:
        """Stop the reader, kill and reap the engine process if it still runs, close the sockets
        and delete their directory. Bounded in time; idempotent."""
        self._ready = False
        reader, self._reader = self._reader, None
        if reader is not None and not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            try:
                await asyncio.to_thread(proc.wait, SHUTDOWN_WAIT_S)
            except subprocess.TimeoutExpired:  # stuck in the kernel; nothing more we can do
                logger.error("engine core process %d survived SIGKILL for %.0f s", proc.pid, SHUTDOWN_WAIT_S)
        self._close_sockets()
        self.remove_socket_dir()

    def _close_sockets(self) -> None:
        # LINGER is 0 on both sockets, so closing drops unsent messages and term() cannot wait.
        for sock in (self._input, self._output):
            if sock is not None:
                sock.close(linger=0)
        for ctx in (self._ctx, self._actx):
            if ctx is not None:
                ctx.term()
        self._input = self._output = None
        self._ctx = self._actx = None

    def remove_socket_dir(self) -> None:
        """Delete the IPC socket directory (idempotent; also safe after a failed shutdown)."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
