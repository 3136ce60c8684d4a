"""``quire serve``: uvicorn (uvloop + httptools) in front of an engine-core process, with a drain.

Shutdown on SIGTERM or Ctrl-C: the port stays open but every new request gets 503, requests in
flight run to completion for up to ``--shutdown-timeout`` seconds, then uvicorn stops (cancelling
what is left, which aborts it in the engine), the engine process is told to exit, and the process
exits 0. A second signal stops at once. Nothing on this path waits on a client or on a dead
engine: headers and bodies have their own timeouts, and sends to the engine never block.

The engine process is supervised (``quire.server.supervisor``): it is restarted when it dies, and
the server exits 1 once ``--max-engine-restarts`` is spent, or if the engine never loaded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from pathlib import Path
from types import FrameType

import uvicorn

from quire.config import EngineArgs
from quire.frontend.core_builder import resolve_model_path
from quire.frontend.process_client import ProcessEngineClient
from quire.server.app import build_app
from quire.server.generation_defaults import load_sampling_defaults
from quire.server.http_protocol import header_timeout_protocol
from quire.server.openai.serving import ServerShutdown
from quire.server.settings import ServerSettings
from quire.server.state import ServerState
from quire.tokenizer import Tokenizer
from quire.tokenizer.chat_template import read_template_argument

logger = logging.getLogger(__name__)

# After the drain, connections still open get this long before uvicorn cancels their tasks.
FINAL_GRACE_S = 1.0
# After the drain timeout: at most this long for requests failed with a shutdown error to send it.
FAIL_FLUSH_S = 2.0


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal starts a drain instead of closing the port."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0
        self.address: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        await super().startup(sockets)
        if self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.address = f"{self.state.settings.scheme}://{host}:{port}"
            print(
                f"quire: listening on {self.address} (/health is 503 until the model is loaded)", flush=True
            )

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler: only flag and schedule. Not calling super() for the first
        # signal also keeps uvicorn from re-raising it at exit, which would kill us with -SIGTERM.
        if self._drain is not None or self._loop is None or self.should_exit:
            super().handle_exit(sig, frame)
            self.force_exit = True
            return
        self.state.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self.state.start_drain()
            self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        state = self.state
        timeout = state.settings.shutdown_timeout
        logger.warning(
            "shutting down: new requests get 503; waiting up to %.0f s for %d in flight",
            timeout,
            state.in_flight,
        )
        deadline = time.monotonic() + timeout
        while state.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if state.in_flight > 0:
            logger.warning("shutdown timeout reached; aborting %d requests still running", state.in_flight)
            # Each gets a 503 error (a last SSE event and [DONE] for streams) rather than a cut
            # body; waiting for them to finish lets those bytes out before connections close.
            await state.fail_in_flight_and_flush(ServerShutdown(), FAIL_FLUSH_S)
        self.should_exit = True

    def fail(self, message: str) -> None:
        """The engine could not start, or died once too often: exit non-zero."""
        print(f"error: {message}", file=sys.stderr, flush=True)
        self.exit_code = 1
        self.should_exit = True


def default_model_name(args: EngineArgs) -> str:
    if args.model is not None:
        return args.model
    from quire.models.default_model import default_model

    return default_model().served_name


def make_server_state(args: EngineArgs, settings: ServerSettings, log_level: str = "WARNING") -> ServerState:
    """The ``ServerState`` of one server: tokenizer, chat template, sampling defaults, served
    names and a ``ProcessEngineClient`` (not started; the app's lifespan starts it). Shared by
    ``serve`` and the Ray Serve replicas, so a replica serves exactly what ``quire serve`` would."""
    # The cache options are checked here, in a second, not in the engine process after a spawn
    # (where a ValueError is logged with a traceback): a bad --kv-cache-memory/--kv-cache-dtype
    # from a config file or EngineArgs is then one clear start-up error, as the CLI's checks are.
    args.cache_config()
    model_path = resolve_model_path(args)
    tokenizer = Tokenizer.from_path(model_path)  # fails fast, before anything slow, on a bad directory
    if settings.chat_template is not None:
        tokenizer.set_chat_template(read_template_argument(settings.chat_template))
    defaults = load_sampling_defaults(settings.generation_config, model_path)
    settings = dataclasses.replace(settings, sampling_defaults=defaults)
    names = settings.served_model_names or (default_model_name(args),)
    client = ProcessEngineClient(
        args, model_path, tokenizer, log_level=log_level, load_timeout=settings.engine_load_timeout
    )
    return ServerState(settings, client, names, model_path, args.max_num_seqs)


def serve(args: EngineArgs, settings: ServerSettings, log_level: str = "WARNING") -> int:
    """Run the server until it is stopped; returns the process exit code."""
    state = make_server_state(args, settings, log_level)
    settings, names, model_path = state.settings, state.model_names, state.model_path
    client = state.client
    assert isinstance(client, ProcessEngineClient)  # for remove_socket_dir below
    print(f"quire: {settings.sampling_defaults.describe()}", flush=True)
    config = uvicorn.Config(
        build_app(state),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=header_timeout_protocol(settings.header_timeout),
        log_config=None,  # keep the CLI's logging setup
        log_level=log_level.lower(),
        access_log=False,  # the request log line replaces it
        timeout_graceful_shutdown=int(FINAL_GRACE_S),
        root_path=settings.root_path,
        ssl_keyfile=settings.ssl_keyfile,
        ssl_certfile=settings.ssl_certfile,
    )
    server = DrainingServer(config, state)

    def announce() -> None:
        info = client.info
        assert info is not None
        print(
            f"quire: serving model '{names[0]}' from {Path(model_path)} at {server.address or settings.host}\n"
            f"quire: KV cache pool: {info.num_blocks} blocks x {info.block_size} tokens = "
            f"{info.kv_capacity_tokens} tokens; max_model_len {info.max_model_len}; "
            f"{info.kv_cache_dtype} cache, {info.dtype} compute on {info.device}; "
            f"max_num_seqs {args.max_num_seqs}\n"
            "quire: ready",
            flush=True,
        )

    state.on_ready.append(announce)
    state.on_fatal.append(server.fail)
    try:
        server.run()
    finally:
        client.remove_socket_dir()
    return server.exit_code
