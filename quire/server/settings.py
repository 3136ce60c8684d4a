"""The HTTP server's own knobs (everything the engine does not see), validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from quire.server.generation_defaults import SamplingDefaults
from quire.structured.tool_parsers import get_tool_parser, tool_parser_names


@dataclass(frozen=True)
class ServerSettings:
    """What ``quire serve`` adds on top of the engine's ``EngineArgs``.

    ``served_model_names``: the names clients put in ``model`` (the first is used in responses);
    empty means one name derived from the model path. ``max_waiting``: how many sequences may be
    queued beyond the ``max_num_seqs`` the engine runs at once before new requests get 503.
    ``request_timeout`` / ``shutdown_timeout`` are seconds; a request timeout of None never expires.
    ``trust_request_chat_template``: render Jinja chat templates that requests send (Jinja is a
    program: off, such requests get 400; the model's own templates are always allowed).
    ``chat_template``: a template file's path or the template itself, replacing the model's.
    ``generation_config``: ``auto``, ``vllm``/``none`` or a folder (see ``generation_defaults``);
    ``serve()`` resolves it into ``sampling_defaults``, which requests' unset fields take.
    ``allowed_origins``: CORS is on only when given; ``root_path``: the prefix a proxy strips;
    ``ssl_keyfile`` / ``ssl_certfile``: serve HTTPS (both or neither).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()
    api_keys: tuple[str, ...] = ()
    api_key_file: str | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_waiting: int = 256
    max_body_bytes: int = 4 << 20
    # Text prompts, in UTF-8 bytes, checked before tokenizing (which costs ~2 s per MB on CPU).
    max_prompt_bytes: int = 2 << 20
    request_timeout: float | None = 600.0
    shutdown_timeout: float = 30.0
    log_prompts: bool = False
    trust_request_chat_template: bool = False
    # Slow clients: a request's headers must arrive within header_timeout seconds of the
    # connection (or of the previous response), its body within body_timeout of the headers.
    header_timeout: float = 30.0
    body_timeout: float = 30.0
    # Engine supervision: a dead engine process is restarted at most max_engine_restarts times
    # within engine_restart_window seconds; one more death and the server exits non-zero.
    max_engine_restarts: int = 3
    engine_restart_window: float = 600.0
    # An engine that has not reported ready this long after its process started is killed and
    # counts as a failed start (first start: exit 1; a restart: one more death for the budget).
    engine_load_timeout: float = 1800.0
    # Tool calling: tool_choice "auto" parses the model's output with this --tool-call-parser,
    # and only when --enable-auto-tool-choice is given (vLLM's two flags).
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    chat_template: str | None = None
    generation_config: str = "auto"
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    root_path: str = ""
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.max_prompt_bytes < 1:
            raise ValueError(f"max_prompt_bytes must be at least 1, got {self.max_prompt_bytes}")
        if self.request_timeout is not None and not (
            self.request_timeout > 0 and math.isfinite(self.request_timeout)
        ):
            raise ValueError(
                f"request_timeout must be a positive number of seconds, got {self.request_timeout}"
            )
        if not (self.shutdown_timeout >= 0 and math.isfinite(self.shutdown_timeout)):
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        for name, value in (
            ("header_timeout", self.header_timeout),
            ("body_timeout", self.body_timeout),
            ("engine_restart_window", self.engine_restart_window),
            ("engine_load_timeout", self.engine_load_timeout),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if self.max_engine_restarts < 0:
            raise ValueError(
                f"max_engine_restarts must be >= 0 (0: exit when the engine dies), got {self.max_engine_restarts}"
            )
        for name in self.served_model_names:
            if not name or len(name) > 256:
                raise ValueError(f"served model names must be 1-256 characters, got {name!r}")
        if self.tool_call_parser is not None:
            get_tool_parser(self.tool_call_parser)  # ValueError naming the known parsers
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError(
                "--enable-auto-tool-choice needs --tool-call-parser NAME, the model's tool-call "
                f"format ({', '.join(tool_parser_names())})"
            )
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise ValueError(f"root_path must start with '/' and not end with one, got {self.root_path!r}")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("TLS needs both --ssl-keyfile and --ssl-certfile")
        for name, values in (
            ("allowed_origins", self.allowed_origins),
            ("allowed_methods", self.allowed_methods),
            ("allowed_headers", self.allowed_headers),
        ):
            if not all(isinstance(v, str) and v for v in values):
                raise ValueError(f"{name} must be a list of non-empty strings, got {list(values)!r}")

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_certfile else "http"
