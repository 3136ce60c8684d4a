"""The server's engine client: the engine core in its own process, reached over ZMQ.

The API process binds two IPC sockets in a private temporary directory, starts
``python -m quire.frontend.core_process`` and waits for ``Ready``. A reader task then folds each
step's ``OutputBatch`` into the request streams. If the engine process dies, the reader notices
within a second (the process's exit code, or its ``EngineFailed`` message), every running request
ends with ``EngineDeadError``, and the server reports 503.
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
        self, args: EngineArgs, model_path: str, tokenizer: Tokenizer, log_level: str = "WARNING"
    ) -> None:
        super().__init__()
        self.args = args
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

    def _bind(self) -> tuple[str, str]:
        """Bind both sockets in a private directory; sockets are made inside the event loop."""
        self._dir = tempfile.mkdtemp(prefix=SOCKET_DIR_PREFIX)
        self._ctx = zmq.Context()
        self._actx = zmq.asyncio.Context()
        self._input = self._ctx.socket(zmq.PUSH)
        self._output = self._actx.socket(zmq.PULL)
        for sock in (self._input, self._output):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)  # never block the event loop on a send
            sock.setsockopt(zmq.RCVHWM, 0)
        input_addr, output_addr = f"ipc://{self._dir}/input", f"ipc://{self._dir}/output"
        self._input.bind(input_addr)
        self._output.bind(output_addr)
        return input_addr, output_addr

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_ready(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None and self._dead is None:
            self._mark_dead(f"the engine core process exited with code {self._proc.returncode}")
        return super().is_ready

    async def start(self) -> None:
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
        while True:
            if await sock.poll(LIVENESS_POLL_MS, zmq.POLLIN):
                message = self._decoder.decode(await sock.recv())
                if isinstance(message, protocol.Ready):
                    return message.info
                if isinstance(message, protocol.EngineFailed):
                    self._mark_dead(f"the engine failed to start: {message.message}")
                    raise EngineDeadError(self._dead)
            elif proc.poll() is not None:
                self._mark_dead(f"the engine core process exited with code {proc.returncode} while loading")
                raise EngineDeadError(self._dead)

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
        assert self._input is not None
        self._input.send(self._encoder.encode(message), copy=False)

    async def shutdown(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if self._ready:
                self._send(protocol.Shutdown())
            else:
                proc.terminate()  # still loading: it reads no messages yet
            try:
                await asyncio.to_thread(proc.wait, SHUTDOWN_WAIT_S)
            except subprocess.TimeoutExpired:
                logger.warning("engine core did not exit in %.0f s; killing it", SHUTDOWN_WAIT_S)
                proc.kill()
                await asyncio.to_thread(proc.wait)
        self._mark_dead("the engine was shut down", expected=True)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for sock in (self._input, self._output):
            if sock is not None:
                sock.close()
        for ctx in (self._ctx, self._actx):
            if ctx is not None:
                ctx.term()
        self.remove_socket_dir()

    def remove_socket_dir(self) -> None:
        """Delete the IPC socket directory (idempotent; also safe after a failed shutdown)."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
