"""claude-max-proxy: the OpenAI API on localhost, answered by your Claude subscription.

Any OpenAI client points at http://localhost:3456/v1; each request is answered by the official
Claude Code CLI (``claude -p``) logged in with your Pro/Max plan.

The path of a request:
  1. HTTP layer: guard (Host, Origin, API key, Content-Type), read and parse the JSON body.
  2. Request translation (pure): OpenAI request -> ``CliCall`` (model, system prompt, earlier
     turns for a resumable session file, the new user turn for stdin, options).
  3. CLI runner (I/O): ``claude -p --input-format stream-json --output-format stream-json`` in
     its own process group and a private empty directory, with an allow-listed environment
     (``cli_env_for``); the client's text goes in verbatim, never as a CLI command or file mention
     (``stdin_line_for``); JSON events read line by line.
  4. Process pool (I/O): ``ProcessPool.turn`` gives the call a process (a kept one, ready or still
     loading, or a new one in a free slot) as a ``Turn``, which iterates the turn's ``TurnEvent``s.
  5. Event translation (pure): CLI events -> ``TurnEvent``s -> a renderer's SSE frames or object;
     the HTTP layer writes them: headers wait for the first frame; errors in the client's envelope.

Client functions are offered to the model through an MCP server the proxy answers itself over the
CLI's control channel; a tool call is caught at the CLI's permission question. Processes are
kept between turns (``ProcessPool``): warm ones wait for first turns of the shapes recently asked
for, the one that answered is parked for the conversation's next turn, and for a client that
drops its context message from the history it sends back, the process is reseated in the
background at the history it will send (rewound and given that turn back, or resumed there:
predicted); so later turns neither start a CLI nor replay history. A first turn that finds no
warm process takes a parked conversation's, rewound to nothing, rather than wait for a load.

Every ``rate_limit_event`` and ``result`` a CLI prints is observed by the server: ``Limits`` keeps
the plan's latest limit state (headers on every answer, /health, ``--no-overage``), ``Metrics``
counts for GET /metrics. Limit and billing errors map through ``RESULT_ERRORS``/``UPSTREAM_ERRORS``.

Anthropic's Messages API (``/v1/messages``) is a second front door into the same runner: its
requests become the same ``CliCall`` and its answers are rendered from the same ``TurnEvent``s.

Sections, top to bottom: constants and tables, configuration, errors, request translation,
CLI runner (``CliRun``), process pool (``ProcessPool``, ``Turn``), event translation, the Responses
API, the Messages API, HTTP layer (server state, the application, the handler), the serve command,
doctor and service commands, main().
"""

import argparse
import base64
import binascii
import collections
import contextlib
import dataclasses
import datetime
import errno
import functools
import hashlib
import hmac
import http.client
import io
import ipaddress
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import stat
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Deque, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

__version__ = "0.1.0"

# ================================================================================================
# Constants and tables (the single sources of truth the README is checked against)
# ================================================================================================

DEFAULT_PORT = 3456
ENV_PREFIX = "CLAUDE_MAX_PROXY_"

# OpenAI-style model IDs -> the CLI's --model value. The CLI resolves an alias to the newest model
# of that family, so these stay correct as Anthropic ships new models.
MODELS = collections.OrderedDict([
    ("claude-opus-4", "opus"),
    ("claude-sonnet-4", "sonnet"),
    ("claude-haiku-4", "haiku"),
])
CLI_ALIASES = ("opus", "sonnet", "haiku")
FULL_MODEL_ID = re.compile(r"^claude-[a-z0-9][a-z0-9.\-]{0,100}$")
MODELS_CREATED = 1747699200  # 2025-05-20, a stable "created" for /v1/models

# Neutral stand-in when the client sends no system message: never Claude Code's agent prompt.
NEUTRAL_SYSTEM_PROMPT = "You are Claude, an AI assistant made by Anthropic. Be helpful and direct."

# How each chat-completions parameter is treated: (support, note). The README's parameter table
# is generated from this and a test keeps them equal.
PARAMETERS = collections.OrderedDict([
    ("model", ("honored", "see the model table; omitted -> the configured default")),
    ("messages", ("honored", "system/developer -> system prompt; turns replayed as real turns")),
    ("stream", ("honored", "SSE chunks as the CLI streams tokens")),
    ("stream_options", ("honored", "`include_usage` adds a final usage chunk")),
    ("max_completion_tokens", ("honored", "-> `CLAUDE_CODE_MAX_OUTPUT_TOKENS`")),
    ("max_tokens", ("honored", "same as `max_completion_tokens`")),
    ("stop", ("emulated", "up to 4, of at most 1,000 characters; the stream is cut at the first "
                          "stop string and the CLI ended")),
    ("n", ("rejected", "only `n: 1`; more -> 400")),
    ("logprobs", ("rejected", "`true` -> 400; the CLI exposes no log probabilities")),
    ("top_logprobs", ("rejected", "any value -> 400")),
    ("temperature", ("ignored", "accepted (0-2), the CLI has no sampling controls")),
    ("top_p", ("ignored", "accepted (0-1)")),
    ("seed", ("ignored", "accepted")),
    ("presence_penalty", ("ignored", "accepted (-2 to 2)")),
    ("frequency_penalty", ("ignored", "accepted (-2 to 2)")),
    ("logit_bias", ("ignored", "accepted")),
    ("user", ("ignored", "accepted")),
    ("metadata", ("ignored", "accepted")),
    ("tools", ("honored", "function tools, offered to the model with their JSON schemas")),
    ("functions", ("honored", "legacy form of `tools`, answered in its own shape: `message.function_call` "
                              "(one call per turn) and `finish_reason: function_call`")),
    ("tool_choice", ("emulated", "`auto` honored; `none` hides the tools; `required` and a named "
                                 "function become an instruction in the system prompt")),
    ("function_call", ("emulated", "legacy form of `tool_choice`, same treatment")),
    ("parallel_tool_calls", ("emulated", "`false` returns only the first call and ends the CLI")),
    ("response_format", ("honored", "`json_schema` -> `--json-schema`; `json_object` -> any object")),
    ("reasoning_effort", ("honored", "-> `--effort` (minimal->low, low, medium, high, xhigh, max)")),
    ("include_reasoning", ("honored", "proxy extension: `true` streams thinking as `reasoning_content`")),
    ("store", ("ignored", "accepted; nothing is stored")),
    ("service_tier", ("ignored", "accepted")),
])

# /v1/completions (the legacy text API): the prompt is text to continue, not a chat, so Claude is
# told so in the system prompt; with a `suffix` it fills the gap between the two (as editors'
# autocomplete asks). Both prompts are the proxy's own, stated here and in the README.
COMPLETION_SYSTEM_PROMPT = (
    "You are a text completion engine. The user message is a text to continue. Reply with only its "
    "continuation, starting exactly where the text stops, with no preamble, commentary or quotes.")
FILL_IN_THE_MIDDLE_SYSTEM_PROMPT = (
    "You are a fill-in-the-middle completion engine. The user message has the text before a gap "
    "inside <prefix></prefix> and the text after the gap inside <suffix></suffix>. Reply with only "
    "the text that belongs in the gap, with no preamble, commentary, quotes or tags.")

# How each /v1/completions parameter is treated, like PARAMETERS for chat completions.
COMPLETION_PARAMETERS = collections.OrderedDict([
    ("model", ("honored", "as for chat completions")),
    ("prompt", ("honored", "a string or a list of one string, continued under a completion system "
                           "prompt; token-id lists and several prompts -> 400")),
    ("suffix", ("emulated", "prompt and suffix are sent as `<prefix>`/`<suffix>` under a "
                            "fill-in-the-middle system prompt; the answer is the gap")),
    ("stream", ("honored", "`text_completion` chunks, then `data: [DONE]`")),
    ("stream_options", ("honored", "`include_usage` adds a final usage chunk")),
    ("max_tokens", ("honored", "-> `CLAUDE_CODE_MAX_OUTPUT_TOKENS`; omitted -> the model's default "
                               "(OpenAI's default of 16 is not applied)")),
    ("stop", ("emulated", "as for chat completions")),
    ("echo", ("rejected", "`true` -> 400; only the new text comes back")),
    ("n", ("rejected", "only `n: 1`")),
    ("best_of", ("rejected", "only `best_of: 1`")),
    ("logprobs", ("rejected", "any value but null -> 400")),
    ("temperature", ("ignored", "accepted (0-2)")),
    ("top_p", ("ignored", "accepted (0-1)")),
    ("presence_penalty", ("ignored", "accepted (-2 to 2)")),
    ("frequency_penalty", ("ignored", "accepted (-2 to 2)")),
    ("seed", ("ignored", "accepted")),
    ("logit_bias", ("ignored", "accepted")),
    ("user", ("ignored", "accepted")),
])


def readme_tables() -> str:
    """The README's model and parameter tables, generated so they cannot drift from the code."""
    lines = ["| model ID you send | CLI `--model` |", "|---|---|"]
    lines += ["| `%s` | `%s` |" % (k, v) for k, v in MODELS.items()]
    lines += ["| `%s` | `%s` |" % (a, a) for a in CLI_ALIASES]
    lines += ["| any `claude-…` ID | passed as is |", ""] + parameter_table(PARAMETERS)
    return "\n".join(lines)


def parameter_table(parameters: Dict[str, Tuple[str, str]]) -> List[str]:
    return ["| parameter | support | how |", "|---|---|---|"] + [
        "| `%s` | %s | %s |" % (name, support, note) for name, (support, note) in parameters.items()]


def readme_completion_table() -> str:
    """The README's /v1/completions parameter table, generated from COMPLETION_PARAMETERS."""
    return "\n".join(parameter_table(COMPLETION_PARAMETERS))


# Upstream HTTP status (as the CLI reports it in `api_error_status`) -> our OpenAI-shaped error.
UPSTREAM_ERRORS = {
    400: (400, "invalid_request_error", "upstream_invalid_request"),
    401: (401, "authentication_error", "invalid_api_key"),
    403: (401, "authentication_error", "invalid_api_key"),
    404: (404, "invalid_request_error", "model_not_found"),
    413: (413, "invalid_request_error", "request_too_large"),
    429: (429, "rate_limit_error", "rate_limit_exceeded"),
    529: (503, "server_error", "overloaded"),
}
# CLI result fields that say more than the upstream status alone, checked in order before
# UPSTREAM_ERRORS: (field, pattern, (HTTP status, type, code)). Billing refusals are a 402 that no
# OpenAI client retries (they retry 408, 409, 429 and 5xx): retrying cannot change the answer.
RESULT_ERRORS = [
    ("terminal_reason", r"^prompt_too_long$", (400, "invalid_request_error", "context_length_exceeded")),
    ("api_error", r"^usage_limit_reached$", (429, "rate_limit_error", "rate_limit_exceeded")),
    # Anthropic's billing classifier has no structured code: its text is all there is.
    ("result", r"\bextra usage\b", (402, "billing_error", "extra_usage_required")),
]
EXTRA_USAGE_HINT = (
    "Anthropic answers this way when it counts a request as coming from a third-party app, which "
    "draws from extra usage instead of your plan limits; users see it triggered by another agent's "
    "identity in the system prompt and by certain tool sets. The proxy does not retry or alter "
    "requests to get around it. See the README, \"Limits, extra usage and billing\" "
    "(#limits-extra-usage-and-billing).")
# The Retry-After for an upstream 429 that is not the usage limit: the CLI does not pass on
# Anthropic's own value, and these clear within seconds.
UPSTREAM_RETRY_AFTER = 5
LOGIN_HINT = ("The Claude CLI is not authenticated: run `claude auth login` (or `claude setup-token` "
              "and set CLAUDE_CODE_OAUTH_TOKEN for a service).")
# Client functions reach the model as tools of an MCP server the proxy itself answers (over the
# CLI's control channel); the model sees them as mcp__<server>__<name>.
MCP_SERVER = "client"
MCP_PREFIX = "mcp__%s__" % MCP_SERVER
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # fullmatch: `$` would let a final "\n" through
TOOL_CALL_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
MAX_TOOL_DESCRIPTION_CHARS = 16384  # the most the CLI passes on (CLAUDE_CODE_MAX_MCP_DESCRIPTION_LENGTH)
MAX_STOP_CHARS = 1000               # per stop string
STRUCTURED_OUTPUT_TOOL = "StructuredOutput"  # the CLI's tool for --json-schema answers
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
MAX_IMAGE_BYTES = 5 * 1024 * 1024  # Anthropic's per-image limit
EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh",
           "max": "max"}
# After tool results, a resumed session needs a new user line to start the turn (see README).
TOOL_RESULTS_PROMPT = "Continue, using the tool results above."
# The CLI's environment is built from these names, never inherited whole: what it needs to run,
# plus the Claude Code settings a user sets on purpose. The README lists them (a test checks).
CLI_ENV_NAMES = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "TZ", "TMPDIR", "TMP", "TEMP",
    "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR",
    "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS",
    "SYSTEMROOT", "COMSPEC", "PATHEXT", "APPDATA", "LOCALAPPDATA", "USERPROFILE",
    "CLAUDE_CONFIG_DIR", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_BASE_URL", "API_TIMEOUT_MS",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "DISABLE_AUTOUPDATER", "DISABLE_TELEMETRY",
    "DISABLE_ERROR_REPORTING",
)
CLI_ENV_PREFIXES = ("LC_",)
# These bill an API account instead of the subscription: passed only with --use-api-key.
API_KEY_NAMES = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")
FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                  "tool_use": "tool_calls", "refusal": "content_filter", "pause_turn": "stop"}


# ================================================================================================
# Configuration: flags and environment, validated once
# ================================================================================================

@dataclasses.dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    claude: str = "claude"
    default_model: str = "claude-sonnet-4"
    workdir: str = ""
    request_timeout: float = 600.0
    idle_timeout: float = 300.0
    max_body_bytes: int = 10 * 1024 * 1024
    max_messages: int = 2000
    max_concurrency: int = 4
    max_queue: int = 32
    queue_timeout: float = 120.0
    cli_max_retries: int = 0
    api_keys: Tuple[str, ...] = ()
    allowed_hosts: Tuple[str, ...] = ()
    allowed_origins: Tuple[str, ...] = ()
    allow_unauthenticated_remote: bool = False
    log_prompts: bool = False
    shutdown_grace: float = 30.0
    include_reasoning: bool = False
    max_parked: int = dataclasses.field(default_factory=lambda: default_max_parked(*machine_memory()))
    parked_ttl: float = 300.0
    warm: int = 6
    allow_image_fetch: bool = False
    client_timeout: float = 30.0
    no_overage: bool = False
    use_api_key: bool = False
    read_timeout: float = 30.0
    max_connections: int = 128


# (flag, type, help). Each flag's env var is CLAUDE_MAX_PROXY_<FLAG>, its field the flag in snake case.
OPTIONS = [
    ("--host", str, "address to bind (default 127.0.0.1; anything else needs an API key)"),
    ("--port", int, "port to bind (default 3456; 0 picks a free one)"),
    ("--claude", str, "path or name of the Claude Code CLI (default: `claude` on PATH)"),
    ("--default-model", str, "model used when a request names none (default claude-sonnet-4)"),
    ("--workdir", str, "private empty working directory for the CLI, outside HOME (default under "
                       "$XDG_RUNTIME_DIR or the temp dir)"),
    ("--request-timeout", float, "seconds a request may take in all (default 600) -> 504"),
    ("--idle-timeout", float, "seconds the CLI may stay silent (default 300) -> 504"),
    ("--max-body-bytes", int, "largest request body accepted (default 10 MiB) -> 413"),
    ("--max-messages", int, "most messages in one request (default 2000)"),
    ("--max-concurrency", int, "CLI processes answering at once (default 4); kept ones do not count"),
    ("--max-queue", int, "requests waiting for a free slot before 429 (default 32)"),
    ("--queue-timeout", float, "seconds a request may wait for a slot (default 120) -> 429"),
    ("--cli-max-retries", int, "CLAUDE_CODE_MAX_RETRIES given to the CLI (default 0: clients retry themselves)"),
    ("--api-key", str, "require `Authorization: Bearer KEY` (comma-separated for several)"),
    ("--api-key-file", str, "file holding the API key(s), one per line (keeps keys out of ps)"),
    ("--allowed-hosts", str, "extra Host names accepted besides loopback (comma-separated)"),
    ("--allowed-origins", str, "browser origins allowed to call (comma-separated), with CORS"),
    ("--allow-unauthenticated-remote", bool, "bind a non-loopback address without an API key"),
    ("--log-prompts", bool, "debug: log prompt text in the access log"),
    ("--shutdown-grace", float, "seconds in-flight requests get on SIGTERM (default 30)"),
    ("--include-reasoning", bool, "stream the model's thinking as `reasoning_content` by default"),
    ("--max-parked", int, "CLI processes kept between turns, warm or parked for the next turn of "
                          "their conversation or for tool results (default: from memory, see "
                          "`doctor`; 0 turns process reuse off)"),
    ("--parked-ttl", float, "seconds a parked or warm process is kept before it is ended (default 300)"),
    ("--warm", int, "most processes pre-started per kind of first turn, as many as its recent "
                    "demand asks for; as many for a first turn naming nothing at start-up "
                    "(default 6; 0 = none)"),
    ("--client-timeout", float, "seconds a client may stall sending or reading before it is dropped "
                                "and its CLI ended (default 30)"),
    ("--allow-image-fetch", bool, "download http(s) image URLs in prompts (off: they get a 400)"),
    ("--no-overage", bool, "refuse requests (402) once the CLI reports that extra usage (overage) "
                           "pays for them, until the plan limit resets"),
    ("--read-timeout", float, "seconds a client has in all to send a request's head (and the body, "
                              "at least 64 KiB/s) before it is dropped (default 30)"),
    ("--max-connections", int, "open client connections at once; more get a 503 (default 128)"),
    ("--use-api-key", bool, "let the CLI use ANTHROPIC_API_KEY / ANTHROPIC_AUTH_TOKEN from the "
                            "environment, billing that API account (off: they are ignored)"),
]


class ConfigError(Exception):
    """A flag or environment value that makes the server refuse to start."""


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def default_workdir(environ: Dict[str, str]) -> str:
    """Outside HOME: the CLI names its working directory to the model in every request (a path
    under HOME carries the user name, and HOME may be a git repository of dotfiles)."""
    runtime = environ.get("XDG_RUNTIME_DIR") or ""
    base = runtime if os.path.isabs(runtime) else tempfile.gettempdir()
    return os.path.join(base, "claude-max-proxy-cwd-%d" % os.getuid())


# A parked real CLI holds ~115 MB of private memory and 160-320 MB RSS: the kept cap's default
# reserves the larger figure for each, in at most a quarter of RAM and half of what is available.
CLI_PROCESS_BYTES = 320 * 10 ** 6
MAX_KEPT_DEFAULT = 32       # however large the machine: each kept process is one more CLI to reap
FALLBACK_MAX_KEPT = 4       # where the machine will not say how much memory it has


@functools.lru_cache(maxsize=1)
def machine_memory() -> Tuple[Optional[int], Optional[int]]:
    """(total, available) bytes of RAM as the OS reports them; None for what it does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
        kib = lambda name: int(fields[name].split()[0]) * 1024 if name in fields else None  # noqa: E731
        return kib("MemTotal"), kib("MemAvailable")
    except (OSError, ValueError):
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["/usr/sbin/sysctl", "-n", "hw.memsize"], capture_output=True,
                                 stdin=subprocess.DEVNULL, timeout=5)
            return int(out.stdout.strip()), None
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
    return None, None


def default_max_parked(total: Optional[int], available: Optional[int]) -> int:
    """How many CLI processes to keep between turns by default, from the machine's memory."""
    if not total:
        return FALLBACK_MAX_KEPT
    budget = total // 4 if available is None else min(total // 4, available // 2)
    return max(1, min(MAX_KEPT_DEFAULT, budget // CLI_PROCESS_BYTES))


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and real loopback addresses; `127.evil.example` is not one."""
    host = host.strip("[]").lower()
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_from(args: Dict[str, Any], environ: Dict[str, str]) -> Config:
    """Build a Config from parsed flags (None = not given) and the environment; flags win."""
    values = {}
    for flag, kind, _ in OPTIONS:
        key = flag.lstrip("-").replace("-", "_")
        raw = args.get(key)
        if raw is None or raw is False:
            raw = environ.get(env_name(flag))
            if raw is None:
                continue
            try:
                raw = (raw.lower() in ("1", "true", "yes", "on")) if kind is bool else kind(raw)
            except ValueError:
                raise ConfigError("%s=%r is not a valid %s" % (env_name(flag), raw, kind.__name__))
        values[key] = raw
    keys = [k for k in (values.pop("api_key", "") or "").split(",") if k.strip()]
    key_file = values.pop("api_key_file", None)
    if key_file:
        try:
            with open(key_file, encoding="utf-8") as handle:
                keys += [line.strip() for line in handle if line.strip()]
        except OSError as exc:
            raise ConfigError("cannot read --api-key-file: %s" % exc)
    for name in ("allowed_hosts", "allowed_origins"):
        if name in values:
            values[name] = tuple(v.strip() for v in values[name].split(",") if v.strip())
    config = Config(api_keys=tuple(k.strip() for k in keys), **values)
    if not config.workdir:
        config.workdir = default_workdir(environ)
    if not 0 <= config.port <= 65535:
        raise ConfigError("--port must be 0-65535")
    for name in ("request_timeout", "idle_timeout", "max_body_bytes", "max_concurrency",
                 "max_messages", "client_timeout", "read_timeout", "max_connections"):
        if getattr(config, name) <= 0:
            raise ConfigError("--%s must be positive" % name.replace("_", "-"))
    try:
        resolve_model(config.default_model, config.default_model)
    except ApiError as exc:
        raise ConfigError("--default-model: %s" % exc.message)
    if not is_loopback_host(config.host) and not config.api_keys \
            and not config.allow_unauthenticated_remote:
        raise ConfigError(
            "refusing to bind %s without an API key: any machine that can reach it could spend "
            "your subscription. Set --api-key/--api-key-file, or bind 127.0.0.1." % config.host)
    return config


# ================================================================================================
# Errors: one exception type carrying an OpenAI error
# ================================================================================================

class ApiError(Exception):
    """An OpenAI-shaped error: every failure path ends in this envelope."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def reject_json_constant(name: str) -> Any:
    """NaN and Infinity are not JSON: refuse them rather than pass them on to the CLI."""
    raise ValueError("%s is not valid JSON" % name)


def invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


# ================================================================================================
# Request translation (pure): OpenAI request -> CliCall
# ================================================================================================

@dataclasses.dataclass
class CliCall:
    """Everything needed to run one turn on the CLI, decided before any process exists."""
    model: str                       # the --model value
    requested_model: str             # what the client asked for, after prefix stripping
    system_prompt: str
    history: List[Dict[str, Any]]    # earlier turns, Anthropic-style {"role", "content": [blocks]}
    prompt: List[Dict[str, Any]]     # content blocks of the new user turn (goes through stdin)
    stream: bool = False
    include_usage: bool = False
    max_output_tokens: Optional[int] = None
    stop: Tuple[str, ...] = ()
    tools: Tuple["ClientTool", ...] = ()   # offered to the model through the proxy's MCP server
    parallel_tool_calls: bool = True
    json_schema: Optional[Dict[str, Any]] = None
    effort: Optional[str] = None
    include_reasoning: bool = False
    legacy_functions: bool = False   # asked with `functions`: answered with `function_call`

    def client_name(self, upstream_name: str) -> Optional[str]:
        """The client's name for a tool the model called, or None if it is not a client tool."""
        for tool in self.tools:
            if MCP_PREFIX + tool.mcp_name == upstream_name:
                return tool.name
        return None


@dataclasses.dataclass(frozen=True)
class ClientTool:
    name: str            # as the client named it
    mcp_name: str        # as the MCP server lists it (the model sees MCP_PREFIX + mcp_name)
    description: str
    schema: str          # JSON text of the input schema (a string keeps the dataclass hashable)

    def listing(self) -> Dict[str, Any]:
        return {"name": self.mcp_name, "description": self.description,
                "inputSchema": json.loads(self.schema)}


def resolve_model(name: Optional[str], default: str) -> Tuple[str, str]:
    """Client model name -> (name as the client meant it, the CLI's --model value)."""
    if name is None:
        name = default
    if not isinstance(name, str) or not name.strip():
        raise invalid("model", "`model` must be a non-empty string", "invalid_type")
    bare = name.strip().rsplit("/", 1)[-1]
    lowered = bare.lower()
    if lowered in MODELS:
        return lowered, MODELS[lowered]
    if lowered in CLI_ALIASES:
        return lowered, lowered
    if FULL_MODEL_ID.match(lowered):
        return lowered, lowered
    raise ApiError(404, "The model %s does not exist. Known models: %s, or any full claude-* "
                   "model ID." % (json.dumps(name[:200]), ", ".join(list(MODELS) + list(CLI_ALIASES))),
                   "invalid_request_error", "model_not_found", "model")


def check_encodable(text: str, param: str) -> None:
    """JSON allows lone surrogates; UTF-8 (and so the CLI) does not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(param, "`%s` contains invalid Unicode (a lone surrogate)" % param, "invalid_value")


def text_blocks_of(content: Any, param: str, remote_images: bool = False) -> List[Dict[str, Any]]:
    """OpenAI message content (string or parts) -> Anthropic content blocks, empties dropped.

    With `remote_images` an http(s) image becomes a `url` image block, to be fetched once the
    whole request is valid (call_with_images); without, it is a 400."""
    if content is None:
        return []
    if isinstance(content, str):
        check_encodable(content, param)
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise invalid(param, "`%s` must be a string or an array of content parts" % param, "invalid_type")
    blocks = []
    for i, part in enumerate(content):
        where = "%s[%d]" % (param, i)
        if not isinstance(part, dict):
            raise invalid(where, "`%s` must be an object" % where, "invalid_type")
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(where + ".text", "`%s.text` must be a string" % where, "invalid_type")
            check_encodable(text, where + ".text")
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "refusal":
            if isinstance(part.get("refusal"), str) and part["refusal"]:
                blocks.append({"type": "text", "text": part["refusal"]})
        elif kind in ("image_url", "input_image"):
            blocks.append(image_block_of(part, where, remote_images))
        elif kind in ("input_audio", "file", "input_file"):
            raise invalid(where, "content parts of type `%s` are not supported" % kind, "unsupported_content")
        else:
            raise invalid(where + ".type", "unknown content part type %r" % (kind,), "invalid_type")
    return blocks


def image_block_of(part: Dict[str, Any], where: str, remote_images: bool = False) -> Dict[str, Any]:
    """An image_url part with a data: URL -> an Anthropic base64 image block."""
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise invalid(where + ".image_url", "`%s.image_url.url` must be a string" % where, "invalid_type")
    if re.match(r"^https?://", url, re.I) and remote_images:
        return {"type": "image", "source": {"type": "url", "url": url}}
    if re.match(r"^https?://", url, re.I):
        raise invalid(where + ".image_url", "remote image URLs are not fetched (the proxy does not go to "
                      "the internet on a prompt's behalf unless started with --allow-image-fetch): send "
                      "the image as a data: URL", "unsupported_image_url")
    match = re.match(r"^data:([\w/+.-]+);base64,(.*)$", url, re.S)
    if not match:
        raise invalid(where + ".image_url", "images must be data:<type>;base64,<data> URLs", "invalid_image_url")
    media_type, data = match.group(1).lower(), re.sub(r"\s+", "", match.group(2))
    if media_type == "image/jpg":
        media_type = "image/jpeg"
    if media_type not in IMAGE_TYPES:
        raise invalid(where + ".image_url", "image type %s is not supported (png, jpeg, gif, webp)"
                      % media_type, "unsupported_image_type")
    if len(data) > MAX_IMAGE_BYTES:  # Anthropic counts the base64 text against its 5 MB limit
        raise invalid(where + ".image_url", "the image is over %d MB" % (MAX_IMAGE_BYTES // 2 ** 20),
                      "image_too_large")
    try:
        base64.b64decode(data, validate=True)
    except (ValueError, binascii.Error):
        raise invalid(where + ".image_url", "the image data is not valid base64", "invalid_image_url")
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def check_parameters(body: Dict[str, Any]) -> None:
    """Type- and range-check the parameters we accept, including the ones we ignore."""
    def number(name, low, high):
        value = body.get(name)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise invalid(name, "`%s` must be a number between %s and %s" % (name, low, high))

    number("temperature", 0, 2)
    number("top_p", 0, 1)
    number("presence_penalty", -2, 2)
    number("frequency_penalty", -2, 2)
    for name, kinds in (("seed", int), ("user", str), ("metadata", dict), ("logit_bias", dict),
                        ("store", bool), ("service_tier", str), ("stream", bool),
                        ("stream_options", dict), ("logprobs", bool)):
        value = body.get(name)
        if value is not None and (not isinstance(value, kinds) or (kinds is int and isinstance(value, bool))):
            raise invalid(name, "`%s` has the wrong type" % name, "invalid_type")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise invalid("n", "`n` must be a positive integer")
    if n is not None and n > 1:
        raise invalid("n", "only n=1 is supported: the Claude CLI produces one answer per request",
                      "unsupported_value")
    if body.get("logprobs"):
        raise invalid("logprobs", "log probabilities are not available through the Claude CLI",
                      "unsupported_value")
    if body.get("top_logprobs") is not None:
        raise invalid("top_logprobs", "log probabilities are not available through the Claude CLI",
                      "unsupported_value")
    if body.get("stream_options") is not None and not body.get("stream"):
        raise invalid("stream_options", "`stream_options` is only allowed when `stream` is true")


def max_output_tokens_of(body: Dict[str, Any]) -> Optional[int]:
    found = None
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise invalid(name, "`%s` must be a positive integer" % name)
        found = value if found is None else found
    return found


def stop_strings_of(body: Dict[str, Any]) -> Tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise invalid("stop", "`stop` must be a non-empty string or an array of up to 4 of them")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise invalid("stop", "each stop string must be at most %d characters" % MAX_STOP_CHARS,
                      "string_above_max_length")
    for s in stop:
        check_encodable(s, "stop")
    return tuple(stop)


def mcp_name_for(name: str) -> str:
    """A client tool name the model can see after the MCP prefix (64 characters in all)."""
    room = 64 - len(MCP_PREFIX)
    if len(name) <= room:
        return name
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    return name[:room - 9] + "_" + digest


def tools_of(body: Dict[str, Any]) -> Tuple[ClientTool, ...]:
    """`tools` (or legacy `functions`) -> ClientTools, validated like OpenAI does."""
    raw, param = body.get("tools"), "tools"
    if raw is None and body.get("functions") is not None:
        raw, param = [{"type": "function", "function": f} for f in body["functions"]] \
            if isinstance(body["functions"], list) else body["functions"], "functions"
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise invalid(param, "`%s` must be an array" % param, "invalid_type")
    specs = []
    for i, entry in enumerate(raw):
        where = "%s[%d]" % (param, i)
        if not isinstance(entry, dict) or entry.get("type") != "function" or not isinstance(entry.get("function"), dict):
            raise invalid(where, "only tools of type `function` (with a `function` object) are supported",
                          "unsupported_tool")
        function = entry["function"]
        field = where + (".function." if param == "tools" else ".")  # the path the client wrote
        specs.append((field, "parameters", function.get("name"), function.get("description"),
                      function.get("parameters")))
    return client_tools_from(specs, "function")


def client_tools_from(specs: List[Tuple[str, str, Any, Any, Any]], noun: str) -> Tuple[ClientTool, ...]:
    """(client's field prefix, its schema field, name, description, schema) per tool -> ClientTools,
    checked the same way whichever API they came in (`noun` is that API's word for a tool)."""
    tools, seen, upstream_names = [], set(), set()
    for field, schema_field, name, description, schema in specs:
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise invalid(field + "name", "%s names must match ^[a-zA-Z0-9_-]{1,64}$" % noun)
        if name in seen:
            raise invalid(field + "name", "duplicate %s name %r" % (noun, name))
        if mcp_name_for(name) in upstream_names:
            raise invalid(field + "name", "%s name %r collides with another one once shortened to "
                          "fit the model's 64 characters" % (noun, name))
        seen.add(name)
        upstream_names.add(mcp_name_for(name))
        description = description or ""
        if not isinstance(description, str):
            raise invalid(field + "description", "`description` must be a string", "invalid_type")
        if len(description) > MAX_TOOL_DESCRIPTION_CHARS:  # rather than cut short without a word
            raise invalid(field + "description", "`description` is over %d characters"
                          % MAX_TOOL_DESCRIPTION_CHARS, "string_above_max_length")
        if schema is None:
            schema = {"type": "object", "properties": {}}
        if not isinstance(schema, dict):
            raise invalid(field + schema_field, "`%s` must be a JSON schema object" % schema_field, "invalid_type")
        if schema.get("type") is None:
            schema = dict(schema, type="object")
        tools.append(ClientTool(name, mcp_name_for(name), description, json.dumps(schema, sort_keys=True)))
    return tuple(tools)


def tool_choice_of(body: Dict[str, Any], tools: Tuple[ClientTool, ...]) -> Tuple[str, Optional[str]]:
    """`tool_choice` / legacy `function_call` -> (auto|none|required|named, the named tool)."""
    choice, param = body.get("tool_choice"), "tool_choice"
    if choice is None and body.get("function_call") is not None:
        choice, param = body["function_call"], "function_call"
        if isinstance(choice, dict):
            choice = {"type": "function", "function": choice}
    if choice is None:
        return "auto", None
    if choice in ("auto", "none", "required"):
        if choice == "required" and not tools:
            raise invalid(param, "`tool_choice: required` needs `tools`")
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not any(t.name == name for t in tools):
            raise invalid(param, "`%s` names a function that is not in `tools`: %r" % (param, name))
        return "named", name
    raise invalid(param, "`%s` must be auto, none, required or {type: function, function: {name}}" % param)


def response_format_of(body: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """`response_format` -> the JSON schema the answer must follow (None for plain text)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise invalid("response_format", "`response_format.type` must be text, json_object or json_schema")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "object"}
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise invalid("response_format.json_schema.schema", "a JSON schema object is required")
    if len(json.dumps(schema)) > 100000:
        raise invalid("response_format.json_schema.schema", "the schema is over 100 KB")
    return schema


def effort_of(body: Dict[str, Any]) -> Optional[str]:
    effort = body.get("reasoning_effort")
    if effort is None and isinstance(body.get("reasoning"), dict):
        effort = body["reasoning"].get("effort")
    if effort is None:
        return None
    if not isinstance(effort, str) or effort not in EFFORTS:
        raise invalid("reasoning_effort", "`reasoning_effort` must be one of %s" % ", ".join(EFFORTS))
    return EFFORTS[effort]


def tool_use_of(call: Any, where: str, names: Dict[str, str], field: Optional[str] = None) -> Dict[str, Any]:
    """An OpenAI tool call from an assistant message -> an Anthropic tool_use block.

    `field` is the client's path to the function's fields (legacy function_call has no `.function`)."""
    field = field or where + ".function."
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise invalid(where, "`%s` must be a function tool call" % where, "invalid_type")
    call_id, function = call.get("id"), call["function"]
    if not isinstance(call_id, str) or not TOOL_CALL_ID.fullmatch(call_id):
        raise invalid(where + ".id", "tool call ids must match ^[A-Za-z0-9_-]{1,128}$")
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise invalid(field + "name", "function names must match ^[a-zA-Z0-9_-]{1,64}$")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        check_encodable(arguments, field + "arguments")
    try:
        parsed = json.loads(arguments or "{}") if isinstance(arguments, str) else None
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        raise invalid(field + "arguments", "`arguments` must be a JSON object in a string")
    check_encodable(json.dumps(parsed, ensure_ascii=False), field + "arguments")  # "\ud800" escapes too
    return {"type": "tool_use", "id": call_id, "name": MCP_PREFIX + names.get(name, mcp_name_for(name)),
            "input": parsed}


# The tool-call ids a client gets are the CLI's with "x", "_" and "-" escaped as "xx", "xu", "xd":
# letters and digits only, so a client that strips every other character (OpenClaw) sends back
# the very id it got, and cli_tool_id maps it back to the CLI's exactly.
TOOL_ID_ESCAPES = {"x": "xx", "_": "xu", "-": "xd"}
TOOL_ID_UNESCAPES = {escaped: char for char, escaped in TOOL_ID_ESCAPES.items()}
# OpenClaw's Responses mode sends a call_id back as call_<id>_fc_<item id>_<hash>.
WRAPPED_CALL_ID = re.compile(r"call_([A-Za-z0-9]+)_fc_[A-Za-z0-9_-]*")


def client_tool_id(cli_id: str) -> str:
    """The id a chat or Responses client gets for a tool call of the CLI."""
    return "".join(TOOL_ID_ESCAPES.get(char, char) for char in cli_id)


def cli_tool_id(client_id: str) -> str:
    """The CLI's id for a tool-call id a client sent back (as given, sanitized to letters and
    digits, or wrapped by OpenClaw); an id the proxy never gave comes back unchanged."""
    wrapped = WRAPPED_CALL_ID.fullmatch(client_id)
    escaped = wrapped.group(1) if wrapped else client_id
    if not re.fullmatch(r"[A-Za-z0-9]+", escaped):
        return client_id
    parts, at = [], 0
    while at < len(escaped):
        step = 2 if escaped[at] == "x" else 1
        piece = escaped[at:at + step]
        if step == 2 and piece not in TOOL_ID_UNESCAPES:
            return client_id
        parts.append(TOOL_ID_UNESCAPES.get(piece, piece))
        at += step
    return "".join(parts)


def tool_result_of(tool_call_id: Any, content: Any, where: str, is_error: bool = False) -> Dict[str, Any]:
    if not isinstance(tool_call_id, str) or not tool_call_id:
        raise invalid(where + ".tool_call_id", "`tool_call_id` is required", "missing_required_parameter")
    if not TOOL_CALL_ID.fullmatch(tool_call_id):
        raise invalid(where + ".tool_call_id", "tool call ids must match ^[A-Za-z0-9_-]{1,128}$")
    blocks = text_blocks_of(content, where + ".content")
    text = "".join(b.get("text", "") for b in blocks if b["type"] == "text")
    # The same shape the CLI gives a result its MCP server returned (an error's as a bare string):
    # cold and warm turns match.
    if is_error:
        return {"type": "tool_result", "tool_use_id": tool_call_id, "content": text, "is_error": True}
    return {"type": "tool_result", "tool_use_id": tool_call_id, "content": [{"type": "text", "text": text}]}


def turns_from_messages(messages: Any, max_messages: int, tools: Tuple[ClientTool, ...] = (),
                        remote_images: bool = False) -> Tuple[str, List[Dict[str, Any]]]:
    """OpenAI messages -> (system prompt, alternating Anthropic turns); same roles are merged.

    Tool calls become tool_use blocks in the assistant turn and tool results tool_result blocks in
    the next user turn, so the model sees the exchange as it happened."""
    if not isinstance(messages, list):
        raise invalid("messages", "`messages` must be an array", "invalid_type")
    if not messages:
        raise invalid("messages", "`messages` must contain at least one message")
    if len(messages) > max_messages:
        raise invalid("messages", "too many messages (%d > %d)" % (len(messages), max_messages))
    names = {t.name: t.mcp_name for t in tools}
    system_parts, role_blocks = [], []
    legacy_calls = []  # ids given to legacy function_call messages, answered in order by name
    for i, message in enumerate(messages):
        param = "messages[%d]" % i
        if not isinstance(message, dict):
            raise invalid(param, "`%s` must be an object" % param, "invalid_type")
        role = message.get("role")
        if role in ("system", "developer"):
            system_parts += [b["text"] for b in text_blocks_of(message.get("content"), param + ".content")
                             if b["type"] == "text"]
            continue
        if role == "user":
            blocks = text_blocks_of(message.get("content"), param + ".content", remote_images)
        elif role == "assistant":
            blocks = [b for b in text_blocks_of(message.get("content"), param + ".content") if b["type"] == "text"]
            calls = message.get("tool_calls")
            if calls is not None and not isinstance(calls, list):
                raise invalid(param + ".tool_calls", "`tool_calls` must be an array", "invalid_type")
            for j, call in enumerate(calls or []):
                blocks.append(tool_use_of(call, "%s.tool_calls[%d]" % (param, j), names))
                blocks[-1]["id"] = cli_tool_id(blocks[-1]["id"])
            legacy = message.get("function_call")
            if isinstance(legacy, dict):
                call_id = "call_legacy_%d" % i
                legacy_calls.append((call_id, legacy.get("name")))
                blocks.append(tool_use_of({"id": call_id, "function": legacy}, param + ".function_call", names,
                                          param + ".function_call."))
        elif role == "tool":
            blocks = [tool_result_of(message.get("tool_call_id"), message.get("content"), param)]
            blocks[0]["tool_use_id"] = cli_tool_id(blocks[0]["tool_use_id"])
            role = "user"
        elif role == "function":
            name = message.get("name")
            match = next((c for c in legacy_calls if c[1] == name), None)
            if match is None:
                raise invalid(param + ".name", "no earlier function_call named %r to answer" % (name,))
            legacy_calls.remove(match)
            blocks = [tool_result_of(match[0], message.get("content"), param)]
            role = "user"
        else:
            raise invalid(param + ".role", "unsupported role %r" % (role,), "invalid_value")
        role_blocks.append((role, blocks))
    return "\n\n".join(system_parts), alternating_turns(role_blocks)


def alternating_turns(messages: List[Tuple[str, List[Dict[str, Any]]]]) -> List[Dict[str, Any]]:
    """(role, content blocks) in order -> turns: empty ones dropped, same roles merged, and tool
    results first in their user turn, as the Messages API requires."""
    turns = []
    for role, blocks in messages:
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": list(blocks)})
    for turn in turns:
        turn["content"].sort(key=lambda b: b["type"] != "tool_result")
    return turns


def has_tool_blocks(turns: List[Dict[str, Any]]) -> bool:
    return any(b["type"] in ("tool_use", "tool_result") for t in turns for b in t["content"])


def has_image(blocks: List[Dict[str, Any]]) -> bool:
    """A CLI that keeps its transcript saves such a turn's images and names the file to the model."""
    return any(b["type"] == "image" for b in blocks)


def tool_choice_applied(choice: str, chosen: Optional[str], tools: Tuple[ClientTool, ...],
                        turns: List[Dict[str, Any]], system_prompt: str) -> Tuple[str, Tuple[ClientTool, ...]]:
    """(system prompt, tools offered) for a tool choice: the CLI has no tool_choice of its own."""
    if choice == "none" and not has_tool_blocks(turns):
        tools = ()
    elif choice == "none":  # the tools must stay defined for the earlier calls to be valid
        system_prompt += "\n\nDo not call any tool in this turn; answer in text."
    elif choice == "required":
        system_prompt += "\n\nIn this turn you must call at least one of the available tools."
    elif choice == "named":
        system_prompt += "\n\nIn this turn you must call the tool `%s%s`." % (
            MCP_PREFIX, next(t.mcp_name for t in tools if t.name == chosen))
    return system_prompt, tools


def cli_call_for(body: Any, config: Config) -> CliCall:
    """Validate an OpenAI chat-completions body and decide the CLI turn that answers it."""
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object", "invalid_type")
    if "messages" not in body:
        raise invalid("messages", "`messages` is required", "missing_required_parameter")
    requested, model = resolve_model(body.get("model"), config.default_model)
    check_parameters(body)
    tools = tools_of(body)
    choice, chosen = tool_choice_of(body, tools)
    system_prompt, turns = turns_from_messages(body["messages"], config.max_messages, tools,
                                               config.allow_image_fetch)
    if not turns or turns[-1]["role"] != "user":
        raise invalid("messages", "the last message must be a non-empty user or tool message")
    system_prompt, tools = tool_choice_applied(choice, chosen, tools, turns, system_prompt or NEUTRAL_SYSTEM_PROMPT)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", "`parallel_tool_calls` must be a boolean", "invalid_type")
    include_reasoning = body.get("include_reasoning")
    if include_reasoning is not None and not isinstance(include_reasoning, bool):
        raise invalid("include_reasoning", "`include_reasoning` must be a boolean", "invalid_type")
    stream_options = body.get("stream_options") or {}
    # The legacy answer has room for one call (`message.function_call`): the turn ends at it.
    legacy = body.get("tools") is None and body.get("functions") is not None
    return CliCall(
        model=model, requested_model=requested, system_prompt=system_prompt,
        history=turns[:-1], prompt=turns[-1]["content"],
        stream=bool(body.get("stream")), include_usage=bool(stream_options.get("include_usage")),
        max_output_tokens=max_output_tokens_of(body), stop=stop_strings_of(body),
        tools=tools, parallel_tool_calls=parallel is not False and not legacy,
        json_schema=response_format_of(body), effort=effort_of(body),
        include_reasoning=config.include_reasoning if include_reasoning is None else include_reasoning,
        legacy_functions=legacy)


def prompt_text_of(prompt: Any) -> str:
    """`prompt` of /v1/completions -> its text: a string or a list of one string."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise invalid("prompt", "one prompt per request: the Claude CLI gives one answer (send each "
                      "prompt on its own)", "unsupported_value")
    if isinstance(prompt, list):
        raise invalid("prompt", "`prompt` must be text: token-id prompts are not supported (Claude "
                      "has another tokenizer)", "unsupported_value")
    if not isinstance(prompt, str):
        raise invalid("prompt", "`prompt` must be a string or a list of strings", "invalid_type")
    check_encodable(prompt, "prompt")
    return prompt


def completion_call_for(body: Any, config: Config) -> CliCall:
    """Validate a /v1/completions body and decide the CLI turn that continues its prompt."""
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object", "invalid_type")
    if "prompt" not in body:
        raise invalid("prompt", "`prompt` is required", "missing_required_parameter")
    requested, model = resolve_model(body.get("model"), config.default_model)
    check_parameters(dict(body, logprobs=None))  # here `logprobs` is a count, refused below
    best_of = body.get("best_of")
    for name, refused in (("echo", body.get("echo") not in (None, False)),
                          ("best_of", best_of is not None and (isinstance(best_of, bool) or best_of != 1)),
                          ("logprobs", body.get("logprobs") is not None)):
        if refused:
            raise invalid(name, "`%s` is not supported: %s" % (name, COMPLETION_PARAMETERS[name][1]),
                          "unsupported_value")
    prompt = prompt_text_of(body["prompt"])
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise invalid("suffix", "`suffix` must be a string", "invalid_type")
    if suffix:
        check_encodable(suffix, "suffix")
        system_prompt, text = FILL_IN_THE_MIDDLE_SYSTEM_PROMPT, "<prefix>%s</prefix><suffix>%s</suffix>" % (
            prompt, suffix)
    else:
        system_prompt, text = COMPLETION_SYSTEM_PROMPT, prompt
    if not text:
        raise invalid("prompt", "`prompt` must not be empty")
    stream_options = body.get("stream_options") or {}
    return CliCall(model=model, requested_model=requested, system_prompt=system_prompt, history=[],
                   prompt=[{"type": "text", "text": text}], stream=bool(body.get("stream")),
                   include_usage=bool(stream_options.get("include_usage")),
                   max_output_tokens=max_output_tokens_of(body), stop=stop_strings_of(body))


def remote_images_in(call: CliCall) -> List[str]:
    """The URLs of the images a call still has to fetch, in order."""
    return [b["source"]["url"] for turn in call.history + [{"content": call.prompt}]
            for b in turn["content"] if b["type"] == "image" and b["source"]["type"] == "url"]


def call_with_images(call: CliCall, fetched: Dict[str, Dict[str, Any]]) -> CliCall:
    """The call with each remote image block replaced by its fetched base64 source."""
    def blocks(content):
        return [dict(b, source=fetched[b["source"]["url"]]) if b["type"] == "image"
                and b["source"]["type"] == "url" else b for b in content]
    return dataclasses.replace(call, prompt=blocks(call.prompt), history=[
        dict(turn, content=blocks(turn["content"])) for turn in call.history])


def cli_args_for(call: CliCall, claude_path: str, session_id: Optional[str],
                 system_prompt_file: str, transcript_id: Optional[str] = None) -> List[str]:
    """The argv of the CLI for a call. No client text goes here (one argument is capped at 128 KiB)."""
    args = [claude_path, "-p", "--input-format", "stream-json", "--output-format", "stream-json",
            "--verbose", "--include-partial-messages",
            # Claude Code's own tools and the user's settings/CLAUDE.md stay out of every request.
            "--tools", "", "--strict-mcp-config", "--setting-sources", "",
            # Client text is never a CLI command nor a file mention (see stdin_line_for); these
            # keep it so should a CLI update stop honouring the stdin line's mark.
            "--disable-slash-commands", "--restricted",
            "--model", call.model,
            # A recorded prompt would outlive a changed system message on resume.
            "--system-prompt-snapshot", "off"]
    # A process the proxy learns the CLI's context rows from (NativeContext) keeps its transcript.
    args += ["--session-id", transcript_id] if transcript_id else ["--no-session-persistence"]
    if call.tools:
        # The proxy answers this MCP server itself, and the CLI asks it before any tool runs:
        # that question is where a tool call is caught and handed to the client.
        args += ["--mcp-config", json.dumps({"mcpServers": {MCP_SERVER: {"type": "sdk", "name": MCP_SERVER}}}),
                 "--permission-prompt-tool", "stdio"]
    if call.json_schema is not None:
        args += ["--json-schema", json.dumps(call.json_schema)]
    if call.effort:
        args += ["--effort", call.effort]
    if session_id:
        args += ["--resume", session_id]
    # Agents send system prompts of 50 KB and more: a file has no size limit and no NUL trouble.
    args += ["--system-prompt-file", system_prompt_file]
    return args


def cli_base_env(config: Config, environ: Dict[str, str]) -> Dict[str, str]:
    """The allow-listed part of our environment (CLI_ENV_NAMES) and the settings every CLI gets."""
    allowed = CLI_ENV_NAMES + (API_KEY_NAMES if config.use_api_key else ())
    env = {name: value for name, value in environ.items()
           if (name in allowed or name.startswith(CLI_ENV_PREFIXES)) and not name.startswith(ENV_PREFIX)}
    env.setdefault("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
    # Else a claude.ai login asks for the account's MCP servers at every start, --strict-mcp-config or not.
    env["ENABLE_CLAUDEAI_MCP_SERVERS"] = "false"
    return env


def cli_env_for(call: CliCall, config: Config, environ: Dict[str, str]) -> Dict[str, str]:
    """The environment of the CLI that answers `call`: never our whole environment."""
    env = cli_base_env(config, environ)
    env["CLAUDE_CODE_MAX_RETRIES"] = str(config.cli_max_retries)
    env.pop("CLAUDE_CODE_MAX_OUTPUT_TOKENS", None)
    if call.max_output_tokens:
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(call.max_output_tokens)
    if call.tools:  # the CLI would cut longer descriptions to 4,096 characters
        env["CLAUDE_CODE_MAX_MCP_DESCRIPTION_LENGTH"] = str(MAX_TOOL_DESCRIPTION_CHARS)
    return env


def stdin_line_for(blocks: List[Dict[str, Any]], line_id: str = "", query: bool = True) -> bytes:
    """The stream-json line that starts the new user turn, delivered to the model verbatim.

    `text_not_typed` (read by CLI 2.1.x, not documented) marks the text as not typed at the CLI's
    prompt, so `@path` is not read from disk, `/command` is not run and `!`/`#` mean nothing;
    tests/test_e2e_cli.py pins it. `--disable-slash-commands` and `--restricted` are the second
    line of defence (cli_args_for), and a local command's output is refused (TurnTranslator).
    `line_id` becomes the message's uuid, which the CLI can be rewound to (CliRun.reseat); without
    `query` (`shouldQuery: false`, in the CLI's SDK schema) the turn is appended, not answered."""
    message = {"type": "user", "text_not_typed": True, "message": {"role": "user", "content": blocks}}
    if line_id:
        message["uuid"] = line_id
    if not query:
        message["shouldQuery"] = False
    return (json.dumps(message) + "\n").encode("ascii")


def cli_version_of(text: str) -> Tuple[int, ...]:
    """(2, 1, 332) from "2.1.332" or "2.1.332 (Claude Code)"; () when it names no version."""
    found = re.match(r"\s*(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(part) for part in found.groups()) if found else ()


def tool_results_in(blocks: List[Dict[str, Any]]) -> Dict[str, str]:
    """tool_use_id -> result text, when a user turn is made of tool results only (else empty)."""
    if not blocks or any(b["type"] != "tool_result" for b in blocks):
        return {}
    return {b["tool_use_id"]: b["content"] if isinstance(b["content"], str)
            else "".join(part.get("text", "") for part in b["content"]) for b in blocks}


def cold_turns_for(call: CliCall) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(turns for the session file, blocks for stdin) when no live process holds the conversation.

    The CLI drops tool results sent on stdin for a resumed session, so a turn of tool results is
    written into the session instead and a short user line starts the turn (see README)."""
    if any(b["type"] == "tool_result" for b in call.prompt):
        return call.history + [{"role": "user", "content": call.prompt}], \
            [{"type": "text", "text": TOOL_RESULTS_PROMPT}]
    return call.history, call.prompt


def project_key(cwd: str) -> str:
    """The CLI's folder name under ~/.claude/projects for a working directory."""
    return re.sub(r"[^A-Za-z0-9]", "-", cwd)


def session_lines_for(history: List[Dict[str, Any]], session_id: str, cwd: str,
                      now: Optional[float] = None,
                      context: Tuple[Dict[str, Any], ...] = ()) -> List[str]:
    """A session transcript the CLI can --resume: the earlier turns as real user/assistant rows.

    `context` holds the CLI's own attachments (native_context_in) that follow the first user row,
    as in a transcript the CLI writes; with them a resumed turn sends the same `messages` as a
    process that held the conversation all along, so the prompt cache reads its history."""
    now = now if now is not None else time.time()
    stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    timestamp = stamp.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (stamp.microsecond // 1000)
    # The CLI dates a conversation by the local date (its TZ is ours, see CLI_ENV_NAMES).
    attachments = list(context) + [{"type": "date", "date": time.strftime("%Y-%m-%d", time.localtime(now))}]
    lines, parent = [], None
    for turn in history:
        row_id = str(uuid.uuid4())
        message = {"role": turn["role"], "content": turn["content"]}
        if turn["role"] == "assistant":
            message.update({"id": "msg_" + row_id.replace("-", ""), "type": "message",
                            "model": "claude", "stop_reason": "end_turn", "stop_sequence": None,
                            "usage": {"input_tokens": 0, "output_tokens": 0}})
        rows = [{"type": turn["role"], "message": message}]
        if context and parent is None:
            rows += [{"type": "attachment", "attachment": attachment} for attachment in attachments]
        for row in rows:
            row_id = row_id if row["type"] != "attachment" else str(uuid.uuid4())
            lines.append(json.dumps(dict(
                {"parentUuid": parent, "isSidechain": False}, **row, uuid=row_id, timestamp=timestamp,
                sessionId=session_id, cwd=cwd, userType="external"), ensure_ascii=False))
            parent = row_id
    return lines


# The CLI's attachments that describe where and on what it runs, in the order it writes them.
CONTEXT_ATTACHMENTS = ("environment", "model")


def native_context_in(lines: List[str]) -> Dict[str, Dict[str, Any]]:
    """The CLI's own context attachments in a transcript it wrote: {attachment type: attachment}."""
    found = {}
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a row the CLI was still writing
        attachment = row.get("attachment") if isinstance(row, dict) else None
        if row.get("type") == "attachment" and isinstance(attachment, dict) \
                and attachment.get("type") in CONTEXT_ATTACHMENTS:
            found.setdefault(attachment["type"], attachment)
    return found


# ================================================================================================
# CLI runner (I/O): start, feed, read JSON lines, cancel, reap
# ================================================================================================

class ClientGone(Exception):
    """The HTTP client went away; the CLI is ended and nothing more is written."""


RUN_DIR_PREFIX = "claude-max-proxy-"  # + our pid: a run's private dir, found again after a crash
SESSION_POINTER = "session-file"      # in a run's private dir: the path of its session transcript
CLIENT_CHECK_INTERVAL = 0.25  # seconds between checks that the client is still there
DELTA_LINE = b'{"type":"stream_event","event":{"type":"content_block_delta"'  # how the CLI prints a delta
MCP_LIST_SECONDS = 5.0        # a warm process's wait for the CLI to list the client tools
# Appending a turn without asking the model (`shouldQuery: false`: CliRun._rehearse, reseat) was
# measured on this CLI version; an older CLI is not asked to, since one that ignored it would
# ask the model.
SHOULD_QUERY_SINCE = (2, 1, 332)
LIVE_RUNS = set()          # every CliRun not yet reaped, so shutdown can end them all
LIVE_RUNS_LOCK = threading.Lock()


class NativeContext:
    """The CLI's own environment and model attachments, learned from transcripts of processes the
    proxy runs, so the transcripts it writes for --resume carry the exact values (session_lines_for).

    The model row differs per --model value; the environment row (working directory, platform,
    shell, OS version) is the same for every process of this proxy."""

    def __init__(self):
        self.lock = threading.Lock()
        self.environment = None  # type: Optional[Dict[str, Any]]
        self.models = {}         # --model value -> its model attachment

    def known(self, model: str) -> bool:
        with self.lock:
            return self.environment is not None and model in self.models

    def rows_for(self, model: str) -> Tuple[Dict[str, Any], ...]:
        """What a transcript for `model` can carry now (nothing until the environment is known)."""
        with self.lock:
            if self.environment is None:
                return ()
            return (self.environment,) + ((self.models[model],) if model in self.models else ())

    def learn(self, model: str, found: Dict[str, Dict[str, Any]]) -> None:
        with self.lock:
            self.environment = found.get("environment", self.environment)
            if "model" in found:
                self.models[model] = found["model"]


NATIVE_CONTEXT = NativeContext()


def make_private_dir(path: str) -> None:
    """Create `path` (and its parent) as ours alone; refuse one that another user could have made
    or can write to, as in a shared /tmp."""
    for folder in (os.path.dirname(path), path):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(folder, 0o700, exist_ok=True)
    info, parent = os.lstat(path), os.stat(os.path.dirname(path))
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise OSError(errno.EPERM, "not a private directory of this user", path)
    # Whoever owns the parent can swap the directory: us or root, or a sticky one such as /tmp.
    if parent.st_uid not in (0, os.getuid()) or (parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX):
        raise OSError(errno.EPERM, "its parent directory is writable by other users", path)


def claude_projects_dir(environ: Dict[str, str]) -> str:
    base = environ.get("CLAUDE_CONFIG_DIR") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".claude")
    return os.path.join(base, "projects")


def mcp_reply_for(message: Dict[str, Any], tools: Tuple[ClientTool, ...]) -> Dict[str, Any]:
    """The proxy's MCP server: the answer to one JSON-RPC message from the CLI (tools/call aside)."""
    method, message_id = message.get("method"), message.get("id")
    if message_id is None:
        return {"jsonrpc": "2.0", "result": {}}  # a notification: acknowledged, nothing to say
    if method == "initialize":
        version = (message.get("params") or {}).get("protocolVersion") or "2025-06-18"
        result = {"protocolVersion": version, "capabilities": {"tools": {}},
                  "serverInfo": {"name": "claude-max-proxy", "version": __version__}}
    elif method == "tools/list":
        result = {"tools": [t.listing() for t in tools]}
    elif method == "ping":
        result = {}
    else:
        return {"jsonrpc": "2.0", "id": message_id,
                "error": {"code": -32601, "message": "method not found: %s" % method}}
    return {"jsonrpc": "2.0", "id": message_id, "result": result}


class CliOutput:
    """A CLI's stdout as JSON events: read as it comes, split into lines once per read, parsed
    one at a time; `seen` is shown each event before it is yielded."""

    def __init__(self, fd: int, seen: Callable[[Dict[str, Any]], None], request_timeout: float):
        self.fd, self.seen, self.request_timeout = fd, seen, request_timeout
        self.garbage_lines = 0
        self.lines = collections.deque()  # type: Deque[bytes]  # whole lines read, not parsed yet
        self.buffer = b""  # the unfinished line after them

    def events(self, deadline: float, idle_timeout: float,
               client_gone: Callable[[], bool] = lambda: False) -> Iterator[Dict[str, Any]]:
        """Yield the CLI's JSON events until it closes stdout; enforce the timeouts."""
        last_output = last_check = time.monotonic()
        while True:
            if time.monotonic() - last_check >= CLIENT_CHECK_INTERVAL:
                # Also while the CLI is busy writing: a client waiting for a whole answer that
                # hangs up must not keep its CLI going until the answer is done.
                last_check = time.monotonic()
                if client_gone():
                    raise ClientGone()
            if self.lines:
                event = self.parse(self.lines.popleft())
                if event is not None:
                    self.seen(event)
                    yield event
                continue
            now = time.monotonic()
            if now >= deadline:
                raise ApiError(504, "the request took longer than %.0f s" % self.request_timeout,
                               "server_error", "timeout")
            if now - last_output >= idle_timeout:
                raise ApiError(504, "the Claude CLI sent nothing for %.0f s" % idle_timeout,
                               "server_error", "timeout")
            wait = min(0.2, deadline - now, idle_timeout - (now - last_output))
            ready, _, _ = select.select([self.fd], [], [], max(wait, 0))
            if not ready:
                if client_gone():
                    raise ClientGone()
                continue
            data = os.read(self.fd, 1 << 16)
            if not data:
                event = self.parse(self.buffer)
                self.buffer = b""
                if event is not None:
                    self.seen(event)
                    yield event
                return
            # One split per read, rather than a copy of the rest of the buffer per line.
            lines = data.split(b"\n")
            lines[0] = self.buffer + lines[0]
            self.buffer = lines.pop()
            self.lines.extend(lines)
            last_output = time.monotonic()

    def next_is_delta(self) -> bool:
        """True when the next line is already read and is a streamed delta, so the reader goes on
        without waiting (a relay may then hold its last frame back and write both together)."""
        try:
            return self.lines[0].startswith(DELTA_LINE)
        except IndexError:  # nothing read ahead (or a parked process's next reader took it)
            return False

    def parse(self, line: bytes) -> Optional[Dict[str, Any]]:
        """One line's event; None for a blank line, or one that is not a JSON object (counted)."""
        if not line.strip():
            return None
        try:
            # Decoded first: json.loads skips its encoding detection. What fails goes the way
            # it always went (bytes to json.loads), so no line parses differently.
            event = json.loads(line.decode("utf-8"))
        except ValueError:
            try:
                event = json.loads(line)
            except ValueError:
                event = None
        if not isinstance(event, dict):
            self.garbage_lines += 1
            return None
        return event


class CliRun:
    """One claude process started for a call: it answers that turn and, when the pool keeps it,
    the conversation's next ones (`next_turn`). Always ended and reaped by close()."""

    def __init__(self, call: CliCall, config: Config, claude_path: str,
                 environ: Optional[Dict[str, str]] = None,
                 observe: Callable[[Dict[str, Any]], None] = lambda event: None):
        self.call, self.config, self.claude_path = call, config, claude_path
        # Sees every `rate_limit_event` and `result`, whichever reader meets it (limits, metrics).
        self.observe = observe
        self.result_seen = False
        self.environ = dict(os.environ if environ is None else environ)
        self.proc = None          # type: Optional[subprocess.Popen]
        self.session_file = None  # type: Optional[str]
        self.private_dir = None   # type: Optional[str]
        self.stderr_reader = None  # type: Optional[threading.Thread]
        self.stderr_tail = collections.deque(maxlen=40)
        self.output = None  # type: Optional[CliOutput]
        self.stdin_lock = threading.Lock()
        self.permissions = {}   # tool_use_id -> (control request id, tool input): asked, unanswered
        self.mcp_calls = {}     # tool_use_id -> (control request id, JSON-RPC id): asked, unanswered
        self.tool_results = {}  # tool_use_id -> result text the client sent, to hand to the CLI
        self.keeps_transcript = False  # writes its own transcript (to teach NATIVE_CONTEXT)
        self.tools_listed = False      # the CLI has asked the client-tools MCP server for its tools
        self.prompt_id = ""  # the uuid of the user line that started the current turn
        self.first_prompt_id = ""  # that of the conversation's first turn, when it began on stdin here
        self.resumed = False       # started at a history (a session file), not at a first turn
        self.replies = []    # type: List[Dict[str, Any]]  # the CLI's assistant messages since then

    # -- starting -------------------------------------------------------------------------------

    def start(self, send_prompt: bool = True) -> "CliRun":
        """Spawn the CLI and hand it the new user turn; on any failure nothing is left behind.

        Without `send_prompt` the process starts warm: loaded and waiting on stdin."""
        try:
            session_turns, stdin_blocks = cold_turns_for(self.call)
            self._spawn(session_turns, learn=send_prompt)
            if send_prompt:
                self.proc.stdin.write(self._prompt_line(stdin_blocks))
            if self.call.tools or self.config.max_parked > 0:
                self.proc.stdin.flush()  # stays open: for tool questions and the next turn
            else:
                self.proc.stdin.close()
        except BrokenPipeError:
            pass  # the CLI died before reading; its exit status tells the story
        except BaseException:
            self.close()
            raise
        return self

    def _spawn(self, session_turns: List[Dict[str, Any]], learn: bool = True) -> None:
        try:
            prompt_file, session_id = self._write_private_files(session_turns)
        except OSError as exc:  # a full disk or temp dir, a read-only HOME: say which, not "OSError"
            raise ApiError(503, "cannot write the files the Claude CLI needs for this request (%s): %s"
                           % (exc.filename or tempfile.gettempdir(), exc.strerror or exc),
                           "server_error", "storage_unavailable")
        self.resumed, transcript_id = session_id is not None, None
        # Only for a prompt known now and without images: a CLI that keeps its transcript also
        # saves images and names the file to the model (so never a warm process, whose prompt
        # comes later).
        if learn and session_id is None and not NATIVE_CONTEXT.known(self.call.model) \
                and not has_image(self.call.prompt):
            transcript_id, self.keeps_transcript = self._own_transcript(), True
        argv = cli_args_for(self.call, self.claude_path, session_id, prompt_file, transcript_id)
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=self.config.workdir, env=cli_env_for(self.call, self.config, self.environ),
                start_new_session=True, close_fds=True)
        except OSError as exc:
            raise ApiError(503, "cannot start the Claude CLI (%s): %s" % (self.claude_path, exc),
                           "server_error", "cli_unavailable")
        self.output = CliOutput(self.proc.stdout.fileno(), self._seen, self.config.request_timeout)
        with LIVE_RUNS_LOCK:
            LIVE_RUNS.add(self)
        self.stderr_reader = threading.Thread(target=self._drain_stderr, daemon=True)
        self.stderr_reader.start()

    def _write_private_files(self, session_turns: List[Dict[str, Any]]) -> Tuple[str, Optional[str]]:
        """The system prompt file and the session transcript (if any): (prompt path, session id)."""
        cwd = self.config.workdir
        make_private_dir(cwd)
        # Private files for this run (the system prompt) live in a 0700 temp directory.
        self.private_dir = tempfile.mkdtemp(prefix="%s%d-" % (RUN_DIR_PREFIX, os.getpid()))
        prompt_file = os.path.join(self.private_dir, "system-prompt.txt")
        with open(prompt_file, "w", encoding="utf-8") as handle:
            handle.write(self.call.system_prompt)
        session_id = None
        if session_turns:
            session_id = str(uuid.uuid4())
            real_cwd = os.path.realpath(cwd)
            folder = os.path.join(claude_projects_dir(self.environ), project_key(real_cwd))
            os.makedirs(folder, mode=0o700, exist_ok=True)
            self.session_file = os.path.join(folder, session_id + ".jsonl")
            with open(os.path.join(self.private_dir, SESSION_POINTER), "w", encoding="utf-8") as handle:
                handle.write(self.session_file)  # for remove_leftovers, should we die before close()
            lines = session_lines_for(session_turns, session_id, real_cwd,
                                      context=NATIVE_CONTEXT.rows_for(self.call.model))
            fd = os.open(self.session_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write("\n".join(lines) + "\n")
        return prompt_file, session_id

    def _own_transcript(self) -> str:
        """A session id for a fresh process whose transcript teaches NATIVE_CONTEXT; the file is
        this run's session file, removed at close (or by remove_leftovers after a crash)."""
        session_id = str(uuid.uuid4())
        folder = os.path.join(claude_projects_dir(self.environ), project_key(os.path.realpath(self.config.workdir)))
        self.session_file = os.path.join(folder, session_id + ".jsonl")
        with open(os.path.join(self.private_dir, SESSION_POINTER), "w", encoding="utf-8") as handle:
            handle.write(self.session_file)
        return session_id

    def _learn_context(self) -> None:
        """Read the CLI's context rows from this process's transcript once it has written them."""
        try:
            with open(self.session_file, encoding="utf-8") as handle:
                found = native_context_in(handle.read().splitlines())
        except (OSError, TypeError):
            return
        NATIVE_CONTEXT.learn(self.call.model, found)

    # -- the CLI's questions (control requests) ------------------------------------------------

    def next_turn(self, call: CliCall, results: Dict[str, str]) -> None:
        """Continue a kept process with its conversation's next turn: the client's results for the
        tool calls it stopped at, or the next user message."""
        if not results:
            self.result_seen = False
            with self.stdin_lock:
                self.proc.stdin.write(self._prompt_line(call.prompt))
                self.proc.stdin.flush()
        self.call = call
        if results:
            self.tool_results.update(results)
            self.hand_over_results()

    def _prompt_line(self, blocks: List[Dict[str, Any]]) -> bytes:
        """The stdin line of a new user turn, which starts the turn's record (prompt_id, replies)."""
        self.prompt_id, self.replies = str(uuid.uuid4()), []
        if not (self.first_prompt_id or self.resumed or self.keeps_transcript):
            self.first_prompt_id = self.prompt_id
        return stdin_line_for(blocks, self.prompt_id)

    def reseat(self, blocks: List[Dict[str, Any]], replies: List[Dict[str, Any]], timeout: float) -> bool:
        """Make the turn just answered the one its client will send back: rewind the conversation
        to before that turn's user line, append `blocks` in its place without a model call, then
        the CLI's own answer (`replies`) as it was. Measured on CLI 2.1.332: the next turn's
        request upstream is then the one a process that saw only that history sends, byte for
        byte (tests/test_e2e_cli.py). False if the CLI refused or failed a step."""
        if not (self.rewind(self.prompt_id, timeout) and self._append(blocks, timeout)):
            return False
        for message in replies:  # appended as they are read, before any later user line
            self.send({"type": "assistant", "message": message})
        self.replies = list(replies)
        return True

    def _append(self, blocks: List[Dict[str, Any]], timeout: float) -> Optional[str]:
        """Append a user turn without asking the model (`shouldQuery: false`): its line's uuid,
        or None if the CLI did not take it so. Sent only after a rewind or an initialize that
        shows a CLI known to honour it: one that ignored it would ask the model."""
        line_id = str(uuid.uuid4())
        with self.stdin_lock:
            try:
                self.proc.stdin.write(stdin_line_for(blocks, line_id, query=False))
                self.proc.stdin.flush()
            except (OSError, ValueError):
                return None
        # The CLI acknowledges it with a result of no model call.
        if self._read_until(timeout, lambda event: not event.get("is_error") and event.get("num_turns") == 0
                            if event.get("type") == "result" else None):
            return line_id
        return None

    def rewind(self, line_id: str, timeout: float) -> bool:
        """Cut the conversation back to just before the user line `line_id`, once the turn in
        progress has ended (the CLI's `rewind_conversation`). Measured on CLI 2.1.332: rewound to
        its first line, a process's next first turn is a fresh process's, byte for byte
        upstream, only that it keeps its session id (as a person's rewind in the CLI does)."""
        if not (self.result_seen or self.wait_for_result(timeout)):
            return False
        self.result_seen = False
        response = self._control({"subtype": "rewind_conversation", "target_message_uuid": line_id}, timeout)
        if response is None or response.get("rewound") is not True:
            return False
        if line_id == self.first_prompt_id:
            self.first_prompt_id = ""  # the next conversation's first line is the next prompt
        return True

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def initialize(self, timeout: float) -> bool:
        """Have a warm process finish loading now (the SDK's handshake), not at its first turn,
        and, on a CLI known to append without asking, rehearse a first turn (`_rehearse`)."""
        response = self._control({"subtype": "initialize"}, timeout)
        if response is None:
            return False
        if self.call.tools:
            # The CLI lists the client tools (MCP) right after: answered now, not in the first
            # turn. Should a CLI list them later instead, the turn answers them then.
            self._read_until(MCP_LIST_SECONDS, lambda event: True if self.tools_listed else None)
        if cli_version_of(str(response.get("claude_code_version", ""))) >= SHOULD_QUERY_SINCE:
            return self._rehearse(timeout)
        return True

    def _rehearse(self, timeout: float) -> bool:
        """Prepare a first turn once without a model call: a user line appended and rewound
        away. Measured on CLI 2.1.332: the first turn's first token then comes in 0.10 s rather
        than 0.15 s, and its request upstream is unchanged, byte for byte (the e2e tests compare
        a warm process's with a cold start's)."""
        line_id = self._append([{"type": "text", "text": "."}], timeout)
        return line_id is not None and self.rewind(line_id, timeout)

    def _control(self, request: Dict[str, Any], timeout: float) -> Optional[Dict[str, Any]]:
        """Send the CLI a control request: its successful response, or None."""
        request_id = "proxy-" + uuid.uuid4().hex
        self.send({"type": "control_request", "request_id": request_id, "request": request})
        found = []  # type: List[Dict[str, Any]]

        def answered(event):
            response = event.get("response") or {}
            if event.get("type") == "control_response" and response.get("request_id") == request_id:
                found.append(response.get("response") or {})
                return response.get("subtype") == "success"
            return None
        return found[0] if self._read_until(timeout, answered) else None

    def wait_for_result(self, timeout: float) -> bool:
        """After a turn's last message, read on to the CLI's `result`: True if it ended cleanly."""
        return self._read_until(timeout, lambda event: not event.get("is_error")
                                if event.get("type") == "result" else None)

    def _read_until(self, timeout: float, outcome: Callable[[Dict[str, Any]], Optional[bool]]) -> bool:
        """Read events (answering the CLI's questions) until `outcome` gives a verdict; False when
        the process ends, misbehaves or stays silent for `timeout` seconds first."""
        try:
            for event in self.events(time.monotonic() + timeout, timeout):
                if event.get("type") == "control_request":
                    self.on_control_request(event)
                verdict = outcome(event)
                if verdict is not None:
                    return verdict
        except ApiError:
            pass
        return False

    def send(self, message: Dict[str, Any]) -> None:
        with self.stdin_lock:
            try:
                self.proc.stdin.write((json.dumps(message) + "\n").encode("ascii"))
                self.proc.stdin.flush()
            except (OSError, ValueError):
                pass  # the CLI is gone; reading its output will tell

    def on_control_request(self, event: Dict[str, Any]) -> None:
        """Serve the client-tools MCP server and hold tool permissions until results exist."""
        request_id = event.get("request_id")
        request = event.get("request") or {}
        subtype = request.get("subtype")
        if subtype == "mcp_message":
            message = request.get("message") or {}
            self.tools_listed = self.tools_listed or message.get("method") == "tools/list"
            if message.get("method") == "tools/call":
                meta = (message.get("params") or {}).get("_meta") or {}
                self.mcp_calls[meta.get("claudecode/toolUseId")] = (request_id, message.get("id"))
            else:
                self._reply(request_id, {"mcp_response": mcp_reply_for(message, self.call.tools)})
        elif subtype == "can_use_tool":
            self.permissions[request.get("tool_use_id")] = (request_id, request.get("input") or {})
        else:
            self.send({"type": "control_response", "response": {
                "subtype": "error", "request_id": request_id, "error": "not supported by the proxy"}})
        self.hand_over_results()

    def hand_over_results(self) -> None:
        """Let the CLI run each held tool call whose client result is known, with that result."""
        for tool_use_id in [t for t in self.permissions if t in self.tool_results]:
            request_id, tool_input = self.permissions.pop(tool_use_id)
            self._reply(request_id, {"behavior": "allow", "updatedInput": tool_input})
        failed = {b["tool_use_id"] for b in self.call.prompt if b.get("is_error")}
        for tool_use_id in [t for t in self.mcp_calls if t in self.tool_results]:
            request_id, rpc_id = self.mcp_calls.pop(tool_use_id)
            result = {"content": [{"type": "text", "text": self.tool_results[tool_use_id]}]}
            if tool_use_id in failed:
                result["isError"] = True  # the client's tool failed: the model is told so
            self._reply(request_id, {"mcp_response": {"jsonrpc": "2.0", "id": rpc_id, "result": result}})

    def _reply(self, request_id: Any, response: Dict[str, Any]) -> None:
        self.send({"type": "control_response", "response": {
            "subtype": "success", "request_id": request_id, "response": response}})

    def _drain_stderr(self):
        # Read stderr always, or a chatty CLI would block on a full pipe.
        for line in iter(self.proc.stderr.readline, b""):
            self.stderr_tail.append(line.decode("utf-8", "replace").rstrip())

    # -- reading --------------------------------------------------------------------------------

    def events(self, deadline: float, idle_timeout: float,
               client_gone: Callable[[], bool] = lambda: False) -> Iterator[Dict[str, Any]]:
        """The CLI's JSON events until it closes stdout (CliOutput); the timeouts enforced."""
        return self.output.events(deadline, idle_timeout, client_gone)

    def next_is_delta(self) -> bool:
        return self.output is not None and self.output.next_is_delta()

    def _seen(self, event: Dict[str, Any]) -> None:
        """Each event as it is read: the turn's answer (replies), limits and metrics (observe),
        and the session file, which the CLI has loaded once it streams."""
        kind = event.get("type")
        if kind == "assistant" and isinstance(event.get("message"), dict) and not event.get("parent_tool_use_id"):
            self.replies.append(event["message"])
        elif kind in ("rate_limit_event", "result"):
            self.result_seen = self.result_seen or kind == "result"
            self.observe(event)
        if self.keeps_transcript:
            if kind == "result" and not NATIVE_CONTEXT.known(self.call.model):
                self._learn_context()
        elif self.session_file and kind in ("stream_event", "result"):
            self._remove_session_file()  # loaded by now; the CLI writes no more to it

    def exit_code(self, timeout: float = 5.0) -> Optional[int]:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def failure(self) -> ApiError:
        """The error for a CLI that ended without a result."""
        code = self.exit_code()
        if self.stderr_reader is not None:
            self.stderr_reader.join(1.0)  # its last words are often the explanation
        detail = " | ".join(line for line in self.stderr_tail if line)[-600:]
        garbage = self.output.garbage_lines if self.output is not None else 0
        if garbage:
            why = "printed %d line(s) that are not stream-json" % garbage
        elif code is None:
            why = "closed its output but did not exit"
        else:
            why = "exited with code %s without an answer" % code
        return ApiError(502, "the Claude CLI %s%s" % (why, (": " + detail) if detail else ""),
                        "server_error", "cli_failed")

    # -- ending ---------------------------------------------------------------------------------

    def close(self) -> None:
        """End the whole process group, reap it and remove the session file. Idempotent."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                try:
                    proc.wait(2)
                except subprocess.TimeoutExpired:
                    pass
            # Children the CLI started (MCP servers, shells) share its group: end them too.
            self._signal_group(signal.SIGKILL)
            proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    pipe.close()
                except (OSError, ValueError):
                    pass
        if self.keeps_transcript and self.session_file and not NATIVE_CONTEXT.known(self.call.model):
            self._learn_context()
        self._remove_session_file()
        if self.private_dir:
            shutil.rmtree(self.private_dir, ignore_errors=True)
            self.private_dir = None
        with LIVE_RUNS_LOCK:
            LIVE_RUNS.discard(self)

    def kill_now(self) -> None:
        """Kill the process group and remove the run's files, waiting for nothing (a second Ctrl-C)."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
        self._remove_session_file()
        if self.private_dir:
            shutil.rmtree(self.private_dir, ignore_errors=True)

    def _signal_group(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _remove_session_file(self) -> None:
        if self.session_file:
            try:
                os.unlink(self.session_file)
            except FileNotFoundError:
                pass
            self.session_file = None


def close_all_runs() -> None:
    with LIVE_RUNS_LOCK:
        runs = list(LIVE_RUNS)
    for run in runs:
        run.close()


def end_all_runs_now() -> None:
    """Kill every CLI's process group and remove its files, without waiting for anything."""
    with LIVE_RUNS_LOCK:
        runs = list(LIVE_RUNS)
    for run in runs:
        run.kill_now()


def remove_leftovers(workdir: str, environ: Dict[str, str], temp_dir: Optional[str] = None) -> int:
    """Remove the private dirs (system prompts) and session transcripts that runs of a proxy that
    died without cleaning up (SIGKILL, a crash) left behind; returns how many dirs went.

    Only our own: directories named RUN_DIR_PREFIX<pid>- of ours whose process is gone, and the
    session files those dirs point to inside this workdir's project folder."""
    temp_dir = temp_dir or tempfile.gettempdir()
    folder = os.path.realpath(os.path.join(claude_projects_dir(environ), project_key(os.path.realpath(workdir))))
    try:
        names = os.listdir(temp_dir)
    except OSError:
        return 0
    removed = 0
    for name in names:
        match = re.match(re.escape(RUN_DIR_PREFIX) + r"(\d+)-", name)
        path = os.path.join(temp_dir, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not match or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() \
                or process_alive(int(match.group(1))):
            continue
        try:
            with open(os.path.join(path, SESSION_POINTER), encoding="utf-8") as handle:
                session = os.path.realpath(handle.read().strip())
            if os.path.dirname(session) == folder and session.endswith(".jsonl"):
                os.unlink(session)
        except OSError:
            pass  # no session file (or it is gone already): the dir still goes
        shutil.rmtree(path, ignore_errors=True)
        removed += not os.path.exists(path)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process holds that pid now: not ours to judge
    return True


class ClaudeInstall:
    """The CLI found at startup: its path and version, probed once, re-looked-up if it vanishes."""

    def __init__(self, name: str):
        self.name = name
        self.path = shutil.which(name)
        self.version = None  # type: Optional[str]
        self.probe_error = None  # type: Optional[str]

    def probe(self, env: Dict[str, str]) -> None:
        """Ask the CLI its version, with the environment a request's CLI gets (`env`), so no API
        key or proxy setting reaches this process either."""
        try:
            if not self.path:
                self.probe_error = "`%s` not found on PATH" % self.name
                return
            out = subprocess.run([self.path, "--version"], stdin=subprocess.DEVNULL, env=env,
                                 capture_output=True, timeout=30, start_new_session=True)
            text = out.stdout.decode("utf-8", "replace").strip()
            if out.returncode == 0 and text:
                self.version = text.splitlines()[0]
            else:
                self.probe_error = "`claude --version` failed (exit %s)" % out.returncode
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.probe_error = "`claude --version` failed: %s" % exc

    def resolve(self) -> str:
        """The executable to run for a request, or a 503 if there is none."""
        path = self.path if self.path and os.access(self.path, os.X_OK) else shutil.which(self.name)
        if not path:
            raise ApiError(503, "the Claude CLI (`%s`) was not found. Install it with `npm install -g "
                           "@anthropic-ai/claude-code` or pass --claude PATH." % self.name,
                           "server_error", "cli_unavailable")
        self.path = path
        return path


# ================================================================================================
# Process pool (I/O): the one owner of CLI processes across requests
# ================================================================================================

REWRITERS_KEPT = 64     # kinds of client remembered as rewriting their history
REWRITE_BLOCKS_MAX = 3  # at most this many trailing prompt blocks looked for as a context message
REWIND_SECONDS = 5.0    # a CLI rewinds its conversation in ~15 ms; one that takes longer is ended
CONTINUATIONS_SEEN = 32  # recent pauses between an answer and its conversation's next turn
LOAD_SECONDS = 60.0     # a kept process that has not answered its initialize by then is ended
DEMAND_WINDOW = 60.0    # seconds of first turns that decide how many warm processes a shape gets
LOADS_AT_ONCE = max(1, os.cpu_count() or 1)  # kept processes loading at once when none is answering
WARM_SHAPES = 16        # first-turn shapes whose demand is remembered (least recently seen forgotten)


class Rewrite(NamedTuple):
    """A history a client that rewrites its history may come back with instead of a kept key."""
    key: str
    dropped: int  # the trailing prompt blocks it leaves out (0: none, it rewrites nothing)
    turns: List[Dict[str, Any]]


class Load:
    """A kept process's start-up in progress: `done` is set once its initialize is answered
    (`ok`) or has failed, so a request that took it while loading knows when it can use it."""

    def __init__(self):
        self.done = threading.Event()
        self.ok = False
        self.cancelled = False  # no longer kept: the loader ends what it started


class Kept(NamedTuple):
    """A CLI process kept between turns: `warm` (started for a first turn, nothing seen yet),
    parked (holding a conversation, filed under the `conversation_key` of what it has seen) or
    predicted (resumed at the history its client is predicted to send next)."""
    key: str
    run: CliRun
    expiry: float
    warm: bool
    at_tool_call: bool  # stopped at a client tool call, waiting for its results
    loading: Optional[Load] = None  # still loading (None once it is ready)
    rewrites: Tuple[Rewrite, ...] = ()  # what a client that rewrites its history sends instead
    predicted: bool = False
    conversation: str = ""   # predicted: its conversation (conversation_of), one such process each


class Demand:
    """First turns by shape (conversation_key with no history), in the last DEMAND_WINDOW seconds:
    how many warm processes each shape is given. The least recently seen shape beyond
    WARM_SHAPES is forgotten."""

    def __init__(self, most: int):
        self.most = most  # `--warm`
        self.lock = threading.Lock()
        self.times = collections.OrderedDict()  # type: Dict[str, List[float]]  # shape -> first turns' times

    def note(self, key: str) -> None:
        now = time.monotonic()
        with self.lock:
            times = [t for t in self.times.pop(key, []) if t > now - DEMAND_WINDOW][-max(self.most, 1):]
            self.times[key] = times + [now]
            while len(self.times) > WARM_SHAPES:
                self.times.popitem(last=False)

    def warm_wanted(self, key: str) -> int:
        """Warm processes for first turns of this shape: its first turns lately, at most `--warm`."""
        now = time.monotonic()
        with self.lock:
            recent = sum(1 for t in self.times.get(key, ()) if t > now - DEMAND_WINDOW)
        return min(self.most, recent)


class ProcessPool:
    """Every CLI process the proxy runs: at most `max_concurrency` answering (busy), at most
    `max_parked` kept (warm, parked and predicted), at most `max_queue` requests waiting for a slot.

    A request whose earlier turns match a kept process's key continues in it: no cold start, no
    replay; a first turn takes a warm process of its shape, ready or still loading. Past the kept
    cap the oldest kept process ends (a warm one before a conversation's). `_end` is the only
    place a process ends and its slot is freed."""

    def __init__(self, config: Config, claude: Any, observe: Callable[[Dict[str, Any]], None],
                 run_class: Callable[..., CliRun] = CliRun):
        self.config, self.claude, self.observe, self.run_class = config, claude, observe, run_class
        self.size, self.queue = config.max_concurrency, config.max_queue
        self.keep = max(config.max_parked, 0)  # kept processes at most
        self.lock = threading.Condition()
        self.busy = 0      # processes answering, starting or ending
        self.waiting = 0   # requests waiting for a slot
        self.kept = collections.OrderedDict()  # type: Dict[int, Kept]  # id(run) -> entry, oldest first
        self.demand = Demand(config.warm)
        # conversation_key(call, []) of a client seen rewriting its history -> the trailing prompt
        # blocks (its fresh context message) it leaves out of the next request; most recent last.
        self.rewriters = collections.OrderedDict()  # type: Dict[str, int]
        self.hits = self.misses = 0
        # How long parked conversations waited for their next turn, lately: one that has waited
        # less than any of them is not rewound for another conversation.
        self.pauses = collections.deque(maxlen=CONTINUATIONS_SEEN)  # type: Deque[float]
        self.closed = False
        self.loads = 0  # kept processes loading now (LOADS_AT_ONCE)

    # -- turns ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def turn(self, call: CliCall, client_gone: Callable[[], bool],
             translator: Optional["TurnTranslator"] = None) -> Iterator["Turn"]:
        """A turn for this call, on a kept process of its conversation or a new one; on leaving,
        the process is ended unless the turn parked it."""
        claude_path = self.claude.resolve()
        if not call.history:
            self.demand.note(conversation_key(call, []))
        run = self._parked_run_for(call)
        reused = run is not None
        if reused and not call.history:
            # A warm one was taken: one successor loads while this turn runs (more would slow it).
            self.prestart(call, most=1)
        if run is None:
            self.notice_rewriting(call)
            self.acquire(self.config.queue_timeout, client_gone)
            try:
                run = self.run_class(call, self.config, claude_path, observe=self.observe).start()
            except BaseException:
                self._end(None)
                raise
        turn = Turn(self, call, run, reused, client_gone, translator or TurnTranslator(call=call))
        try:
            yield turn
        finally:
            if not turn.parked:
                self._end(run)
            if not call.history:
                # A shape seen for the first time gets its warm process after the answer, so its
                # start-up does not compete with this turn's cold one for the CPU.
                self.prestart(call)

    def _parked_run_for(self, call: CliCall) -> Optional[CliRun]:
        """A process already holding this conversation, given the new turn; None for a cold start."""
        results = tool_results_in(call.prompt)
        entry = self._take(conversation_key(call, call.history), first_turn=not call.history)
        run = entry.run if entry is not None else None
        if entry is not None and entry.at_tool_call != bool(results):
            self._end(run)  # a tool call answered with text, or results for no call: start afresh
            run = None
        elif run is not None and run.keeps_transcript and has_image(call.prompt):
            self._end(run)  # a CLI keeping its transcript would tell the model where it saved the image
            run = None
        if run is not None:
            try:
                run.next_turn(call, results)
            except (OSError, ValueError):  # it died just now: a cold start serves the turn
                self._end(run)
                run = None
        with self.lock:
            if run is None:
                self.misses += 1
            else:
                self.hits += 1
        return run

    def park(self, key: str, run: CliRun, at_tool_call: bool = False,
             rewrites: Tuple[Rewrite, ...] = ()) -> bool:
        """Keep a busy process for the turn filed under `key`; the oldest kept one makes room."""
        if self.keep <= 0:
            return False
        with self.lock:
            self.busy -= 1
            self.kept[id(run)] = Kept(key, run, time.monotonic() + self.config.parked_ttl, False, at_tool_call,
                                      rewrites=rewrites)
            self.lock.notify_all()
        while self._end_oldest(lambda entries: len(entries) > self.keep):
            pass
        return True

    def _take(self, key: str, first_turn: bool = False) -> Optional[Kept]:
        """The kept process filed under `key` (a ready one first; for a first turn, else the
        oldest parked conversation of its shape, rewound to nothing; else one still loading,
        waited for), now busy; None if there is none."""
        while True:
            with self.lock:
                matches = [run_id for run_id, entry in self.kept.items() if entry.key == key]
                ready = next((i for i in matches if self.kept[i].loading is None), None)
                recycled = ready is None and first_turn and self._recyclable(key)
                found = ready if ready is not None else recycled or (matches[0] if matches else None)
                if found is None:
                    return None
                entry = self.kept.pop(found)
                self.busy += 1
                self.lock.notify_all()  # a load waiting for its turn goes now
                if not (entry.warm or recycled):
                    self.pauses.append(time.monotonic() - self._parked_at(entry))
            if recycled:
                # Rather than wait for a load: a burst of first turns finds its processes loading.
                if entry.run.rewind(entry.run.first_prompt_id, REWIND_SECONDS):
                    return entry._replace(key=key)
            # The loader's own bound (LOAD_SECONDS) ends this wait: it always sets `done`.
            elif entry.loading is None or (entry.loading.done.wait() and entry.loading.ok):
                if entry.run.running():
                    return entry._replace(loading=None)
            self._end(entry.run)

    def _recyclable(self, shape: str) -> Optional[int]:
        """(Under the lock.) The oldest ready parked conversation of this first-turn shape that
        began in its process, so that it can be rewound to nothing, and has waited longer than
        any conversation lately waited for its next turn; None if there is none."""
        idle_since = time.monotonic() - max(self.pauses, default=0.0)
        return next((i for i, e in self.kept.items() if e.loading is None and e.run.first_prompt_id
                     and not (e.warm or e.predicted or e.at_tool_call) and self._parked_at(e) < idle_since
                     and conversation_key(e.run.call, []) == shape), None)

    def _parked_at(self, entry: Kept) -> float:
        return entry.expiry - self.config.parked_ttl

    def _unkeep(self, run_id: int) -> Optional[CliRun]:
        """(Under the lock.) Drop a kept entry: its process for the caller to end (`_end_unkept`),
        or None for one still loading, which its loader ends once cancelled."""
        entry = self.kept.pop(run_id)
        if entry.loading is None:
            return entry.run
        entry.loading.cancelled = True
        self.lock.notify_all()
        return None

    def _end_unkept(self, runs: List[Optional[CliRun]]) -> None:
        """End what `_unkeep` handed over (outside the lock); they held no slot."""
        for run in runs:
            if run is not None:
                self._end(run, slot=False)

    # -- slots ----------------------------------------------------------------------------------

    def try_acquire(self) -> bool:
        with self.lock:
            if self.busy < self.size:
                self.busy += 1
                return True
            return False

    def acquire(self, timeout: float, client_gone: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout
        if self.try_acquire():
            return
        with self.lock:
            if self.waiting >= self.queue:
                raise ApiError(429, "too many requests in flight (%d running, %d waiting); retry "
                               "shortly" % (self.busy, self.waiting), "rate_limit_error",
                               "rate_limit_exceeded", headers={"Retry-After": "1"})
            self.waiting += 1
        try:
            while not self.try_acquire():
                with self.lock:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ApiError(429, "no free slot within %.0f s" % timeout, "rate_limit_error",
                                       "rate_limit_exceeded", headers={"Retry-After": "2"})
                    self.lock.wait(min(left, 0.5))
                if client_gone():
                    raise ClientGone()
        finally:
            with self.lock:
                self.waiting -= 1

    def evict_oldest(self) -> bool:
        """End the longest-kept process (a warm one before a conversation's); False if none is kept."""
        return self._end_oldest(lambda entries: bool(entries))

    def expire(self) -> None:
        now = time.monotonic()
        while self._end_oldest(lambda entries: any(e.expiry <= now for e in entries.values()), now):
            pass

    def _end_oldest(self, due: Callable[[Dict[int, Kept]], bool], now: Optional[float] = None) -> bool:
        """End the oldest kept process (the oldest expired one, given `now`) if `due`: a ready warm
        one first, then a loading warm one, then a conversation's."""
        with self.lock:
            if not due(self.kept):
                return False
            entries = [(i, e) for i, e in self.kept.items() if now is None or (e.expiry <= now and e.loading is None)]
            ranked = [i for i, e in entries if e.warm and e.loading is None] + \
                [i for i, e in entries if e.warm and e.loading is not None] + [i for i, e in entries if not e.warm]
            if not ranked:
                return False
            runs = [self._unkeep(ranked[0])]
        self._end_unkept(runs)
        return True

    def _end(self, run: Optional[CliRun], slot: bool = True) -> None:
        """End a process (None: one that failed to start); a busy one (`slot`) frees its slot."""
        try:
            if run is not None:
                run.close()
        finally:
            with self.lock:
                if slot:
                    self.busy -= 1
                self.lock.notify_all()  # a request waiting for a slot, a load waiting for a core

    # -- loading kept processes ahead of their requests -----------------------------------------

    def prestart(self, call: CliCall, wanted: Optional[int] = None, most: Optional[int] = None) -> int:
        """Start warm processes (in the background, `most` of them now) until first turns like this
        one have as many as their recent demand asks for (or `wanted`); returns how many started."""
        key = conversation_key(call, [])
        wanted = self.demand.warm_wanted(key) if wanted is None else min(wanted, self.config.warm)
        try:
            claude_path = self.claude.resolve()
        except ApiError:
            return 0
        started = 0
        # At most `wanted` rounds: a load that fails at once is not retried here.
        for _ in range(min(wanted, wanted if most is None else most) if self.keep > 0 else 0):
            with self.lock:
                have = sum(1 for entry in self.kept.values() if entry.key == key and entry.warm)
                if self.closed or have >= wanted:
                    break
                # Room is made by ending another shape's warm spare, never a conversation's process.
                spare = next((i for i, e in self.kept.items() if e.warm and e.loading is None and e.key != key),
                             None) if len(self.kept) >= self.keep else None
                if len(self.kept) >= self.keep and spare is None:
                    break
                ended = [self._unkeep(spare)] if spare is not None else []
                self._loading(call, claude_path, key, warm=True)
            self._end_unkept(ended)
            started += 1
        return started

    def predict(self, call: CliCall, turns: List[Dict[str, Any]]) -> None:
        """Resume a process in the background at `turns`, the history this call's client is
        predicted to send next, filed under that history's key; it replaces the conversation's
        earlier predicted process."""
        try:
            claude_path = self.claude.resolve()
        except ApiError:
            return
        resumed, fields = predicted_entry(call, turns)
        with self.lock:
            if self.closed or self.keep <= 0:
                return
            ended = [self._unkeep(i) for i, e in list(self.kept.items()) if e.conversation == fields["conversation"]]
            self._loading(resumed, claude_path, conversation_key(call, turns), **fields)
        self._end_unkept(ended)
        while self._end_oldest(lambda entries: len(entries) > self.keep):
            pass

    def reseat(self, call: CliCall, run: CliRun, turns: List[Dict[str, Any]]) -> bool:
        """Keep this call's busy process as the one predicted for `turns`, the history its client
        will send next: reseated there in the background (CliRun.reseat, some milliseconds), where
        `predict` would load a new process. Should that fail, `predict` does. False if not kept
        (nor reseated: the CLI is older than SHOULD_QUERY_SINCE)."""
        if cli_version_of(self.claude.version or "") < SHOULD_QUERY_SINCE:
            return False
        resumed, fields = predicted_entry(call, turns)
        replies, load = list(run.replies), Load()
        with self.lock:
            if self.closed or self.keep <= 0:
                return False
            ended = [self._unkeep(i) for i, e in list(self.kept.items()) if e.conversation == fields["conversation"]]
            self.busy -= 1
            run.call = resumed
            self.kept[id(run)] = Kept(conversation_key(call, turns), run, time.monotonic() + self.config.parked_ttl,
                                      False, False, load, **fields)
            self.lock.notify_all()
        self._end_unkept(ended)
        prepare = functools.partial(run.reseat, turns[-2]["content"], replies, REWIND_SECONDS)
        failed = functools.partial(self.predict, call, turns)
        threading.Thread(target=self._load, args=(run, load, prepare, failed), daemon=True).start()
        while self._end_oldest(lambda entries: len(entries) > self.keep):
            pass
        return True

    def _loading(self, call: CliCall, claude_path: str, key: str, warm: bool = False, **fields: Any) -> None:
        """(Under the lock.) File a new process for `call` under `key` as loading (`fields`: the
        rest of its Kept entry), and load it in the background."""
        run, load = self.run_class(call, self.config, claude_path, observe=self.observe), Load()
        self.kept[id(run)] = Kept(key, run, time.monotonic() + self.config.parked_ttl, warm, False, load, **fields)
        threading.Thread(target=self._load, args=(run, load), daemon=True).start()

    def _load(self, run: CliRun, load: Load, prepare: Optional[Callable[[], bool]] = None,
              failed: Callable[[], None] = lambda: None) -> None:
        """Start a kept process and have it finish loading (or `prepare` a started one); file it
        as ready, or end it and call `failed`.

        Loads take turns, one per core left by the processes answering (at least one): sharing a
        core, several would all be ready late, a request waiting for the oldest would wait for them
        all, and answers would slow down. One a request took goes first. A `prepare` costs the CPU
        little and does not wait."""
        ok, counted = False, prepare is None
        try:
            with self.lock:
                self.lock.wait_for(lambda: not counted or self.loads < max(1, LOADS_AT_ONCE - self.busy)
                                   or self.closed or getattr(self.kept.get(id(run)), "loading", None) is not load,
                                   LOAD_SECONDS)
                self.loads += counted
            if not (self.closed or load.cancelled):
                if prepare is None:
                    run.start(send_prompt=False)
                ok = run.initialize(LOAD_SECONDS) if prepare is None else prepare()
        except (ApiError, OSError, ValueError):
            pass  # ended below, or by whoever took it
        finally:
            with self.lock:
                self.loads -= counted
                self.lock.notify_all()
                ok = ok and not self.closed  # started as the server stopped: never kept
                entry = self.kept.get(id(run))
                ours = entry is not None and entry.loading is load
                if ours and ok:
                    self.kept[id(run)] = entry._replace(loading=None)
                elif ours:
                    del self.kept[id(run)]
                load.ok = ok
                load.done.set()
            if (ours and not ok) or load.cancelled:
                self._end(run, slot=False)
            if not ok and not load.cancelled:
                failed()

    def close(self, timeout: float = 10.0) -> None:
        """At shutdown: start nothing more and end every kept process, those still loading too
        (their loaders see `closed` and end what they started)."""
        with self.lock:
            self.closed = True
            self.lock.notify_all()  # loads waiting for their turn give up
            loading = [e for e in self.kept.values() if e.loading is not None]
        while self.evict_oldest():
            pass
        deadline = time.monotonic() + timeout
        for entry in loading:
            entry.run.close()  # its initialize fails at once
            entry.loading.done.wait(max(0.0, deadline - time.monotonic()))

    # -- clients that rewrite their history ----------------------------------------------------

    def notice_rewriting(self, call: CliCall) -> None:
        """On a miss: if a kept process holds this history but for its prompt's trailing blocks
        (or holds it with them, where they were predicted gone), learn how many this kind of
        client leaves out of its next request, and end that process, which no request will fit.
        The same client's other parked conversations are resumed at their predicted histories."""
        if not call.history:
            return
        key, shape = conversation_key(call, call.history), conversation_key(call, [])
        with self.lock:
            found = next(((run_id, r) for run_id, e in self.kept.items() for r in e.rewrites if r.key == key), None)
            if found is None:
                return
            ended, dropped = [self._unkeep(found[0])], found[1].dropped
            self.rewriters.pop(shape, None)
            if dropped:
                self.rewriters[shape] = dropped
                while len(self.rewriters) > REWRITERS_KEPT:
                    self.rewriters.popitem(last=False)
            predictions = [] if not dropped else [
                (run_id, e.run.call, r.turns) for run_id, e in self.kept.items() for r in e.rewrites
                if r.dropped == dropped and not (e.at_tool_call or e.predicted)
                and conversation_key(e.run.call, []) == shape]
            ended += [self._unkeep(run_id) for run_id, _, _ in predictions]
        self._end_unkept(ended)
        for _, other, turns in predictions:
            self.predict(other, turns)

    def dropped_blocks(self, call: CliCall) -> int:
        """How many trailing prompt blocks this kind of client leaves out of its next request."""
        with self.lock:
            return self.rewriters.get(conversation_key(call, []), 0)

    # -- numbers for /health and /metrics -------------------------------------------------------

    def counts(self) -> Dict[str, int]:
        """CLI processes by state (busy: answering; loading, warm, parked, predicted: kept), reuse
        hits and misses."""
        with self.lock:
            ready = [entry for entry in self.kept.values() if entry.loading is None]
            warm = sum(1 for entry in ready if entry.warm)
            predicted = sum(1 for entry in ready if entry.predicted)
            return {"busy": self.busy, "loading": len(self.kept) - len(ready), "warm": warm,
                    "parked": len(ready) - warm - predicted, "predicted": predicted,
                    "hits": self.hits, "misses": self.misses}


class Turn:
    """One turn on one CLI process, iterated as TurnEvents. It answers the CLI's questions (control
    requests) through the runner, and just before the final event asks the pool to park the
    process when it can continue the conversation faithfully."""

    def __init__(self, pool: ProcessPool, call: CliCall, run: CliRun, reused: bool,
                 client_gone: Callable[[], bool], translator: "TurnTranslator"):
        self.pool, self.call, self.run, self.reused = pool, call, run, reused
        self.client_gone, self.translator = client_gone, translator
        self.events = []  # type: List["TurnEvent"]  # what the turn produced so far
        self.parked = False

    @property
    def model(self) -> str:
        return self.translator.model or self.call.requested_model

    def __iter__(self) -> Iterator["TurnEvent"]:
        config = self.pool.config
        deadline = time.monotonic() + config.request_timeout
        for event in self.run.events(deadline, config.idle_timeout, self.client_gone):
            if event.get("type") == "control_request":
                self.run.on_control_request(event)
                continue
            for out in self.translator.feed(event):
                self.events.append(out)
                if out.kind == "finish":
                    self._before_end(out)
                yield out
            if self.translator.finished:
                return
        raise self.run.failure()

    def _before_end(self, finish: "TurnEvent") -> None:
        # Before the answer's last bytes: a client's next turn must find the process waiting.
        translator = self.translator
        self.parked = self._park(finish)
        if not self.parked and translator.stop_reason == "max_tokens":
            # The CLI would ask the model again by itself ("Output token limit hit..."), spending
            # quota on an answer no client receives: end it before it can.
            self.run.kill_now()
        elif not self.parked and translator.stop_reason == "end_turn" and not translator.cut \
                and not self.run.result_seen:
            self.run.wait_for_result(2.0)  # a 200's rate_limit_event follows its message

    def _park(self, finish: "TurnEvent") -> bool:
        """Park the process for the conversation's next turn when it can continue it faithfully."""
        call, run, translator = self.call, self.run, self.translator
        if self.pool.keep <= 0 or not run.running():
            return False
        turns = call.history + [{"role": "user", "content": call.prompt}, assistant_turn_from(self.events, call)]
        ended = finish.reason == "stop" and translator.stop_reason == "end_turn" and not translator.cut \
            and bool(turns[-1]["content"])
        dropped = self.pool.dropped_blocks(call)
        if ended and 0 < dropped < len(call.prompt):
            # This client's next request leaves out part of this prompt, which this process has
            # seen: it is reseated at that history, or a process is resumed there. Not after a
            # first turn: the CLI dates the conversation at its first asked turn, which would
            # then be the next one.
            predicted = predicted_turns(turns, dropped)
            if call.history and all(b["type"] == "text" for b in call.prompt) and run.replies \
                    and not any(b.get("type") == "tool_use" for m in run.replies for b in m.get("content") or ()) \
                    and self.pool.reseat(call, run, predicted):
                return True
            self.pool.predict(call, predicted)
            return False
        if any(b["type"] == "tool_result" for b in call.prompt) and not self.reused:
            return False  # that process saw the replay's extra lines; later turns should not
        at_tool_call = finish.reason == "tool_calls" and call.parallel_tool_calls
        if not at_tool_call and not (ended and run.wait_for_result(10.0)):
            return False
        return self.pool.park(conversation_key(call, turns), run, at_tool_call, rewrites=rewrites_of(call, turns))


# ================================================================================================
# Event translation (pure): CLI events -> TurnEvents -> renderers' SSE frames / whole objects
# ================================================================================================

# TurnEvents: what a turn produced, translated from the CLI's JSON lines, in the order a turn
# produces them. Each is a tuple whose first item names its kind, so it also reads as one.

def turn_event_type(name: str, kind: str, fields: str, doc: str) -> Any:
    """A TurnEvent type: a named tuple whose first item, `kind`, is filled in."""
    base = collections.namedtuple(name, "kind " + fields)

    def new(cls, *values):
        return base.__new__(cls, kind, *values)
    return type(name, (base,), {"__slots__": (), "__new__": new, "__doc__": doc})


Text = turn_event_type("Text", "text", "text", "Answer text, after stop-string handling.")
Reasoning = turn_event_type("Reasoning", "reasoning", "text", "Thinking text, when the call includes reasoning.")
Signature = turn_event_type("Signature", "signature", "signature",
                            "The signature that closes a thinking block (the Messages API shows it).")
ToolCall = turn_event_type("ToolCall", "tool_call", "number id name",
                           "A client tool call starts: its number in the turn, its id, the client's tool name.")
ToolArgs = turn_event_type("ToolArgs", "tool_args", "number fragment", "A fragment of a tool call's JSON arguments.")
Finish = turn_event_type("Finish", "finish", "reason usage", "The end: an OpenAI finish_reason and a usage dict.")
TurnEvent = Union[Text, Reasoning, Signature, ToolCall, ToolArgs, Finish]


def error_from_result(result: Dict[str, Any], rate_limit: Optional[Dict[str, Any]] = None,
                      now: Optional[float] = None) -> ApiError:
    """A CLI `result` with is_error -> the HTTP error it stands for (structured fields first).

    `rate_limit` is the turn's `rate_limit_info`: it holds the reset time a usage limit's text lacks."""
    now = time.time() if now is None else now
    status = result.get("api_error_status")
    text = str(result.get("result") or (result.get("errors") or ["the Claude CLI reported an error"])[0])
    # Without a structured status, the CLI's own wording is all there is to go on.
    if status is None and re.search(r"not logged in|/login|invalid api key|oauth token", text, re.I):
        status = 401
    if status is None and re.search(r"usage limit|rate limit", text, re.I):
        status = 429
    headers = {}
    special = [mapped for field, pattern, mapped in RESULT_ERRORS
               if re.search(pattern, str(result.get(field) or ""), re.I)]
    if special:
        http_status, kind, code = special[0]
    elif isinstance(status, int) and status in UPSTREAM_ERRORS:
        http_status, kind, code = UPSTREAM_ERRORS[status]
    else:
        http_status, kind, code = 502, "server_error", "upstream_error"
    if http_status == 401:
        text = "%s. %s" % (text.rstrip(". "), LOGIN_HINT)
    if code == "extra_usage_required":
        text = "%s. %s" % (text.rstrip(". "), EXTRA_USAGE_HINT)
    if http_status == 429:
        legacy = re.search(r"\|(\d{10})\b", text)
        reset = (rate_limit or {}).get("resetsAt") if result.get("api_error") == "usage_limit_reached" else None
        reset = int(legacy.group(1)) if legacy else reset
        if isinstance(reset, (int, float)):
            headers["Retry-After"] = str(max(1, int(reset - now)))
            text = "%s (the limit resets at %s)" % (text, utc_time(reset))
        elif result.get("api_error") != "usage_limit_reached":
            headers["Retry-After"] = str(UPSTREAM_RETRY_AFTER)
    return ApiError(http_status, text, kind, code, headers=headers)


def utc_time(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# Anthropic's names for the limit windows in its `anthropic-ratelimit-unified-<short>-*` headers.
WINDOW_SHORT_NAMES = {"five_hour": "5h", "seven_day": "7d"}
UNIFIED_HEADER = "anthropic-ratelimit-unified-"


def limit_state_from(info: Any, now: float) -> Optional[Dict[str, Any]]:
    """A CLI `rate_limit_info` -> the limit state the proxy reports; None when it names no reset
    time (the upstream sent no limit headers, so it says nothing about the plan's windows)."""
    if not isinstance(info, dict) or not isinstance(info.get("resetsAt"), (int, float)):
        return None
    window = str(info.get("rateLimitType") or "")
    windows = {name: {"utilization": w.get("utilization"), "resets_at": w.get("resetsAt"),
                      "status": w.get("status")}
               for name, w in (info.get("unifiedWindows") or {}).items() if isinstance(w, dict)}
    utilization = info.get("utilization", (windows.get(window) or {}).get("utilization"))
    return {"status": str(info.get("status") or "allowed"), "window": window or None,
            "utilization": utilization, "resets_at": int(info["resetsAt"]),
            "surpassed_threshold": info.get("surpassedThreshold"),
            "overage_status": info.get("overageStatus"),
            "overage_in_use": bool(info.get("isUsingOverage") or info.get("overageInUse")),
            "overage_resets_at": info.get("overageResetsAt"),
            "overage_disabled_reason": info.get("overageDisabledReason"),
            "windows": windows, "updated_at": int(now)}


def ratelimit_headers_for(state: Optional[Dict[str, Any]]) -> Dict[str, str]:
    """The limit state as the `anthropic-ratelimit-unified-*` headers Anthropic itself sends."""
    if state is None:
        return {}
    fields = [("status", state["status"]), ("reset", state["resets_at"]),
              ("representative-claim", state["window"]), ("overage-status", state["overage_status"]),
              ("overage-in-use", "true" if state["overage_in_use"] else "false"),
              ("overage-reset", state["overage_resets_at"]),
              ("overage-disabled-reason", state["overage_disabled_reason"])]
    windows = dict(state["windows"])
    if state["window"] and state["utilization"] is not None:
        windows.setdefault(state["window"], {"utilization": state["utilization"],
                                             "resets_at": state["resets_at"], "status": None})
    for name, window in sorted(windows.items()):
        short = WINDOW_SHORT_NAMES.get(name)
        if short:
            fields += [(short + "-utilization", window["utilization"]), (short + "-reset", window["resets_at"]),
                       (short + "-status", window["status"])]
    if state["surpassed_threshold"] is not None and WINDOW_SHORT_NAMES.get(state["window"]):
        fields.append((WINDOW_SHORT_NAMES[state["window"]] + "-surpassed-threshold", state["surpassed_threshold"]))
    return {UNIFIED_HEADER + name: str(value) for name, value in fields if value is not None}


def overage_refusal(state: Optional[Dict[str, Any]], now: float) -> Optional[ApiError]:
    """With --no-overage: the error for a request that extra usage would pay for, until the reset."""
    if state is None or now >= state["resets_at"]:
        return None
    would_pay = state["status"] == "rejected" and state["overage_status"] in ("allowed", "allowed_warning")
    if not (state["overage_in_use"] or would_pay):
        return None
    return ApiError(402, "Refused by --no-overage: your %s limit is used up and requests are now paid "
                    "from extra usage (overage). Requests resume when the limit resets at %s; restart "
                    "without --no-overage to spend extra usage." % (state["window"] or "plan", utc_time(state["resets_at"])),
                    "billing_error", "extra_usage_refused",
                    headers={"Retry-After": str(max(1, int(state["resets_at"] - now)))})


def usage_from(usage: Dict[str, Any]) -> Dict[str, Any]:
    """Anthropic usage -> OpenAI usage (prompt tokens include cached ones, as OpenAI counts)."""
    cached = int(usage.get("cache_read_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + cached + int(usage.get("cache_creation_input_tokens") or 0)
    completion = int(usage.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": 0}}


def kmp_table(pattern: str) -> List[int]:
    """For each prefix of `pattern`, the length of its longest proper prefix that is also its suffix."""
    table, matched = [0] * len(pattern), 0
    for i in range(1, len(pattern)):
        while matched and pattern[i] != pattern[matched]:
            matched = table[matched - 1]
        matched += pattern[i] == pattern[matched]
        table[i] = matched
    return table


class TurnTranslator:
    """Feeds on CLI events one at a time and says what the turn produced.

    The turn ends at the first upstream message that stops (so exactly one model call is used:
    the CLI is ended before it could retry or run a tool), or at the CLI's `result`.
    """

    def __init__(self, call: Optional[CliCall] = None, stop: Optional[Tuple[str, ...]] = None):
        self.call = call
        self.stop = stop if stop is not None else call.stop if call is not None else ()
        self.model = None  # type: Optional[str]
        self.usage = {}    # type: Dict[str, Any]
        self.stop_reason = None  # type: Optional[str]
        self.pending = ""  # text held back because it might begin a stop string
        self.stop_matched = None  # type: Optional[List[int]]  # per stop string: characters matched
        self.stop_tables = []     # type: List[List[int]]
        self.finished = False
        self.received_text = False
        self.blocks = {}   # content block index -> ("text"|"tool"|"structured"|"thinking"|"other", n)
        self.tool_calls = 0
        self.args_seen = set()  # tool call numbers that got an arguments fragment
        self.json_mode = bool(call and call.json_schema is not None)
        self.structured = False  # the answer came as the CLI's StructuredOutput tool call
        self.held_text = ""      # in JSON mode, text is kept until we know it is the answer
        self.cut = False         # ended early by a stop string (the model was still writing)
        self.model_called = False  # an upstream message started (a local command starts none)
        self.stop_sequence = None  # type: Optional[str]  # the stop string that cut it
        self.rate_limit = None   # type: Optional[Dict[str, Any]]  # the turn's rate_limit_info

    def feed(self, event: Dict[str, Any]) -> List[TurnEvent]:
        if self.finished:
            return []
        kind = event.get("type")
        if kind == "stream_event" and not event.get("parent_tool_use_id"):
            return self._stream_event(event.get("event") or {})
        if kind == "result":
            return self._result(event)
        if kind == "rate_limit_event":
            self.rate_limit = event.get("rate_limit_info") or self.rate_limit
        return []

    def _stream_event(self, event: Dict[str, Any]) -> List[TurnEvent]:
        kind = event.get("type")
        if kind == "message_start":
            self.model_called = True
            message = event.get("message") or {}
            self.model = message.get("model") or self.model
            self.usage.update(message.get("usage") or {})
        elif kind == "content_block_start":
            return self._block_start(event.get("index"), event.get("content_block") or {})
        elif kind == "content_block_delta":
            return self._delta(self.blocks.get(event.get("index"), ("text", None)), event.get("delta") or {})
        elif kind == "content_block_stop":
            block = self.blocks.get(event.get("index"), ("other", None))
            out = []
            if block[0] == "tool" and block[1] not in self.args_seen:
                out.append(ToolArgs(block[1], "{}"))
            if block[0] == "tool" and self.call is not None and not self.call.parallel_tool_calls:
                return out + self._finish("tool_calls")  # one call only: end before the next
            return out
        elif kind == "message_delta":
            self.stop_reason = (event.get("delta") or {}).get("stop_reason") or self.stop_reason
            self.usage.update(event.get("usage") or {})
        elif kind == "message_stop" and self.stop_reason:
            reason = FINISH_REASONS.get(self.stop_reason, "stop")
            if reason == "tool_calls" and not self.tool_calls:
                reason = "stop"  # only the structured-output tool (or a non-client tool) was called
            return self._finish(reason)
        return []

    def _block_start(self, index: Any, block: Dict[str, Any]) -> List[TurnEvent]:
        kind = block.get("type")
        if kind == "tool_use":
            name = block.get("name") or ""
            if self.json_mode and name == STRUCTURED_OUTPUT_TOOL:
                self.blocks[index] = ("structured", None)
                self.structured, self.held_text = True, ""
                return []
            client_name = self.call.client_name(name) if self.call is not None else None
            if client_name is None:
                self.blocks[index] = ("other", None)
                return []
            number = self.tool_calls
            self.tool_calls += 1
            self.blocks[index] = ("tool", number)
            return [ToolCall(number, block.get("id") or "call_%d" % number, client_name)]
        self.blocks[index] = ("thinking", None) if kind in ("thinking", "redacted_thinking") else ("text", None)
        return []

    def _delta(self, block: Tuple[str, Any], delta: Dict[str, Any]) -> List[TurnEvent]:
        kind = delta.get("type")
        if kind == "text_delta" and block[0] == "text":
            self.received_text = True
            if self.json_mode:
                if not self.structured:
                    self.held_text += delta.get("text") or ""
                return []
            return self._text(delta.get("text") or "")
        if kind == "input_json_delta" and block[0] == "tool":
            fragment = delta.get("partial_json") or ""
            if not fragment:
                return []  # the API opens every input with an empty fragment
            self.args_seen.add(block[1])
            return [ToolArgs(block[1], fragment)]
        if kind == "input_json_delta" and block[0] == "structured":
            self.received_text = True
            return self._emit(delta.get("partial_json") or "")
        if kind == "thinking_delta" and self.call is not None and self.call.include_reasoning:
            return [Reasoning(delta["thinking"])] if delta.get("thinking") else []
        if kind == "signature_delta" and self.call is not None and self.call.include_reasoning:
            return [Signature(delta["signature"])] if delta.get("signature") else []
        return []

    def _text(self, text: str) -> List[TurnEvent]:
        if not self.stop:
            return self._emit(text)
        if self.stop_matched is None:
            self.stop_matched, self.stop_tables = [0] * len(self.stop), [kmp_table(s) for s in self.stop]
        buffer = self.pending + text
        if not self.pending and not any(stop[0] in text for stop in self.stop):
            return self._emit(text)  # the usual delta: nothing in it can begin a stop string
        # Each stop string is matched as the text streams by (Knuth-Morris-Pratt), so a delta
        # costs its own length, however long the stop strings or the answer.
        for i, char in enumerate(text):
            done, winner = 0, None
            for n, stop in enumerate(self.stop):
                matched, table = self.stop_matched[n], self.stop_tables[n]
                while matched and char != stop[matched]:
                    matched = table[matched - 1]
                matched += char == stop[matched]
                if matched == len(stop):
                    if matched > done:
                        done, winner = matched, stop
                    matched = table[matched - 1]
                self.stop_matched[n] = matched
            if done:  # the stop string that ends first wins (the longest, if several end here)
                cut = len(self.pending) + i + 1 - done
                self.pending = ""
                self.cut = True
                self.stop_sequence = winner
                return self._emit(buffer[:cut]) + self._finish("stop")
        keep = max(self.stop_matched)  # what may still begin a stop string is held back
        self.pending = buffer[len(buffer) - keep:] if keep else ""
        return self._emit(buffer[:len(buffer) - keep])

    def _emit(self, text: str) -> List[TurnEvent]:
        return [Text(text)] if text else []

    def _result(self, result: Dict[str, Any]) -> List[TurnEvent]:
        if result.get("is_error"):
            self.finished = True
            raise error_from_result(result, self.rate_limit)
        if result.get("num_turns") == 0 and not self.model_called:
            # The CLI answered by itself (a command it ran locally): that text is not Claude's.
            self.finished = True
            raise ApiError(502, "the Claude CLI answered this message itself without asking the model "
                           "(it took it for one of its own commands); no answer came from Claude",
                           "server_error", "cli_local_command")
        self.usage = result.get("usage") or self.usage
        out = []
        structured = result.get("structured_output")
        if self.json_mode and structured is not None and not self.structured:
            self.structured = True
            out += self._emit(json.dumps(structured))
        elif not self.received_text and isinstance(result.get("result"), str):
            out += self._text(result["result"])  # no partial messages came: use the whole text
        if self.finished:
            return out
        reason = FINISH_REASONS.get(result.get("stop_reason") or "end_turn", "stop")
        return out + self._finish("stop" if reason == "tool_calls" and not self.tool_calls else reason)

    def _finish(self, reason: str) -> List[TurnEvent]:
        # A stop-string hit has already cleared `pending`; otherwise the held-back tail is answer.
        out = self._emit(self.pending)
        if self.json_mode and not self.structured:
            out += self._emit(self.held_text)  # no structured answer came: the text is the answer
        self.pending = self.held_text = ""
        self.finished = True
        return out + [Finish(reason, usage_from(self.usage))]


class ChatChunks:
    """TurnEvents -> chat.completion.chunk dicts for one streamed answer."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool,
                 legacy_functions: bool = False):
        self.base = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                     "model": model}
        self.include_usage = include_usage
        self.legacy_functions = legacy_functions
        self.started = False

    def _chunk(self, delta: Dict[str, Any], finish: Optional[str] = None) -> Dict[str, Any]:
        chunk = dict(self.base, choices=[{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish}])
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def chunks_for(self, event: TurnEvent) -> List[Dict[str, Any]]:
        out = []
        if not self.started:
            self.started = True
            out.append(self._chunk({"role": "assistant", "content": ""}))
        kind = event[0]
        if kind == "text":
            out.append(self._chunk({"content": event[1]}))
        elif kind == "reasoning":
            out.append(self._chunk({"reasoning_content": event[1]}))
        elif kind == "tool_call" and self.legacy_functions:
            out.append(self._chunk({"function_call": {"name": event[3], "arguments": ""}}))
        elif kind == "tool_call":
            out.append(self._chunk({"tool_calls": [{"index": event[1], "id": client_tool_id(event[2]), "type": "function",
                                                    "function": {"name": event[3], "arguments": ""}}]}))
        elif kind == "tool_args" and self.legacy_functions:
            out.append(self._chunk({"function_call": {"arguments": event[2]}}))
        elif kind == "tool_args":
            out.append(self._chunk({"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]}))
        elif kind == "finish":
            out.append(self._chunk({}, legacy_finish(event[1]) if self.legacy_functions else event[1]))
            if self.include_usage:
                out.append(dict(self.base, choices=[], usage=event[2]))
        return out


def tool_calls_from(events: List[TurnEvent]) -> List[Dict[str, Any]]:
    """The OpenAI tool_calls of a turn, arguments joined from their fragments."""
    calls = {}
    for event in events:
        if event[0] == "tool_call":
            calls[event[1]] = {"id": event[2], "type": "function", "function": {"name": event[3], "arguments": ""}}
        elif event[0] == "tool_args" and event[1] in calls:
            calls[event[1]]["function"]["arguments"] += event[2]
    return [calls[n] for n in sorted(calls)]


def legacy_finish(reason: str) -> str:
    return "function_call" if reason == "tool_calls" else reason


def completion_from(events: List[TurnEvent], completion_id: str, created: int, model: str,
                    legacy_functions: bool = False) -> Dict[str, Any]:
    """The non-streamed chat.completion for a whole turn (legacy `functions` get `function_call`):
    the turn's streamed chunks folded together, so the whole answer and the stream always agree."""
    chunks = ChatChunks(completion_id, created, model, True, legacy_functions)
    if not any(e[0] == "finish" for e in events):
        events = list(events) + [Finish("stop", usage_from({}))]
    parts = {"content": "", "reasoning_content": ""}
    calls, legacy_call, legacy_calls, finish, usage = {}, None, 0, None, None
    for chunk in (c for event in events for c in chunks.chunks_for(event)):
        if not chunk["choices"]:
            usage = chunk["usage"]
            continue
        delta, finish = chunk["choices"][0]["delta"], chunk["choices"][0]["finish_reason"] or finish
        for name in parts:
            parts[name] += delta.get(name) or ""
        for call in delta.get("tool_calls") or ():
            if "id" in call:
                calls[call["index"]] = {"id": call["id"], "type": "function", "function": dict(call["function"])}
            elif call["index"] in calls:
                calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
        function_call = delta.get("function_call") or {}
        legacy_calls += "name" in function_call
        if legacy_calls == 1:  # a legacy answer is its first call; later ones are dropped
            legacy_call = legacy_call or {"name": function_call["name"], "arguments": ""}
            legacy_call["arguments"] += function_call.get("arguments") or ""
    message = {"role": "assistant", "content": parts["content"], "refusal": None}
    if legacy_call is not None:
        message["function_call"] = legacy_call
    elif calls:
        message["tool_calls"] = [calls[n] for n in sorted(calls)]
    if legacy_call is not None or calls:
        message["content"] = parts["content"] or None
    if parts["reasoning_content"]:
        message["reasoning_content"] = parts["reasoning_content"]
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage}


class ChatRenderer:
    """How a turn looks as a chat completion: the whole answer, or SSE events while it streams.

    SSE events are (event name or None, JSON-able payload or the string "[DONE]")."""

    def __init__(self, call: CliCall):
        self.call = call
        self.completion_id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.chunks = None  # type: Optional[ChatChunks]

    def whole(self, events: List[TurnEvent], model: str) -> Dict[str, Any]:
        return completion_from(events, self.completion_id, self.created, model, self.call.legacy_functions)

    def stream_events(self, event: TurnEvent, model: str) -> List[Tuple[Optional[str], Any]]:
        if self.chunks is None:
            self.chunks = ChatChunks(self.completion_id, self.created, model, self.call.include_usage,
                                     self.call.legacy_functions)
        return [(None, chunk) for chunk in self.chunks.chunks_for(event)]

    def stream_error(self, error: ApiError) -> List[Tuple[Optional[str], Any]]:
        return [(None, error.body())]

    def stream_end(self) -> List[Tuple[Optional[str], Any]]:
        return [(None, "[DONE]")]


class CompletionRenderer:
    """How a turn looks in the legacy completions API: a `text_completion`, or its chunks."""

    def __init__(self, call: CliCall):
        self.call = call
        self.completion_id = "cmpl-" + uuid.uuid4().hex
        self.created = int(time.time())

    def _object(self, model: str, text: str, finish: Optional[str]) -> Dict[str, Any]:
        return {"id": self.completion_id, "object": "text_completion", "created": self.created,
                "model": model, "choices": [{"text": text, "index": 0, "logprobs": None,
                                             "finish_reason": finish}]}

    def whole(self, events: List[TurnEvent], model: str) -> Dict[str, Any]:
        text = "".join(e[1] for e in events if e[0] == "text")
        finish = next((e for e in events if e[0] == "finish"), Finish("stop", usage_from({})))
        return dict(self._object(model, text, finish[1]), usage=finish[2])

    def stream_events(self, event: TurnEvent, model: str) -> List[Tuple[Optional[str], Any]]:
        if event[0] == "text":
            return [(None, self._object(model, event[1], None))]
        if event[0] != "finish":
            return []
        out = [(None, self._object(model, "", event[1]))]
        if self.call.include_usage:
            out.append((None, dict(self._object(model, "", None), choices=[], usage=event[2])))
        return out

    def stream_error(self, error: ApiError) -> List[Tuple[Optional[str], Any]]:
        return [(None, error.body())]

    def stream_end(self) -> List[Tuple[Optional[str], Any]]:
        return [(None, "[DONE]")]


def stream_frames(turn: Any, renderer: Any) -> Iterator[Tuple[Optional[str], Any]]:
    """A turn's (TurnEvents with the `model` answering) SSE frames, (event name or None, payload), ending with the renderer's end marker.

    An error before the first frame propagates (it can still be an HTTP status); after it, the
    stream ends with the renderer's error frame, since the status is already 200."""
    started = False
    try:
        for event in turn:
            for frame in renderer.stream_events(event, turn.model):
                started = True
                yield frame
    except ApiError as exc:
        if not started:
            raise
        yield from renderer.stream_error(exc)
    yield from renderer.stream_end()


def assistant_turn_from(events: List[TurnEvent], call: CliCall) -> Dict[str, Any]:
    """The assistant turn a finished answer adds, as the client's resend of it will translate."""
    content = []
    text = "".join(e[1] for e in events if e[0] == "text")
    if text:
        content.append({"type": "text", "text": text})
    names = {t.name: t.mcp_name for t in call.tools}
    for tool_call in tool_calls_from(events):
        try:
            arguments = json.loads(tool_call["function"]["arguments"] or "{}")
        except ValueError:
            arguments = None
        content.append({"type": "tool_use", "id": tool_call["id"],
                        "name": MCP_PREFIX + names.get(tool_call["function"]["name"], ""), "input": arguments})
    return {"role": "assistant", "content": content}


def conversation_key(call: CliCall, turns: List[Dict[str, Any]]) -> str:
    """A digest of everything a CLI process has fixed, plus the turns it has seen."""
    fixed = [call.model, call.system_prompt, [dataclasses.astuple(t) for t in call.tools],
             call.json_schema, call.effort, call.max_output_tokens, call.include_reasoning, turns]
    return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode("utf-8")).hexdigest()


def predicted_entry(call: CliCall, turns: List[Dict[str, Any]]) -> Tuple[CliCall, Dict[str, Any]]:
    """For a process predicted at `turns`, the history `call`'s client is predicted to send next:
    its call, and the rest of its Kept entry (its conversation, and the history that client would
    send instead should it keep the prompt's trailing blocks after all: notice_rewriting then
    ends the process and forgets the lesson)."""
    resumed = dataclasses.replace(call, history=turns, prompt=[])
    undropped = turns[:-2] + [{"role": "user", "content": call.prompt}, turns[-1]]
    return resumed, {"rewrites": (Rewrite(conversation_key(call, undropped), 0, undropped),),
                     "predicted": True, "conversation": conversation_of(resumed)}


def predicted_turns(turns: List[Dict[str, Any]], dropped: int) -> List[Dict[str, Any]]:
    """The turns a client sends back when it leaves the last prompt's `dropped` trailing blocks out."""
    prompt = turns[-2]
    return turns[:-2] + [dict(prompt, content=prompt["content"][:-dropped]), turns[-1]]


def rewrites_of(call: CliCall, turns: List[Dict[str, Any]]) -> Tuple["Rewrite", ...]:
    """`turns` without one, two... trailing prompt blocks (a client's context message)."""
    most = min(REWRITE_BLOCKS_MAX, len(turns[-2]["content"]) - 1)
    shorter = [predicted_turns(turns, n) for n in range(1, most + 1)]
    return tuple(Rewrite(conversation_key(call, t), n, t) for n, t in enumerate(shorter, 1))


def conversation_of(call: CliCall) -> str:
    """A conversation's lasting name: what its processes have fixed, its first turn and answer."""
    return conversation_key(call, call.history[:2])


def model_object(model_id: str) -> Dict[str, Any]:
    return {"id": model_id, "object": "model", "created": MODELS_CREATED, "owned_by": "anthropic"}


# ================================================================================================
# Responses API (pure): /v1/responses requests -> chat requests, turns -> response objects/events
# ================================================================================================

# Responses parameters copied as they are into the chat body (the same names and meaning there).
RESPONSES_SHARED_PARAMS = ("model", "stream", "temperature", "top_p", "user", "metadata", "store",
                           "service_tier", "parallel_tool_calls", "top_logprobs", "include_reasoning")
# Chat parameter names in errors -> the Responses parameter the client actually sent.
RESPONSES_PARAM_NAMES = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "reasoning_effort": "reasoning.effort",
    "response_format": "text.format",
    "response_format.json_schema.schema": "text.format.schema",
}
# Where each chat message (or tool call) of a translated body came from, for error params:
# {chat prefix: (Responses param, {chat field suffix: Responses field suffix})}.
Origins = Dict[str, Tuple[str, Dict[str, str]]]
# Why a hosted tool (web_search, file_search, computer_use_preview...) is refused: nothing runs it.
BUILTIN_TOOL_HINT = ("only `function` tools are supported: the proxy has no hosted tools "
                     "(web search, file search, computer use, code interpreter...)")
# A function inside a `namespace` tool (Codex groups tools so) reaches the model as one flat
# function named <namespace>__<name>; its calls go back to the client as `namespace` and `name`.
NAMESPACE_SEPARATOR = "__"
# Tools the client runs; any other type is hosted (run by OpenAI's servers) and left out here.
CLIENT_TOOL_TYPES = ("function", "namespace", "custom")
# The `include` value that asks for reasoning items (Codex sends it with `reasoning.summary`).
REASONING_INCLUDE = "reasoning.encrypted_content"
REASONING_SUMMARIES = ("auto", "concise", "detailed")
# The `error.code` values a failed response may carry (the OpenAPI spec's ResponseErrorCode).
RESPONSE_ERROR_CODES = ("server_error", "rate_limit_exceeded", "invalid_prompt", "invalid_image",
                        "invalid_image_format", "invalid_base64_image", "invalid_image_url",
                        "image_too_large", "unsupported_image_media_type")


def responses_message_of(item: Dict[str, Any]) -> Dict[str, Any]:
    """A Responses `message` item -> a chat message; content parts stay one for one (errors point
    at the same index)."""
    content = item.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("input_text", "output_text"):
                part = {"type": "text", "text": part.get("text")}
            elif kind == "input_image":
                url = part.get("image_url")
                if url is None and part.get("file_id") is not None:
                    url = "file:" + str(part["file_id"])  # refused below as not a data: URL
                part = {"type": "image_url", "image_url": {"url": url}}
            parts.append(part)
        content = parts
    return {"role": item.get("role"), "content": content}


def chat_messages_from_items(items: List[Any], first: int = 0, where: str = "input"
                             ) -> Tuple[List[Dict[str, Any]], Origins]:
    """Responses input (or output) items -> chat messages, and where each one came from.

    `first` is the index the first message will have in the chat body's `messages`."""
    messages, origins = [], {}
    merging = False  # consecutive function_call items share one assistant message
    for i, item in enumerate(items):
        param = "%s[%d]" % (where, i)
        if not isinstance(item, dict):
            raise invalid(param, "`%s` must be an object" % param, "invalid_type")
        kind = item.get("type", "message" if "role" in item else None)
        at = "messages[%d]" % (first + len(messages))
        if kind == "message":
            messages.append(responses_message_of(item))
            origins[at] = (param, {})
            merging = False
        elif kind in ("function_call", "custom_tool_call"):
            name, arguments = item.get("name"), item.get("arguments")
            if isinstance(item.get("namespace"), str) and isinstance(name, str):
                name = item["namespace"] + NAMESPACE_SEPARATOR + name
            if kind == "custom_tool_call":  # its free-form input is the one argument of a function
                arguments = json.dumps({"input": item["input"]}) if isinstance(item.get("input"), str) else None
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": name, "arguments": arguments}}
            if merging:
                at = "messages[%d]" % (first + len(messages) - 1)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": []})
            origins["%s.tool_calls[%d]" % (at, len(messages[-1]["tool_calls"]))] = (
                param, {".function.arguments": ".arguments" if kind == "function_call" else ".input",
                        ".function.name": ".name", ".id": ".call_id", ".function": ""})
            messages[-1]["tool_calls"].append(call)
            merging = True
        elif kind in ("function_call_output", "custom_tool_call_output"):
            output = item.get("output")
            if isinstance(output, list):
                output = responses_message_of({"content": output})["content"]
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output})
            origins[at] = (param, {".tool_call_id": ".call_id", ".content": ".output"})
            merging = False
        elif kind == "reasoning":
            continue  # the model's earlier thinking, echoed back: not replayed
        else:
            raise invalid(param + ".type", "input items of type %r are not supported (message, "
                          "function_call, function_call_output)" % (kind,), "unsupported_input_item")
    return messages, origins


def hosted_tools_of(tools: Any) -> List[str]:
    """The types of the tools only OpenAI's servers run (web_search, file_search...): they are left
    out of what the model sees, and the answer says so, rather than failing the request."""
    if not isinstance(tools, list):
        return []
    return [tool["type"] for tool in tools if isinstance(tool, dict) and isinstance(tool.get("type"), str)
            and tool["type"] not in CLIENT_TOOL_TYPES]


def namespaced_tools_of(tools: Any) -> Dict[str, Tuple[str, str]]:
    """Flat name -> (namespace, name) of each function inside a `namespace` tool."""
    found = {}
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict) and tool.get("type") == "namespace" and isinstance(tool.get("name"), str):
            for inner in tool.get("tools") if isinstance(tool.get("tools"), list) else []:
                if isinstance(inner, dict) and isinstance(inner.get("name"), str):
                    found[tool["name"] + NAMESPACE_SEPARATOR + inner["name"]] = (tool["name"], inner["name"])
    return found


def custom_tools_of(tools: Any) -> Tuple[str, ...]:
    """The names of the `custom` (free-form input) tools."""
    return tuple(tool["name"] for tool in tools if isinstance(tool, dict) and tool.get("type") == "custom"
                 and isinstance(tool.get("name"), str)) if isinstance(tools, list) else ()


def chat_tool_of_custom(tool: Dict[str, Any]) -> Dict[str, Any]:
    """A `custom` tool -> a function whose one string argument, `input`, is the free-form input;
    a grammar the input must follow is stated in the description."""
    description = tool.get("description") if isinstance(tool.get("description"), str) else ""
    fmt = tool.get("format") if isinstance(tool.get("format"), dict) else {}
    if fmt.get("type") == "grammar":
        description += "\n\nThe `input` must follow this %s grammar:\n%s" % (fmt.get("syntax"), fmt.get("definition"))
    return {"type": "function", "function": {
        "name": tool.get("name"), "description": description.strip(),
        "parameters": {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}}}


def chat_tool_of(tool: Dict[str, Any], name: Any) -> Dict[str, Any]:
    """A flat Responses function tool -> a chat tool (nested under `function`)."""
    function = {key: tool[key] for key in ("description", "parameters") if key in tool}
    return {"type": "function", "function": dict(function, name=name) if "name" in tool else function}


def chat_tools_from_responses(tools: Any) -> Tuple[Any, Dict[str, str]]:
    """Responses tools -> (chat tools, chat tool param -> the Responses param it came from).

    Functions inside a `namespace` become flat functions; hosted tools are left out."""
    if not isinstance(tools, list):
        return tools, {}  # the chat checks name the error
    out, origins = [], {}
    for i, tool in enumerate(tools):
        where = "tools[%d]" % i
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "namespace":
            inner = tool.get("tools")
            if not isinstance(tool.get("name"), str) or not isinstance(inner, list):
                raise invalid(where, "a `namespace` tool needs a `name` and a `tools` array", "invalid_type")
            for j, function in enumerate(inner):
                if not isinstance(function, dict) or function.get("type") != "function":
                    raise invalid("%s.tools[%d]" % (where, j), "only function tools are supported inside "
                                  "a namespace", "unsupported_tool")
                origins["tools[%d]" % len(out)] = "%s.tools[%d]" % (where, j)
                out.append(chat_tool_of(function, tool["name"] + NAMESPACE_SEPARATOR + str(function.get("name"))))
            continue
        if kind == "custom":
            origins["tools[%d]" % len(out)] = where
            out.append(chat_tool_of_custom(tool))
            continue
        if isinstance(kind, str) and kind != "function":
            continue  # a hosted tool: see hosted_tools_of
        if kind != "function":
            raise invalid(where, "tools of type %r are not supported: %s" % (kind, BUILTIN_TOOL_HINT),
                          "unsupported_tool")
        origins["tools[%d]" % len(out)] = where
        out.append(tool if "function" in tool else chat_tool_of(tool, tool.get("name")))
    return out, origins


def offered_tools_of(tools: Any) -> List[Any]:
    """The tools a response echoes: those the model was offered (hosted ones were left out), each
    function with the fields the spec requires of it."""
    if not isinstance(tools, list):
        return []
    return [dict({"strict": None, "parameters": None}, **tool) if tool.get("type") == "function" else tool
            for tool in tools if isinstance(tool, dict) and tool.get("type") in CLIENT_TOOL_TYPES]


def reasoning_requested(body: Dict[str, Any]) -> bool:
    """The client asked for reasoning items (`reasoning.summary`, or their encrypted content)."""
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    include = body.get("include") if isinstance(body.get("include"), list) else []
    return reasoning.get("summary") is not None or REASONING_INCLUDE in include


def chat_tool_choice_from_responses(choice: Any) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        if isinstance(choice.get("function"), dict):
            return choice
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise invalid("tool_choice", "`tool_choice` must be auto, none, required or {type: function, "
                  "name}: %s" % BUILTIN_TOOL_HINT, "unsupported_tool")


def chat_response_format_from_responses(text: Any) -> Optional[Dict[str, Any]]:
    """`text.format` (name and schema at its top level) -> chat `response_format`."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise invalid("text", "`text` must be an object", "invalid_type")
    fmt = text.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {
            key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}}
    return fmt


def responses_translation(body: Any, previous_messages: List[Dict[str, Any]]
                          ) -> Tuple[Dict[str, Any], List[Dict[str, Any]], Origins]:
    """(chat body, the conversation without instructions, error-param origins) for a Responses body."""
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object", "invalid_type")
    if body.get("background"):
        raise invalid("background", "background responses are not supported", "unsupported_value")
    for name in ("conversation", "prompt"):
        if body.get(name) is not None:
            raise invalid(name, "`%s` is not supported: send `input` (and `previous_response_id` to "
                          "continue a conversation)" % name, "unsupported_parameter")
    if "input" not in body:
        raise invalid("input", "`input` is required", "missing_required_parameter")
    items = body["input"]
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    elif not isinstance(items, list):
        raise invalid("input", "`input` must be a string or an array of items", "invalid_type")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("instructions", "`instructions` must be a string", "invalid_type")
    head = [{"role": "system", "content": instructions}] if instructions else []
    origins = {"messages[%d]" % i: ("previous_response_id", {})
               for i in range(len(head), len(head) + len(previous_messages))}
    if head:
        origins["messages[0]"] = ("instructions", {".content": ""})
    new, item_origins = chat_messages_from_items(items, len(head) + len(previous_messages))
    origins.update(item_origins)
    conversation = list(previous_messages) + new
    chat = {key: body[key] for key in RESPONSES_SHARED_PARAMS if key in body}
    chat["messages"] = head + conversation
    tools, tool_origins = chat_tools_from_responses(body.get("tools"))
    origins.update({chat_param: (param, {".function": ""}) for chat_param, param in tool_origins.items()})
    if reasoning_requested(body) and "include_reasoning" not in chat:
        chat["include_reasoning"] = True  # thinking, when the model gives it, becomes the reasoning item
    for name, value in (("tools", tools),
                        ("tool_choice", chat_tool_choice_from_responses(body.get("tool_choice"))),
                        ("max_completion_tokens", body.get("max_output_tokens")),
                        ("response_format", chat_response_format_from_responses(body.get("text")))):
        if value is not None:
            chat[name] = value
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise invalid("reasoning", "`reasoning` must be an object", "invalid_type")
    if reasoning and reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    return chat, conversation, origins


def chat_body_from_responses(body: Any, previous_messages: Optional[List[Dict[str, Any]]] = None
                             ) -> Dict[str, Any]:
    """A Responses request (plus the stored conversation it continues) -> a chat-completions body."""
    return responses_translation(body, previous_messages or [])[0]


def responses_error(error: ApiError, origins: Origins) -> ApiError:
    """A chat-translation error re-aimed at the Responses parameter the client sent."""
    param = error.param
    if not param:
        return error
    old = new = None
    tool = re.match(r"^(tools\[\d+\])\.function", param)
    if param in RESPONSES_PARAM_NAMES:
        old, new = param, RESPONSES_PARAM_NAMES[param]
    elif tool:
        old, new = tool.group(0), origins.get(tool.group(1), (tool.group(1), {}))[0]
    else:
        for prefix in sorted(origins, key=len, reverse=True):
            if param == prefix or param.startswith(prefix + ".") or param.startswith(prefix + "["):
                target, renames = origins[prefix]
                old, new = prefix, target
                rest = param[len(prefix):]
                for suffix in sorted(renames, key=len, reverse=True):
                    if rest == suffix or rest.startswith(suffix + ".") or rest.startswith(suffix + "["):
                        old, new = prefix + suffix, target + renames[suffix]
                        break
                break
    if old is None:
        return error
    # Messages name their parameter in backticks, sometimes with a field after it.
    message = error.message.replace("`" + old, "`" + new)
    return ApiError(error.status, message, error.type, error.code, new + param[len(old):], error.headers)


def responses_call_for(body: Any, previous_messages: List[Dict[str, Any]], config: Config
                       ) -> Tuple[CliCall, List[Dict[str, Any]]]:
    """Validate a Responses request; returns its CliCall and the conversation so far (without the
    instructions, which a continued response does not inherit)."""
    chat, conversation, origins = responses_translation(body, previous_messages)
    try:
        call = cli_call_for(chat, config)
    except ApiError as exc:
        raise responses_error(exc, origins)
    return call, conversation


def responses_output_messages(output: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """A response's output items -> the chat messages a continuation replays (the same items a
    client could send back as input)."""
    return chat_messages_from_items(output, where="output")[0]


def custom_input_of(arguments: str) -> str:
    """A custom tool call's free-form input, from the arguments of the function that stands for it."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return arguments
    return value["input"] if isinstance(value, dict) and isinstance(value.get("input"), str) else arguments


def response_error_code(error: ApiError) -> str:
    """An ApiError -> the `error.code` a failed response may carry (the spec allows a fixed list)."""
    if error.code in RESPONSE_ERROR_CODES:
        return error.code
    return "rate_limit_exceeded" if error.status == 429 else "server_error"


def responses_usage(usage: Dict[str, Any]) -> Dict[str, Any]:
    """Chat usage -> Responses usage (cache writes are counted in the input, not apart, for now)."""
    details = usage.get("prompt_tokens_details") or {}
    return {"input_tokens": usage.get("prompt_tokens", 0),
            "input_tokens_details": {"cached_tokens": details.get("cached_tokens", 0),
                                     "cache_write_tokens": details.get("cache_write_tokens", 0)},
            "output_tokens": usage.get("completion_tokens", 0),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.get("total_tokens", 0)}


class ResponsesRenderer:
    """How a turn looks in the Responses API: a `response` object, or its typed SSE events.

    One state machine serves both, so the streamed events and the whole object always agree. A
    finished response goes to `keep` (previous_response_id's store) before it is sent, so a client
    may continue it the moment it has it."""

    def __init__(self, call: CliCall, body: Dict[str, Any],
                 keep: Optional[Callable[[Dict[str, Any]], Any]] = None):
        self.call, self.keep = call, keep
        self.response_id = "resp_" + uuid.uuid4().hex
        self.created_at = int(time.time())
        self.model = call.requested_model
        self.sequence = 0
        self.output = []        # output items, in order
        self.open = None        # the item still receiving deltas
        self.calls = {}         # TurnEvent tool call number -> its function_call item
        self.indexes = {}       # item id -> its output_index
        self.started = False
        self.response = None    # type: Optional[Dict[str, Any]]
        self.settings = self._settings_of(body)
        self.namespaced = namespaced_tools_of(body.get("tools"))
        self.custom = custom_tools_of(body.get("tools"))
        self.custom_arguments = {}  # custom_tool_call item id -> the function arguments so far
        # Codex waits for a reasoning item when it asked for one: an empty one if no thinking came.
        self.reasoning_due = reasoning_requested(body)

    # -- the interface the HTTP layer uses (same as ChatRenderer) ---------------------------------

    def whole(self, events: List[TurnEvent], model: str) -> Dict[str, Any]:
        for event in events:
            self.stream_events(event, model)
        if self.response is None:
            self.stream_events(Finish("stop", usage_from({})), model)
        return self.response

    def stream_events(self, event: TurnEvent, model: str) -> List[Tuple[Optional[str], Any]]:
        self.model = model
        out = []
        if not self.started:
            self.started = True
            out += [self._event("response.created", response=self._snapshot("in_progress")),
                    self._event("response.in_progress", response=self._snapshot("in_progress"))]
        kind = event[0]
        if kind == "reasoning":
            self.reasoning_due = False
        elif self.reasoning_due:
            self.reasoning_due = False
            out += self._close() + self._empty_reasoning()
        if kind in ("text", "reasoning"):
            item_type = "message" if kind == "text" else "reasoning"
            if self.open is None or self.open["type"] != item_type:
                out += self._close() + self._add(item_type)
            part = self.open["content"][0]
            part["text"] += event[1]
            out.append(self._event("response.%s.delta" % part["type"], **dict(
                self._where(self.open), content_index=0, delta=event[1],
                **({"logprobs": []} if kind == "text" else {}))))
        elif kind == "tool_call":
            out += self._close()
            item = {"id": "fc_" + uuid.uuid4().hex, "type": "function_call", "status": "in_progress",
                    "call_id": client_tool_id(event[2]), "name": event[3], "arguments": ""}
            if event[3] in self.namespaced:
                item["namespace"], item["name"] = self.namespaced[event[3]]
            if event[3] in self.custom:
                item = {"id": "ctc_" + uuid.uuid4().hex, "type": "custom_tool_call", "status": "in_progress",
                        "call_id": client_tool_id(event[2]), "name": event[3], "input": ""}
                self.custom_arguments[item["id"]] = ""
            self.calls[event[1]] = item
            out += self._open(item)
        elif kind == "tool_args" and event[1] in self.calls and self.calls[event[1]]["type"] == "custom_tool_call":
            self.custom_arguments[self.calls[event[1]]["id"]] += event[2]  # its input is known when whole
        elif kind == "tool_args" and event[1] in self.calls:
            item = self.calls[event[1]]
            item["arguments"] += event[2]
            out.append(self._event("response.function_call_arguments.delta", delta=event[2],
                                   **self._where(item)))
        elif kind == "finish":
            out += self._close()
            status, details = "completed", None
            if event[1] in ("length", "content_filter"):
                status = "incomplete"
                details = {"reason": "max_output_tokens" if event[1] == "length" else "content_filter"}
            self.response = self._snapshot(status, responses_usage(event[2]), incomplete_details=details)
            if self.keep is not None:
                self.keep(self.response)
            out.append(self._event("response." + status, response=self.response))
        return out

    def stream_error(self, error: ApiError) -> List[Tuple[Optional[str], Any]]:
        self.response = self._snapshot("failed", error={
            "code": response_error_code(error), "message": error.message})
        return [self._event("response.failed", response=self.response)]

    def stream_end(self) -> List[Tuple[Optional[str], Any]]:
        return []  # the Responses stream has no [DONE]: response.completed (or failed) is the end

    # -- output items ----------------------------------------------------------------------------

    def _add(self, item_type: str) -> List[Tuple[Optional[str], Any]]:
        if item_type == "message":
            item = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "status": "in_progress",
                    "role": "assistant", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"id": "rs_" + uuid.uuid4().hex, "type": "reasoning", "status": "in_progress",
                    "summary": [], "content": []}
            part = {"type": "reasoning_text", "text": ""}
        out = self._open(item)
        item["content"].append(part)
        if item_type == "message":
            out.append(self._event("response.content_part.added", content_index=0, part=dict(part, text=""),
                                   **self._where(item)))
        return out

    def _empty_reasoning(self) -> List[Tuple[Optional[str], Any]]:
        """A reasoning item with an empty summary, for a client that asked for one and got no thinking."""
        item = {"id": "rs_" + uuid.uuid4().hex, "type": "reasoning", "status": "in_progress",
                "summary": [], "content": []}
        out = self._open(item)
        self.open = None
        item["status"] = "completed"
        out.append(self._event("response.output_item.done", output_index=self.indexes[item["id"]],
                               item=json.loads(json.dumps(item))))
        return out

    def _open(self, item: Dict[str, Any]) -> List[Tuple[Optional[str], Any]]:
        self.indexes[item["id"]] = len(self.output)
        self.output.append(item)
        self.open = item
        return [self._event("response.output_item.added", output_index=len(self.output) - 1,
                            item=json.loads(json.dumps(item)))]

    def _close(self) -> List[Tuple[Optional[str], Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        out = []
        where = self._where(item)
        if item["type"] == "function_call":
            out.append(self._event("response.function_call_arguments.done", name=item["name"],
                                   arguments=item["arguments"], **where))
        elif item["type"] == "custom_tool_call":
            item["input"] = custom_input_of(self.custom_arguments[item["id"]])
            out += [self._event("response.custom_tool_call_input.delta", delta=item["input"], **where),
                    self._event("response.custom_tool_call_input.done", input=item["input"], **where)]
        else:
            part = item["content"][0]
            extra = {"logprobs": []} if part["type"] == "output_text" else {}
            out.append(self._event("response.%s.done" % part["type"], content_index=0,
                                   text=part["text"], **dict(where, **extra)))
            if item["type"] == "message":
                out.append(self._event("response.content_part.done", content_index=0,
                                       part=dict(part), **where))
        item["status"] = "completed"
        out.append(self._event("response.output_item.done", output_index=where["output_index"],
                               item=json.loads(json.dumps(item))))
        return out

    def _where(self, item: Dict[str, Any]) -> Dict[str, Any]:
        return {"item_id": item["id"], "output_index": self.indexes[item["id"]]}

    def _event(self, event_type: str, **fields: Any) -> Tuple[str, Dict[str, Any]]:
        payload = dict({"type": event_type, "sequence_number": self.sequence}, **fields)
        self.sequence += 1
        return event_type, payload

    # -- the response object ---------------------------------------------------------------------

    def _snapshot(self, status: str, usage: Optional[Dict[str, Any]] = None,
                  error: Optional[Dict[str, Any]] = None,
                  incomplete_details: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        output = json.loads(json.dumps(self.output))
        text = "".join(part["text"] for item in output if item["type"] == "message"
                       for part in item["content"] if part["type"] == "output_text")
        response = {"id": self.response_id, "object": "response", "created_at": self.created_at,
                    "status": status, "error": error, "incomplete_details": incomplete_details,
                    "model": self.model, "output": output, "output_text": text}
        if usage is not None:  # the spec's `usage` is an object, never null: absent until known
            response["usage"] = usage
        response.update(self.settings)
        return response

    def _settings_of(self, body: Dict[str, Any]) -> Dict[str, Any]:
        """The request settings a response echoes, made safe to encode (ignored fields such as
        `user` and `metadata` are not checked for lone surrogates)."""
        text_config = body.get("text") if isinstance(body.get("text"), dict) else {}
        reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
        settings = {
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "parallel_tool_calls": self.call.parallel_tool_calls,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")
                          if reasoning.get("summary") in REASONING_SUMMARIES else None},
            "store": body.get("store") is not False,
            "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
            "text": dict(text_config, format=text_config.get("format") or {"type": "text"}),
            "tool_choice": body.get("tool_choice") or "auto", "tools": offered_tools_of(body.get("tools")),
            "truncation": "disabled", "metadata": body.get("metadata") or {},
        }
        if isinstance(body.get("user"), str):  # an optional string in the spec: absent, not null
            settings["user"] = body["user"]
        return json.loads(json.dumps(settings, ensure_ascii=False).encode("utf-8", "replace"))


def previous_messages_for(body: Any, store: "ResponseStore") -> List[Dict[str, Any]]:
    """The stored conversation a request continues (empty without previous_response_id)."""
    previous = body.get("previous_response_id") if isinstance(body, dict) else None
    if previous is None:
        return []
    if not isinstance(previous, str):
        raise invalid("previous_response_id", "`previous_response_id` must be a string", "invalid_type")
    check_encodable(previous, "previous_response_id")
    found = store.get(previous)
    if found is None:
        raise ApiError(404, "Previous response with id '%s' not found (responses are kept in memory "
                       "for %d s, the latest %d; `store: false` ones not at all)"
                       % (previous, store.ttl, store.max_items), "invalid_request_error",
                       "previous_response_not_found", "previous_response_id")
    return found[1]


def items_with_references_resolved(items: List[Any], lookup: Callable[[str], Optional[Dict[str, Any]]]
                                   ) -> List[Any]:
    """Responses input with each `item_reference` replaced by the stored item it names (the Vercel
    AI SDK sends its earlier output back this way); an unknown id is a 404 naming the item."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("type") == "item_reference":
            param = "input[%d].id" % i
            item_id = item.get("id")
            if not isinstance(item_id, str) or not item_id:
                raise invalid(param, "`%s` must be a non-empty string" % param, "invalid_type")
            item = lookup(item_id)
            if item is None:
                raise ApiError(404, "Item with id '%s' not found (items are kept with their response, "
                               "in memory, while it can be continued; `store: false` ones not at all)"
                               % item_id, "invalid_request_error", "item_not_found", param)
        out.append(item)
    return out


ITEM_ID_PREFIXES = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_",
                    "custom_tool_call": "ctc_", "custom_tool_call_output": "ctco_", "reasoning": "rs_"}


def input_item_resources(items: Any) -> List[Dict[str, Any]]:
    """A request's (validated) input as `GET /v1/responses/{id}/input_items` lists it: each item
    typed, with an id and its content as parts."""
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    out = []
    for item in items:
        kind = item.get("type", "message")
        resource = dict(item, type=kind)
        resource.setdefault("id", ITEM_ID_PREFIXES.get(kind, "item_") + uuid.uuid4().hex)
        if kind == "message":
            assistant = item.get("role") == "assistant"
            content = item.get("content")
            if isinstance(content, str):
                content = [{"type": "output_text" if assistant else "input_text", "text": content}]
            if assistant:
                content = [dict({"annotations": [], "logprobs": []}, **part) if part.get("type") == "output_text"
                           else part for part in content]
            resource["content"] = content
        if kind in ("message", "function_call", "function_call_output", "custom_tool_call",
                    "custom_tool_call_output"):
            resource.setdefault("status", "completed")
        out.append(resource)
    return out


def input_items_page(items: List[Dict[str, Any]], query: Dict[str, str]) -> Dict[str, Any]:
    """One page of a stored response's input items, as OpenAI lists them (newest first by default)."""
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("order", "`order` must be asc or desc")
    limit = query.get("limit", "20")
    if not re.match(r"^[0-9]{1,3}$", limit) or not 1 <= int(limit) <= 100:
        raise invalid("limit", "`limit` must be an integer from 1 to 100")
    ordered = list(items) if order == "asc" else list(reversed(items))
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise invalid("after", "`after` names no input item of this response: %r" % after)
        ordered = ordered[ids.index(after) + 1:]
    page = ordered[:int(limit)]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > len(page)}


# ================================================================================================
# Anthropic Messages API (pure): /v1/messages requests -> CliCall, turns -> message objects/events
# ================================================================================================

# How each Messages API parameter is treated: (support, note). Anything else is a 400, as
# Anthropic answers; the README's table is generated from this one.
MESSAGES_PARAMETERS = collections.OrderedDict([
    ("model", ("honored", "required; the model table above, or any full `claude-…` ID")),
    ("messages", ("honored", "text, base64 images, `tool_use` and `tool_result` blocks as real turns; "
                             "thinking blocks sent back are dropped, as the API drops earlier turns' "
                             "thinking; `system` messages join the system prompt; `cache_control` is "
                             "accepted (the CLI caches on its own)")),
    ("max_tokens", ("honored", "required; -> `CLAUDE_CODE_MAX_OUTPUT_TOKENS`")),
    ("system", ("honored", "a string or text blocks -> the system prompt (blocks joined by a blank line)")),
    ("stop_sequences", ("emulated", "the stream is cut at the first one and the CLI ended; "
                                    "`stop_reason: stop_sequence`")),
    ("stream", ("honored", "Anthropic's SSE events as the CLI streams tokens")),
    ("tools", ("honored", "custom tools, offered to the model with their input schemas; server tools "
                          "(web search, bash, text editor, computer use...) -> 400")),
    ("tool_choice", ("emulated", "`auto` honored; `none` hides the tools; `any` and `tool` become an "
                                 "instruction in the system prompt; `disable_parallel_tool_use` returns "
                                 "only the first call and ends the CLI")),
    ("thinking", ("emulated", "`enabled` or `adaptive` returns the thinking blocks the model writes "
                              "(none with `display: omitted`); `budget_tokens` is checked, the CLI sets "
                              "its own budget")),
    ("output_config", ("honored", "`effort` -> `--effort`; `format` (`json_schema`) -> `--json-schema`, "
                                  "the JSON is the answer's text")),
    ("cache_control", ("ignored", "accepted; the CLI caches prompts on its own")),
    ("context_management", ("ignored", "accepted; the CLI manages its own context")),
    ("metadata", ("ignored", "accepted (`user_id`)")),
    ("temperature", ("ignored", "accepted (0-1), the CLI has no sampling controls")),
    ("top_p", ("ignored", "accepted (0-1)")),
    ("top_k", ("ignored", "accepted")),
    ("service_tier", ("ignored", "accepted")),
    ("speed", ("ignored", "accepted")),
    ("diagnostics", ("ignored", "accepted")),
    ("inference_geo", ("rejected", "-> 400: the CLI cannot choose where inference runs")),
    ("mcp_servers", ("rejected", "-> 400: the proxy offers no remote MCP connector")),
    ("container", ("rejected", "-> 400: there is no code-execution container")),
])
# The Messages API's error type for each HTTP status (other 4xx: invalid_request_error, 5xx: api_error).
MESSAGES_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# A turn's OpenAI finish reason -> the Messages API's stop_reason (a stop string: stop_sequence).
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "content_filter": "refusal"}
TOOL_USE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# A started stream that has sent nothing for this long gets a `ping`, so idle timeouts between
# the client and the proxy do not cut it while the model thinks or waits.
KEEP_ALIVE_SECONDS = 5.0


def messages_readme_table() -> str:
    """The README's Messages API parameter table, generated so it cannot drift from the code."""
    lines = ["| parameter | support | how |", "|---|---|---|"]
    lines += ["| `%s` | %s | %s |" % (name, support, note) for name, (support, note) in MESSAGES_PARAMETERS.items()]
    return "\n".join(lines)


def messages_error_of(error: ApiError) -> Tuple[int, Dict[str, Any]]:
    """An ApiError as the Messages API says it: (HTTP status, error envelope); headers stay as they are."""
    status = 529 if error.code == "overloaded" else error.status
    kind = MESSAGES_ERRORS.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return status, {"type": "error", "error": {"type": kind, "message": error.message}}


def messages_call_for(body: Any, config: Config,
                      remote_images: bool = False) -> CliCall:
    """Validate a Messages API body and decide the CLI turn that answers it.

    With `remote_images` an image URL becomes a `url` image block, fetched once the request
    validates (--allow-image-fetch); without it URLs are refused."""
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object", "invalid_type")
    for name in body:
        if name not in MESSAGES_PARAMETERS:
            raise invalid(name, "%s: Extra inputs are not permitted" % name, "unknown_parameter")
        if MESSAGES_PARAMETERS[name][0] == "rejected":
            raise invalid(name, "`%s` is not supported: %s" % (name, MESSAGES_PARAMETERS[name][1].split(": ", 1)[-1]),
                          "unsupported_parameter")
    for name in ("model", "messages", "max_tokens"):
        if name not in body:
            raise invalid(name, "%s: Field required" % name, "missing_required_parameter")
    requested, model = resolve_model(body["model"], config.default_model)
    max_tokens = body["max_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise invalid("max_tokens", "`max_tokens` must be a positive integer")
    check_messages_parameters(body)
    tools = messages_tools_of(body.get("tools"))
    choice, chosen, parallel = messages_tool_choice_of(body.get("tool_choice"), tools)
    system_parts, turns = messages_turns_of(body["messages"], config.max_messages, tools, remote_images)
    if not turns or turns[-1]["role"] != "user":
        raise invalid("messages", "the last message must be a non-empty user message (the CLI cannot "
                      "continue a prefilled assistant turn)")
    system_prompt = "\n\n".join(p for p in [messages_system_of(body.get("system"))] + system_parts if p)
    system_prompt, tools = tool_choice_applied(choice, chosen, tools, turns, system_prompt or NEUTRAL_SYSTEM_PROMPT)
    effort, schema = output_config_of(body.get("output_config"))
    return CliCall(
        model=model, requested_model=requested, system_prompt=system_prompt,
        history=turns[:-1], prompt=turns[-1]["content"], stream=bool(body.get("stream")),
        max_output_tokens=max_tokens, stop=stop_sequences_of(body.get("stop_sequences")),
        tools=tools, parallel_tool_calls=parallel, json_schema=schema, effort=effort,
        include_reasoning=thinking_wanted(body.get("thinking"), max_tokens))


def check_messages_parameters(body: Dict[str, Any]) -> None:
    """Type- and range-check the parameters that are accepted and ignored."""
    for name, low, high in (("temperature", 0, 1), ("top_p", 0, 1), ("top_k", 0, None)):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value < low or (high is not None and value > high)):
            raise invalid(name, "`%s` must be a number from %s%s" % (
                name, low, " to %s" % high if high is not None else ""))
    for name, kind in (("stream", bool), ("metadata", dict), ("service_tier", str), ("speed", str),
                       ("cache_control", dict), ("diagnostics", dict), ("context_management", dict)):
        if body.get(name) is not None and not isinstance(body[name], kind):
            raise invalid(name, "`%s` has the wrong type" % name, "invalid_type")


def output_config_of(config: Any) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """`output_config` -> (the CLI's --effort, the JSON schema the answer must follow)."""
    if config is None:
        return None, None
    if not isinstance(config, dict):
        raise invalid("output_config", "`output_config` must be an object", "invalid_type")
    effort, fmt = config.get("effort"), config.get("format")
    if effort is not None and (not isinstance(effort, str) or effort not in EFFORTS):
        raise invalid("output_config.effort", "`output_config.effort` must be one of low, medium, high, xhigh, max")
    if fmt is None:
        return effort and EFFORTS[effort], None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise invalid("output_config.format", "`output_config.format` must be {type: json_schema, schema: {...}}")
    if len(json.dumps(fmt["schema"])) > 100000:
        raise invalid("output_config.format.schema", "the schema is over 100 KB")
    return effort and EFFORTS[effort], fmt["schema"]


def stop_sequences_of(value: Any) -> Tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise invalid("stop_sequences", "`stop_sequences` must be an array of non-empty strings")
    for i, text in enumerate(value):
        check_encodable(text, "stop_sequences[%d]" % i)
    return tuple(value)


def thinking_wanted(thinking: Any, max_tokens: int) -> bool:
    """Whether the answer carries thinking blocks; the budget is checked as Anthropic checks it."""
    if thinking is None:
        return False
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled", "adaptive"):
        raise invalid("thinking", "`thinking.type` must be enabled, disabled or adaptive")
    if thinking["type"] == "enabled":
        budget = thinking.get("budget_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1024:
            raise invalid("thinking.budget_tokens", "`thinking.budget_tokens` must be an integer of at least 1024")
        if budget >= max_tokens:
            raise invalid("max_tokens", "`max_tokens` must be greater than `thinking.budget_tokens`")
    return thinking["type"] != "disabled" and thinking.get("display") != "omitted"


def messages_system_of(system: Any) -> str:
    if system is None:
        return ""
    if isinstance(system, list) and any(isinstance(b, dict) and b.get("type") != "text" for b in system):
        raise invalid("system", "`system` blocks must be of type `text`", "invalid_type")
    return "\n\n".join(b["text"] for b in text_blocks_of(system, "system"))


def messages_tools_of(raw: Any) -> Tuple[ClientTool, ...]:
    """Custom `tools` -> ClientTools; server tools (those with a versioned `type`) are refused."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise invalid("tools", "`tools` must be an array", "invalid_type")
    specs = []
    for i, tool in enumerate(raw):
        where = "tools[%d]" % i
        if not isinstance(tool, dict):
            raise invalid(where, "`%s` must be an object" % where, "invalid_type")
        if tool.get("type") not in (None, "custom"):
            raise invalid(where + ".type", "tools of type %r are not supported: only custom tools (name, "
                          "description, input_schema); the proxy runs no server tools" % (tool["type"],),
                          "unsupported_tool")
        if "input_schema" not in tool:
            raise invalid(where + ".input_schema", "%s.input_schema: Field required" % where,
                          "missing_required_parameter")
        specs.append((where + ".", "input_schema", tool.get("name"), tool.get("description"),
                      tool["input_schema"]))
    return client_tools_from(specs, "tool")


def messages_tool_choice_of(choice: Any, tools: Tuple[ClientTool, ...]) -> Tuple[str, Optional[str], bool]:
    """`tool_choice` -> (auto|none|required|named, the named tool, whether parallel calls are allowed)."""
    if choice is None:
        return "auto", None, True
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise invalid("tool_choice", "`tool_choice.type` must be auto, any, tool or none")
    disable = choice.get("disable_parallel_tool_use", False)
    if not isinstance(disable, bool):
        raise invalid("tool_choice.disable_parallel_tool_use", "`disable_parallel_tool_use` must be a boolean",
                      "invalid_type")
    kind, chosen = choice["type"], None
    if kind in ("any", "tool") and not tools:
        raise invalid("tool_choice", "`tool_choice: %s` needs `tools`" % kind)
    if kind == "tool":
        chosen = choice.get("name")
        if not any(t.name == chosen for t in tools):
            raise invalid("tool_choice.name", "`tool_choice.name` is not a tool in `tools`: %r" % (chosen,))
    return {"any": "required", "tool": "named"}.get(kind, kind), chosen, not disable


def messages_turns_of(messages: Any, max_messages: int, tools: Tuple[ClientTool, ...],
                      remote_images: bool
                      ) -> Tuple[List[str], List[Dict[str, Any]]]:
    """Messages API messages -> (texts of `system` messages, alternating turns of content blocks).

    The CLI has one system prompt: a system message anywhere in the conversation joins it."""
    if not isinstance(messages, list):
        raise invalid("messages", "`messages` must be an array", "invalid_type")
    if len(messages) > max_messages:
        raise invalid("messages", "too many messages (%d > %d)" % (len(messages), max_messages))
    names = {t.name: t.mcp_name for t in tools}
    system_parts, role_blocks = [], []
    for i, message in enumerate(messages):
        where = "messages[%d]" % i
        if not isinstance(message, dict):
            raise invalid(where, "`%s` must be an object" % where, "invalid_type")
        role = message.get("role")
        if role not in ("user", "assistant", "system"):
            raise invalid(where + ".role", "`role` must be user, assistant or system", "invalid_value")
        blocks = message_blocks_of(message.get("content"), role, where + ".content", names, remote_images)
        if role == "system":
            system_parts += [b["text"] for b in blocks]
        else:
            role_blocks.append((role, blocks))
    return system_parts, alternating_turns(role_blocks)


def message_blocks_of(content: Any, role: str, where: str, names: Dict[str, str],
                      remote_images: bool) -> List[Dict[str, Any]]:
    """One message's content -> content blocks for the CLI (thinking blocks dropped)."""
    if not isinstance(content, list):
        return text_blocks_of(content, where)  # a string, or the error for anything else
    allowed = {"user": ("text", "image", "tool_result"),
               "assistant": ("text", "tool_use", "thinking", "redacted_thinking"), "system": ("text",)}[role]
    blocks = []
    for i, block in enumerate(content):
        at = "%s[%d]" % (where, i)
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in allowed:
            raise invalid(at + ".type", "%s content blocks of type %r are not supported (%s)"
                          % (role, kind, ", ".join(allowed)), "unsupported_content")
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise invalid(at + ".text", "`%s.text` must be a string" % at, "invalid_type")
            blocks += text_blocks_of(block["text"], at + ".text")
        elif kind == "image":
            blocks.append(messages_image_of(block, at, remote_images))
        elif kind == "tool_result":
            if not isinstance(block.get("tool_use_id"), str) or not TOOL_USE_ID.match(block["tool_use_id"]):
                raise invalid(at + ".tool_use_id", "`tool_use_id` must match ^[A-Za-z0-9_-]{1,128}$")
            if not isinstance(block.get("is_error", False), bool):
                raise invalid(at + ".is_error", "`is_error` must be a boolean", "invalid_type")
            blocks.append(tool_result_of(block["tool_use_id"], block.get("content"), at, block.get("is_error", False)))
        elif kind == "tool_use":
            if not isinstance(block.get("input"), dict):
                raise invalid(at + ".input", "`input` must be an object", "invalid_type")
            call = {"id": block.get("id"), "function": {"name": block.get("name"),
                                                         "arguments": json.dumps(block["input"])}}
            blocks.append(tool_use_of(call, at, names, at + "."))
    return blocks


def messages_image_of(block: Dict[str, Any], where: str,
                      remote_images: bool) -> Dict[str, Any]:
    """An image block (base64 or URL source) -> a checked base64 image block, as the chat path checks it."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if media_type not in IMAGE_TYPES:
            raise invalid(where + ".source.media_type", "image type %r is not supported (%s)"
                          % (media_type, ", ".join(IMAGE_TYPES)), "unsupported_image_type")
        if not isinstance(data, str):
            raise invalid(where + ".source.data", "`source.data` must be a base64 string", "invalid_type")
        url = "data:%s;base64,%s" % (media_type, data)
    elif kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not re.match(r"^https?://", url, re.I):
            raise invalid(where + ".source.url", "`source.url` must be an http(s) URL", "invalid_image_url")
        if not remote_images:
            raise invalid(where + ".source.url", "image URLs are not fetched (the proxy does not go to the "
                          "internet on a prompt's behalf unless started with --allow-image-fetch): send "
                          "the image as a base64 source", "unsupported_image_url")
        return {"type": "image", "source": {"type": "url", "url": url}}
    else:
        raise invalid(where + ".source", "`source` must be a base64 or url image source", "invalid_type")
    try:
        return image_block_of({"image_url": {"url": url}}, where)
    except ApiError as exc:
        raise invalid(where + ".source", exc.message, exc.code)


class MessagesRenderer:
    """How a turn looks in the Messages API: a `message` object, or Anthropic's SSE events.

    One state machine serves both, so streamed events and the whole message agree. It owns the
    turn's TurnTranslator, whose usage and stop string the events do not carry."""

    def __init__(self, call: CliCall):
        self.call = call
        self.translator = TurnTranslator(call=call)
        self.message_id = "msg_" + uuid.uuid4().hex
        self.content = []       # content blocks so far; a tool_use's input is kept as JSON text
        self.open = None        # type: Optional[str]  # the type of the block still receiving deltas
        self.tool_blocks = {}   # TurnEvent tool call number -> its block index
        self.started = False
        self.message = None     # type: Optional[Dict[str, Any]]

    # -- the interface the HTTP layer uses (same as ChatRenderer) ---------------------------------

    def whole(self, events: List[TurnEvent], model: str) -> Dict[str, Any]:
        for event in events:
            self.stream_events(event, model)
        if self.message is None:
            self.stream_events(Finish("stop", usage_from({})), model)
        return self.message

    def stream_events(self, event: TurnEvent, model: str) -> List[Tuple[Optional[str], Any]]:
        out = []
        if not self.started:
            self.started = True
            out += [("message_start", {"type": "message_start", "message": self._message(model, [], None, None)})]
            out += self.keep_alive()  # Anthropic's API pings once right after message_start too
        kind = event[0]
        if kind in ("text", "reasoning"):
            block_type, field = ("text", "text") if kind == "text" else ("thinking", "thinking")
            if self.open != block_type:
                out += self._close() + self._start(
                    {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": "", "signature": ""})
            self.content[-1][field] += event[1]
            out.append(self._delta({"type": block_type + "_delta", field: event[1]}))
        elif kind == "signature" and self.open == "thinking":
            self.content[-1]["signature"] += event[1]
            out.append(self._delta({"type": "signature_delta", "signature": event[1]}))
        elif kind == "tool_call":
            out += self._close() + self._start({"type": "tool_use", "id": event[2], "name": event[3], "input": ""})
            self.tool_blocks[event[1]] = len(self.content) - 1
        elif kind == "tool_args" and event[1] in self.tool_blocks:
            index = self.tool_blocks[event[1]]
            self.content[index]["input"] += event[2]
            out.append(self._delta({"type": "input_json_delta", "partial_json": event[2]}, index))
        elif kind == "finish":
            out += self._close()
            stop_sequence = self.translator.stop_sequence
            stop_reason = "stop_sequence" if stop_sequence is not None else STOP_REASONS.get(event[1], "end_turn")
            self.message = self._message(model, self._final_content(), stop_reason, stop_sequence)
            out += [("message_delta", {"type": "message_delta", "usage": self._usage(),
                                       "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence}}),
                    ("message_stop", {"type": "message_stop"})]
        return out

    def stream_error(self, error: ApiError) -> List[Tuple[Optional[str], Any]]:
        return [("error", messages_error_of(error)[1])]

    def stream_end(self) -> List[Tuple[Optional[str], Any]]:
        return []  # message_stop (or an error event) is the end

    def keep_alive(self) -> List[Tuple[Optional[str], Any]]:
        return [("ping", {"type": "ping"})]

    # -- content blocks ----------------------------------------------------------------------------

    def _start(self, block: Dict[str, Any]) -> List[Tuple[Optional[str], Any]]:
        self.content.append(block)
        self.open = block["type"]
        shown = dict(block, input={}) if block["type"] == "tool_use" else dict(block)
        return [("content_block_start", {"type": "content_block_start", "index": len(self.content) - 1,
                                         "content_block": shown})]

    def _delta(self, delta: Dict[str, Any], index: Optional[int] = None) -> Tuple[Optional[str], Any]:
        index = len(self.content) - 1 if index is None else index
        return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}

    def _close(self) -> List[Tuple[Optional[str], Any]]:
        if self.open is None:
            return []
        self.open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": len(self.content) - 1})]

    def _final_content(self) -> List[Dict[str, Any]]:
        content = []
        for block in self.content:
            if block["type"] == "tool_use":
                try:
                    block = dict(block, input=json.loads(block["input"] or "{}"))
                except ValueError:
                    block = dict(block, input={})
            content.append(block)
        return content

    # -- the message object --------------------------------------------------------------------

    def _usage(self) -> Dict[str, int]:
        usage = self.translator.usage
        return {name: int(usage.get(name) or 0) for name in (
            "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")}

    def _message(self, model: str, content: List[Dict[str, Any]], stop_reason: Optional[str],
                 stop_sequence: Optional[str]) -> Dict[str, Any]:
        return {"id": self.message_id, "type": "message", "role": "assistant", "model": model,
                "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": self._usage()}


# ================================================================================================
# HTTP layer: the server's state (stored responses, limits, metrics) and what each route answers,
# image fetching, and the handler (routing, guards, body limits, SSE, access log)
# ================================================================================================

# A response's conversation is kept this long, for this many responses and bytes, so a client can
# continue it with `previous_response_id`; older ones are forgotten (a later reference is a 404).
RESPONSE_STORE_ITEMS = 200
RESPONSE_STORE_TTL = 3600.0
RESPONSE_STORE_BYTES = 64 * 1024 * 1024


class ResponseStore:
    """Recent responses and their conversations (chat messages), for previous_response_id.

    Bounded by count and bytes, each entry expiring `ttl` seconds after it was stored; in memory
    only, so a restart forgets them all."""

    def __init__(self, max_items: int = RESPONSE_STORE_ITEMS, ttl: float = RESPONSE_STORE_TTL,
                 max_bytes: int = RESPONSE_STORE_BYTES, clock: Callable[[], float] = time.monotonic):
        self.max_items, self.ttl, self.max_bytes, self.clock = max_items, ttl, max_bytes, clock
        self.lock = threading.Lock()
        self.entries = collections.OrderedDict()  # id -> (response, messages, size, expiry, inputs)
        self.size = 0

    def put(self, response: Dict[str, Any], messages: List[Dict[str, Any]],
            inputs: Optional[List[Dict[str, Any]]] = None) -> bool:
        """Keep a response (and its input items); False when it alone is over the byte bound."""
        inputs = inputs or []
        try:
            size = len(json.dumps(response)) + len(json.dumps(messages)) + len(json.dumps(inputs))
        except (ValueError, RecursionError):
            return False
        with self.lock:
            self._drop(response["id"])
            if size > self.max_bytes or self.max_items <= 0:
                return False
            self.entries[response["id"]] = (response, messages, size, self.clock() + self.ttl, inputs)
            self.size += size
            while len(self.entries) > self.max_items or self.size > self.max_bytes:
                self._drop(next(iter(self.entries)))
            return True

    def get(self, response_id: str) -> Optional[Tuple[Dict[str, Any], List[Dict[str, Any]]]]:
        """(response, conversation messages), or None if unknown, not stored or expired."""
        with self.lock:
            self._expire()
            entry = self.entries.get(response_id)
            return (entry[0], entry[1]) if entry else None

    def entry(self, response_id: str) -> Optional[Tuple[Dict[str, Any], List[Dict[str, Any]],
                                                       List[Dict[str, Any]]]]:
        """(response, conversation messages, input items), or None."""
        with self.lock:
            self._expire()
            entry = self.entries.get(response_id)
            return (entry[0], entry[1], entry[4]) if entry else None

    def item(self, item_id: str) -> Optional[Dict[str, Any]]:
        """A stored output or input item by its id (what an `item_reference` names), or None."""
        with self.lock:
            self._expire()
            for entry in reversed(self.entries.values()):
                for item in entry[0].get("output", []) + entry[4]:
                    if item.get("id") == item_id:
                        return item
            return None

    def delete(self, response_id: str) -> None:
        with self.lock:
            self._drop(response_id)

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, entry in self.entries.items() if entry[3] <= now]:
            self._drop(key)

    def _drop(self, response_id: str) -> None:
        entry = self.entries.pop(response_id, None)
        if entry is not None:
            self.size -= entry[2]

    def __len__(self) -> int:
        with self.lock:
            self._expire()
            return len(self.entries)


class Limits:
    """The latest limit state the CLI reported, shared by every request. It is kept from what
    answers already bring; no model call is ever made to refresh it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.state = None  # type: Optional[Dict[str, Any]]

    def record(self, info: Any, now: float) -> None:
        state = limit_state_from(info, now)
        if state is not None:
            with self.lock:
                self.state = state

    def current(self, now: float) -> Optional[Dict[str, Any]]:
        """The state, or None when nothing is known or its window has reset since."""
        with self.lock:
            state = self.state
        return state if state is not None and now < state["resets_at"] else None


# GET /metrics: every metric with its type and help (Prometheus text format 0.0.4).
METRICS = collections.OrderedDict([
    ("claude_max_proxy_requests_total", ("counter", "HTTP requests answered, by endpoint and status")),
    ("claude_max_proxy_request_duration_seconds", ("histogram", "Seconds from request to the end of the answer")),
    ("claude_max_proxy_time_to_first_token_seconds", ("histogram", "Seconds from request to the first streamed token")),
    ("claude_max_proxy_cli_processes", ("gauge", "CLI processes by state: busy (answering), warm, parked")),
    ("claude_max_proxy_requests_waiting", ("gauge", "Requests waiting for a free slot")),
    ("claude_max_proxy_process_reuse_total", ("counter", "Turns served by a waiting CLI process (hit) or a new one (miss)")),
    ("claude_max_proxy_upstream_calls_total", ("counter", "Model calls the CLI reported (one per CLI result), by upstream status")),
    ("claude_max_proxy_ratelimit_status", ("gauge", "1 for the latest reported limit status and window")),
    ("claude_max_proxy_ratelimit_utilization", ("gauge", "Fraction of each limit window used")),
    ("claude_max_proxy_ratelimit_reset_timestamp_seconds", ("gauge", "When each limit window resets (Unix time)")),
    ("claude_max_proxy_overage_in_use", ("gauge", "1 while extra usage (overage) pays for requests")),
])
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
Labels = Tuple[Tuple[str, str], ...]


class Metrics:
    """Counters and histograms since start-up, for GET /metrics."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counters = collections.Counter()  # type: Dict[Tuple[str, Labels], float]
        self.histograms = {}  # type: Dict[Tuple[str, Labels], List[float]]  # bucket counts, sum

    def count(self, name: str, labels: Dict[str, str]) -> None:
        with self.lock:
            self.counters[(name, tuple(sorted(labels.items())))] += 1

    def observe(self, name: str, labels: Dict[str, str], value: float) -> None:
        with self.lock:
            counts = self.histograms.setdefault((name, tuple(sorted(labels.items()))),
                                                [0.0] * (len(LATENCY_BUCKETS) + 2))
            counts[next((i for i, bound in enumerate(LATENCY_BUCKETS) if value <= bound), len(LATENCY_BUCKETS))] += 1
            counts[-1] += value

    def samples(self) -> Dict[str, List[Tuple[Dict[str, str], Any]]]:
        """{name: [(labels, value)]}; a histogram's value is (cumulative bucket counts, sum, count)."""
        out = collections.defaultdict(list)  # type: Dict[str, List[Tuple[Dict[str, str], Any]]]
        with self.lock:
            for (name, labels), value in sorted(self.counters.items()):
                out[name].append((dict(labels), value))
            for (name, labels), counts in sorted(self.histograms.items()):
                cumulative = [sum(counts[:i + 1]) for i in range(len(LATENCY_BUCKETS) + 1)]
                out[name].append((dict(labels), (cumulative, counts[-1], cumulative[-1])))
        return out


def limit_samples(state: Optional[Dict[str, Any]]) -> Dict[str, List[Tuple[Dict[str, str], Any]]]:
    """The limit state as /metrics gauges (none while nothing is known)."""
    if state is None:
        return {}
    windows = dict(state["windows"])
    if state["window"]:
        windows.setdefault(state["window"], {"utilization": state["utilization"], "resets_at": state["resets_at"]})
    return {
        "claude_max_proxy_ratelimit_status": [({"status": state["status"], "window": state["window"] or ""}, 1)],
        "claude_max_proxy_ratelimit_utilization": [({"window": name}, w["utilization"])
                                                   for name, w in sorted(windows.items()) if w.get("utilization") is not None],
        "claude_max_proxy_ratelimit_reset_timestamp_seconds": [({"window": name}, w["resets_at"])
                                                               for name, w in sorted(windows.items()) if w.get("resets_at")],
        "claude_max_proxy_overage_in_use": [({}, 1 if state["overage_in_use"] else 0)],
    }


def metrics_text(samples: Dict[str, List[Tuple[Dict[str, str], Any]]]) -> str:
    """Samples by metric name -> the Prometheus text exposition format."""
    def line(name: str, labels: Dict[str, str], value: float) -> str:
        pairs = ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
                         for k, v in labels.items())
        return "%s%s %s" % (name, "{%s}" % pairs if pairs else "", repr(float(value)))

    lines = []
    for name, (kind, text) in METRICS.items():
        lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
        for labels, value in samples.get(name, []):
            if kind != "histogram":
                lines.append(line(name, labels, value))
                continue
            cumulative, total, count = value
            for bound, n in zip(LATENCY_BUCKETS + (float("inf"),), cumulative):
                lines.append(line(name + "_bucket", dict(labels, le="+Inf" if bound == float("inf") else repr(bound)), n))
            lines += [line(name + "_sum", labels, total), line(name + "_count", labels, count)]
    return "\n".join(lines) + "\n"


class ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, config: Config, claude: ClaudeInstall):
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.address_family = family
        super().__init__((config.host, config.port), ProxyHandler)
        self.config = config
        self.claude = claude
        self.pool = ProcessPool(config, claude, self.observe_cli_event)
        self.responses = ResponseStore()
        self.limits = Limits()
        self.metrics = Metrics()
        self.inflight = 0
        self.inflight_lock = threading.Condition()
        self.ignored_api_keys = ignored_api_keys(config, dict(os.environ))
        self.connections = 0  # open client connections, against --max-connections
        self.connections_lock = threading.Lock()

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        with self.connections_lock:
            refused = self.connections >= self.config.max_connections
            if not refused:
                self.connections += 1
        if refused:
            refuse_connection(request, self.config.max_connections)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.connections_lock:
                self.connections -= 1

    # -- what the routes answer -----------------------------------------------------------------

    def health(self, full: bool) -> Dict[str, Any]:
        """GET /health: the details only for key holders (`full`)."""
        if not full:
            return {"status": "ok", "version": __version__}
        claude, counts = self.claude, self.pool.counts()
        return {"status": "ok", "version": __version__,
                "claude": {"path": claude.path, "version": claude.version,
                           "usable": bool(claude.path and claude.version), "error": claude.probe_error},
                "slots": {"busy": counts["busy"], "waiting": self.pool.waiting, "max": self.pool.size},
                "kept": {"max": self.pool.keep, "warm_per_shape": self.config.warm},
                "processes": counts,
                "limits": self.limits.current(time.time()),
                "ignored_api_keys": self.ignored_api_keys}

    def metrics_samples(self) -> Dict[str, List[Tuple[Dict[str, str], Any]]]:
        """GET /metrics: the counters, the pool's processes and the limit state."""
        samples, counts = self.metrics.samples(), self.pool.counts()
        samples["claude_max_proxy_cli_processes"] = [({"state": state}, counts[state])
                                                     for state in ("busy", "loading", "warm", "parked", "predicted")]
        samples["claude_max_proxy_requests_waiting"] = [({}, self.pool.waiting)]
        samples["claude_max_proxy_process_reuse_total"] = [({"result": "hit"}, counts["hits"]),
                                                           ({"result": "miss"}, counts["misses"])]
        samples.update(limit_samples(self.limits.current(time.time())))
        return samples

    def responses_call(self, body: Any) -> Tuple[CliCall, Callable[[CliCall], Any]]:
        """POST /v1/responses: the call, and its renderer, which keeps the answer for
        previous_response_id unless `store` is false."""
        store = self.responses
        if isinstance(body, dict) and isinstance(body.get("input"), list):
            body = dict(body, input=items_with_references_resolved(body["input"], store.item))
        call, conversation = responses_call_for(body, previous_messages_for(body, store), self.config)
        inputs = input_item_resources(body["input"])

        def keep(response: Dict[str, Any]) -> None:
            store.put(response, conversation + responses_output_messages(response["output"]), inputs)

        return call, lambda call: ResponsesRenderer(call, body, None if body.get("store") is False else keep)

    def stored_response(self, method: str, path: str, query: Dict[str, str]) -> Dict[str, Any]:
        """/v1/responses/{id}, its /input_items and /cancel: what the response store can answer."""
        response_id, _, action = path[len("/v1/responses/"):].partition("/")
        if action == "input_items":
            check_method(method, path, ("GET",))
            return input_items_page(self.stored(response_id)[2], query)
        if action == "cancel":
            check_method(method, path, ("POST",))
            self.stored(response_id)
            raise invalid(None, "Only responses created with `background: true` can be cancelled; response "
                          "'%s' was answered synchronously" % response_id, "response_not_cancellable")
        if action:
            raise ApiError(404, "no route for %s %s" % (method, path), "invalid_request_error", "not_found")
        check_method(method, path, ("GET", "DELETE"))
        if method == "DELETE":
            self.stored(response_id)
            self.responses.delete(response_id)
            return {"id": response_id, "object": "response", "deleted": True}
        return self.stored(response_id)[0]

    def stored(self, response_id: str) -> Tuple[Dict[str, Any], List[Dict[str, Any]], List[Dict[str, Any]]]:
        found = self.responses.entry(response_id)
        if found is None:
            raise ApiError(404, "Response with id '%s' not found" % response_id, "invalid_request_error",
                           "not_found")
        return found

    def observe_cli_event(self, event: Dict[str, Any]) -> None:
        """A CLI's `rate_limit_event` updates the limit state; its `result` counts a model call."""
        if event["type"] == "rate_limit_event":
            self.limits.record(event.get("rate_limit_info"), time.time())
            return
        if event.get("num_turns") == 0 and not event.get("is_error"):
            return  # a turn appended without a model call (CliRun.reseat), or a local command
        status = event.get("api_error_status") or ("error" if event.get("is_error") else 200)
        self.metrics.count("claude_max_proxy_upstream_calls_total", {"status": str(status)})


IMAGE_FETCH_COUNT = 8                      # remote images one request may name
IMAGE_FETCH_BYTES = 20 * 1024 * 1024       # their bytes in all
IMAGE_FETCH_SECONDS = 15.0                 # all of one request's fetches, redirects included
IMAGE_FETCH_REDIRECTS = 3
IMAGE_FETCH_FAILED = ("could not fetch the image at %s: images are fetched only from public http(s) "
                      "addresses, as png, jpeg, gif or webp of at most 5 MB, within 15 s")


def public_address(address: str) -> bool:
    """True for an address on the public internet: never loopback, private, link-local,
    multicast, reserved or unspecified (an IPv4-mapped IPv6 address is judged as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
                                 or ip.is_private or ip.is_unspecified)


class ImageFetcher:
    """Downloads the remote images of one request (--allow-image-fetch), safe by construction:
    http(s) only; every name resolved and every address checked with `allowed` before a connection
    is made to that very address (no second lookup a DNS rebinding could answer differently), again
    on each redirect; one deadline and byte budget for all; errors say nothing about the target."""

    def __init__(self, allowed: Callable[[str], bool] = public_address, seconds: float = IMAGE_FETCH_SECONDS,
                 budget: int = IMAGE_FETCH_BYTES):
        self.allowed, self.deadline, self.budget = allowed, time.monotonic() + seconds, budget

    def fetch_all(self, urls: List[str]) -> Dict[str, Dict[str, Any]]:
        """url -> Anthropic base64 image source, for every URL; a 400 for the first that fails."""
        if len(set(urls)) > IMAGE_FETCH_COUNT:
            raise invalid("messages", "at most %d remote images per request" % IMAGE_FETCH_COUNT,
                          "too_many_images")
        fetched = {}
        for url in urls:
            if url not in fetched:
                try:
                    fetched[url] = self.fetch(url)
                except (OSError, ValueError, http.client.HTTPException):
                    raise invalid("messages", IMAGE_FETCH_FAILED % json.dumps(url[:200]), "image_fetch_failed")
        return fetched

    def fetch(self, url: str) -> Dict[str, Any]:
        for _ in range(IMAGE_FETCH_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            sock = self._connect(parts)
            # The deadline covers every byte: a target that trickles is cut off, however steadily.
            watchdog = threading.Timer(self._left(), lambda: close_quietly(sock))
            watchdog.start()
            try:
                response = self._get(sock, parts)
                if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                    url = urllib.parse.urljoin(url, response.getheader("Location"))
                    continue  # checked again from the start: scheme, name, address
                media_type = (response.getheader("Content-Type") or "").split(";", 1)[0].strip().lower()
                media_type = "image/jpeg" if media_type == "image/jpg" else media_type
                if response.status != 200 or media_type not in IMAGE_TYPES:
                    raise ValueError("not an image")
                data = self._read(response)
                return {"type": "base64", "media_type": media_type,
                        "data": base64.b64encode(data).decode("ascii")}
            finally:
                watchdog.cancel()
                close_quietly(sock)
        raise ValueError("too many redirects")

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("deadline")
        return left

    def _connect(self, parts: urllib.parse.SplitResult) -> socket.socket:
        """A connection to the checked address of the URL's host (TLS for https)."""
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("scheme")
        port = url_port(parts)
        addresses = [info[4][0] for info in socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)]
        if not addresses or not all(self.allowed(address) for address in addresses):
            raise ValueError("address")
        sock = socket.create_connection((addresses[0], port), timeout=self._left())
        if scheme == "https":
            import ssl  # only here: the proxy otherwise never needs it
            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
            except BaseException:
                close_quietly(sock)
                raise
        return sock

    def _get(self, sock: socket.socket, parts: urllib.parse.SplitResult) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(parts.hostname, url_port(parts))
        conn.sock = sock  # the checked address, not a new lookup
        conn.request("GET", (parts.path or "/") + ("?" + parts.query if parts.query else ""),
                     headers={"User-Agent": "claude-max-proxy/" + __version__, "Accept": "image/*"})
        return conn.getresponse()

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        limit = min(MAX_IMAGE_BYTES * 3 // 4, self.budget)  # 5 MB of base64 is 3.75 MB of image
        chunks, size = [], 0
        while True:
            chunk = response.read(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise ValueError("too large")
            chunks.append(chunk)
        self._left()  # an end of data the watchdog caused is not the end of the image
        self.budget -= size
        return b"".join(chunks)


def url_port(parts: urllib.parse.SplitResult) -> int:
    return parts.port or (443 if parts.scheme.lower() == "https" else 80)


def close_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def refuse_connection(sock: socket.socket, limit: int) -> None:
    """Answer a connection over --max-connections with a 503, without a thread or a wait."""
    body = json.dumps(ApiError(503, "too many open connections (the limit is %d); retry shortly" % limit,
                               "server_error", "too_many_connections").body()).encode("ascii")
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            "Retry-After: 1\r\nConnection: close\r\n\r\n" % len(body)).encode("ascii")
    try:
        sock.setblocking(False)  # a small answer fits the socket buffer; a client that reads nothing loses it
        sock.send(head + body)
    except OSError:
        pass


class DeadlineReader(io.RawIOBase):
    """A client socket's input, where every read also ends at the request's deadline: a client
    that trickles its request head (slow loris) is dropped, however steadily it sends."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock, self.timeout = sock, timeout
        self.deadline = None  # type: Optional[float]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        wait = self.timeout if self.deadline is None else min(self.timeout, self.deadline - time.monotonic())
        if wait <= 0:
            raise socket.timeout("the request took too long to arrive")
        self.sock.settimeout(wait)
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.timeout)  # writes keep the --client-timeout


def endpoint_label(path: str, routes: List[str]) -> str:
    """A request path -> its route for /metrics (`/v1/models/{id}`); unknown paths are one label."""
    for route in routes:
        if path == route:
            return route
        if path.startswith(route + "/"):
            return route + "/{id}"
    return "other"


def client_gone_check(sock: socket.socket) -> Callable[[], bool]:
    """A cheap test for a client that hung up: its socket reads as EOF."""
    def gone() -> bool:
        try:
            ready, _, _ = select.select([sock], [], [], 0)
            if not ready:
                return False
            return sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True
    return gone


def guard(config: Config, headers: Any, method: str, path: str) -> None:
    """Refuse what a browser page or another machine could abuse, before any work."""
    host = (headers.get("Host") or "").strip()
    hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if host.startswith("["):
        hostname = host[:host.index("]") + 1] if "]" in host else host
    if not host or not (is_loopback_host(hostname) or hostname in config.allowed_hosts
                        or hostname == config.host):
        raise ApiError(421, "Host %r is not served here (DNS-rebinding guard); add it with "
                       "--allowed-hosts" % host, "invalid_request_error", "host_not_allowed")
    origin = headers.get("Origin")
    if origin is not None and origin not in config.allowed_origins:
        raise ApiError(403, "requests from web origin %r are not allowed; add it with "
                       "--allowed-origins" % origin, "permission_error", "origin_not_allowed")
    if method == "OPTIONS" or path == "/health":
        return
    if config.api_keys and not authorized(config, headers):
        raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`",
                       "authentication_error", "invalid_api_key")


def authorized(config: Config, headers: Any) -> bool:
    """The key as OpenAI clients send it (`Authorization: Bearer`) or as Anthropic's do (`x-api-key`)."""
    given = headers.get("Authorization") or ""
    tokens = [(given[7:].strip() if given[:7].lower() == "bearer " else "").encode("utf-8", "replace"),
              (headers.get("x-api-key") or "").strip().encode("utf-8", "replace")]
    # Compare against every key, in constant time each, so timing says nothing about a key.
    matches = [hmac.compare_digest(token, key.encode("utf-8"))
               for key in config.api_keys for token in tokens]
    return any(matches)


def check_method(method: str, path: str, methods: Tuple[str, ...]) -> None:
    """405 for a method the route lacks; HEAD is answered wherever GET is (headers only)."""
    if method in methods or (method == "HEAD" and "GET" in methods):
        return
    allow = list(methods) + (["HEAD"] if "GET" in methods and "HEAD" not in methods else [])
    raise ApiError(405, "method %s not allowed on %s" % (method, path), "invalid_request_error",
                   "method_not_allowed", headers={"Allow": ", ".join(allow)})


SSE_HOLD_BYTES = 32768  # most bytes of frames held back for one write while more are at hand
SSE_JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps(..., ensure_ascii=False), built once


class SseWriter:
    """A started SSE answer's body in HTTP/1.1 chunks (so the connection can be reused): a frame
    is written at once, or held (up to SSE_HOLD_BYTES) to go out with the next write."""

    def __init__(self, wfile: Any):
        self.wfile = wfile
        self.held, self.held_bytes, self.sent_bytes = [], 0, 0  # type: List[bytes], int, int
        self.last_frame_at = time.monotonic()

    def send(self, payload: Any, event: Optional[str] = None, hold: bool = False) -> None:
        text = payload if isinstance(payload, str) else SSE_JSON.encode(payload)
        data = ("%sdata: %s\n\n" % ("event: %s\n" % event if event else "", text)).encode("utf-8")
        self.held.append(b"%x\r\n%s\r\n" % (len(data), data))
        self.held_bytes += len(data)
        self.last_frame_at = time.monotonic()
        if not hold or self.held_bytes >= SSE_HOLD_BYTES:
            self.write_held()

    def write_held(self) -> None:
        if self.held:
            self.wfile.write(b"".join(self.held))
            self.sent_bytes += self.held_bytes
            self.held, self.held_bytes = [], 0

    def end(self) -> None:
        self.write_held()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "claude-max-proxy/" + __version__
    timeout = 30  # replaced by --client-timeout in setup()

    # -- entry points ---------------------------------------------------------------------------

    unread_body = False
    sse = None  # type: Optional[SseWriter]  # a started stream's body

    def finish(self):
        super().finish()
        if self.unread_body:
            self._drain_input()

    def _drain_input(self) -> None:
        """A lingering close: read what the client still sends, so it can read our error.

        Closing with unread input makes the kernel reset the connection, and a client still
        uploading would see a broken pipe instead of the 413/411/401 it was sent."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            deadline, drained = time.monotonic() + 2.0, 0
            while time.monotonic() < deadline and drained < 64 * 1024 * 1024:
                data = self.connection.recv(1 << 16)
                if not data:
                    break
                drained += len(data)
        except OSError:
            pass

    def setup(self):
        # A client that stops sending (slow loris) or stops reading (a full socket buffer) is
        # dropped after this long, and the CLI it was holding is ended.
        self.timeout = self.server.config.client_timeout
        super().setup()
        self.reader = DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.reader, 1 << 16)
        # Headers and body go out as separate writes: without this, Nagle holds the second ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle_one_request(self):
        # The wait for the request and its head share one deadline (the body gets its own).
        self.reader.deadline = time.monotonic() + self.server.config.read_timeout
        super().handle_one_request()

    def _do(self):
        self._dispatch(self.command)

    do_GET = do_POST = do_OPTIONS = do_PUT = do_DELETE = do_PATCH = do_HEAD = _do

    def log_message(self, format, *args):
        pass  # one access-log line per request is written by _access_log instead

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, 431 headers too large...) in OpenAI's envelope."""
        self.request_id = getattr(self, "request_id", None) or "req_" + uuid.uuid4().hex[:24]
        self.headers_sent = getattr(self, "headers_sent", False)
        self.sent_bytes = getattr(self, "sent_bytes", 0)
        self.close_connection = True
        words = (getattr(self, "requestline", "") or "").split()
        if len(words) >= 3 or (words and words[-1].upper().startswith("HTTP/")):
            self.request_version = "HTTP/1.1"  # answer with a status line, even to a bad version
        if not hasattr(self, "headers") or self.headers is None:
            self.headers = {}
        self._send_error(ApiError(code, message or "bad request", "invalid_request_error", "bad_request"))

    def _dispatch(self, method: str) -> None:
        self.request_id = "req_" + uuid.uuid4().hex[:24]
        self.started = time.monotonic()
        self.status = 0
        self.sent_bytes = 0
        self.sse = None
        self.first_token_at = None
        self.log_model = "-"
        self.headers_sent = False
        self.body_read = False
        self.reused_process = False
        self.log_prompt = None
        self.endpoint = "other"  # the matched route, for /metrics
        self.dropped_tools = ""  # hosted tools left out of a Responses request, named in header and log
        server = self.server
        if method != "POST" and self._has_body():
            # A body no route reads would be parsed as the next request (smuggling): answer, then close.
            self.close_connection = True
            self.unread_body = True
        with server.inflight_lock:
            server.inflight += 1
        try:
            self._route(method)
        except ClientGone:
            self.status = 499  # logged as such even after a 200 went out: the answer did not arrive
            self.close_connection = True
        except ApiError as exc:
            if not self.body_read and self._has_body():
                # An unread body would be parsed as the next request: end the connection instead.
                self.close_connection = True
                self.unread_body = True
            self._send_error(exc)
        except (BrokenPipeError, ConnectionResetError):
            self.status = 499
            self.close_connection = True
        except RecursionError:  # a JSON value nested deeper than anything real: a client error
            self._send_error(invalid(None, "the request is nested too deeply", "invalid_json"))
        except Exception as exc:  # the server must survive anything a request does
            self._send_error(ApiError(500, "internal error: %s" % type(exc).__name__, "server_error",
                                      "internal_error"))
            sys.stderr.write("[%s] internal error: %r\n" % (self.request_id, exc))
        finally:
            with server.inflight_lock:
                server.inflight -= 1
                server.inflight_lock.notify_all()
            self._access_log(method)
            self._count_request()

    def _has_body(self) -> bool:
        return self.headers.get("Content-Length") not in (None, "0") or bool(self.headers.get("Transfer-Encoding"))

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        server, config = self.server, self.server.config
        routes = [
            ("/health", ("GET", "HEAD"), lambda: self._send_json(200, server.health(
                not config.api_keys or authorized(config, self.headers)))),
            ("/v1/models", ("GET",), lambda: self._send_json(200, {
                "object": "list", "data": [model_object(m) for m in list(MODELS) + list(CLI_ALIASES)]})),
            ("/v1/chat/completions", ("POST",), lambda: self._serve_call(
                cli_call_for(self._read_json(), config), ChatRenderer)),
            ("/v1/responses", ("POST",), self._responses),
            ("/metrics", ("GET",), lambda: self._send_body(200, metrics_text(server.metrics_samples()).encode(
                "utf-8"), "text/plain; version=0.0.4; charset=utf-8")),
            ("/v1/completions", ("POST",), lambda: self._serve_call(
                completion_call_for(self._read_json(), config), CompletionRenderer)),
            ("/v1/messages", ("POST",), lambda: self._serve_call(
                messages_call_for(self._read_json(), config, config.allow_image_fetch), MessagesRenderer)),
            ("/v1/messages/count_tokens", ("POST",), self._count_tokens),
        ]
        self.endpoint = endpoint_label(path, [route for route, _, _ in routes])
        guard(config, self.headers, method, path)
        if method == "OPTIONS":
            return self._preflight()
        for route, methods, action in routes:
            if path == route:
                check_method(method, path, methods)
                return action()
        if path.startswith("/v1/models/"):
            check_method(method, path, ("GET",))
            name = path[len("/v1/models/"):]
            requested, _ = resolve_model(name, config.default_model)
            return self._send_json(200, model_object(requested))
        if path.startswith("/v1/responses/"):
            return self._send_json(200, server.stored_response(method, path, self._query()))
        raise ApiError(404, "no route for %s %s" % (method, path), "invalid_request_error", "not_found")

    # -- guards ---------------------------------------------------------------------------------

    def _preflight(self) -> None:
        self.status = 204
        self.send_response(204)
        self._common_headers()
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type, OpenAI-Organization, "
                         "OpenAI-Project, X-Stainless-Lang, X-Stainless-Package-Version, "
                         "x-api-key, anthropic-version, anthropic-beta, anthropic-dangerous-direct-browser-access")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _common_headers(self) -> None:
        headers = {"x-request-id": self.request_id}
        if self._is_messages_api():
            headers["request-id"] = self.request_id  # Anthropic's name, read by its SDKs
        if getattr(self, "dropped_tools", ""):
            headers["x-claude-max-proxy-dropped-tools"] = self.dropped_tools
        # Every answer carries the latest known plan-limit state, as Anthropic's own headers do.
        if not self.server.config.api_keys or authorized(self.server.config, self.headers):
            headers.update(ratelimit_headers_for(self.server.limits.current(time.time())))
        origin = self.headers.get("Origin")
        if origin and origin in self.server.config.allowed_origins:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
            # Without this a page's script cannot read any of them (nor an error's Retry-After).
            self.send_header("Access-Control-Expose-Headers", ", ".join(list(headers) + ["Retry-After"]))
        for key, value in headers.items():
            self.send_header(key, value)

    # -- bodies ---------------------------------------------------------------------------------

    def _read_json(self) -> Any:
        # JSON only: a plain HTML form cannot send it, so a web page cannot start a completion.
        kind = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, "Content-Type must be application/json", "invalid_request_error",
                           "unsupported_media_type")
        if self.headers.get("Transfer-Encoding") is not None:
            raise ApiError(411, "send the body with a Content-Length, without Transfer-Encoding",
                           "invalid_request_error", "length_required")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise ApiError(411, "a Content-Length header is required", "invalid_request_error",
                           "length_required")
        if len(lengths) > 1 or not re.match(r"^[0-9]{1,15}$", lengths[0].strip()):
            raise invalid(None, "the Content-Length header is malformed", "bad_content_length")
        size = int(lengths[0])
        if size > self.server.config.max_body_bytes:
            self.close_connection = True
            self.unread_body = True
            raise ApiError(413, "request body of %d bytes is over the %d-byte limit"
                           % (size, self.server.config.max_body_bytes), "invalid_request_error",
                           "request_too_large")
        deadline = time.monotonic() + max(self.server.config.read_timeout, size / 65536.0)
        self.reader.deadline = deadline
        chunks, left = [], size
        while left:
            if time.monotonic() > deadline:
                self.close_connection = True
                raise ApiError(408, "the request body arrived too slowly", "invalid_request_error",
                               "request_timeout")
            try:
                data = self.rfile.read1(min(left, 1 << 16)) if hasattr(self.rfile, "read1") \
                    else self.rfile.read(min(left, 1 << 16))
            except socket.timeout:
                self.close_connection = True
                raise ApiError(408, "the request body arrived too slowly", "invalid_request_error",
                               "request_timeout")
            if not data:
                raise ClientGone()
            chunks.append(data)
            left -= len(data)
        self.body_read = True
        self.reader.deadline = None
        try:
            return json.loads(b"".join(chunks).decode("utf-8"), parse_constant=reject_json_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise invalid(None, "the body is not valid JSON: %s" % exc, "invalid_json")
        except RecursionError:
            raise invalid(None, "the JSON body is nested too deeply", "invalid_json")

    def _send_json(self, status: int, obj: Any, headers: Optional[Dict[str, str]] = None) -> None:
        # A lone surrogate echoed back from a request must not cost the client its answer.
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8", "replace")
        self._send_body(status, data, "application/json", headers)

    def _send_body(self, status: int, data: bytes, content_type: str,
                   headers: Optional[Dict[str, str]] = None) -> None:
        self.status = status
        self.send_response(status)
        self._common_headers()
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.headers_sent = True
        if self.command != "HEAD":
            self.wfile.write(data)
        self.sent_bytes += len(data)

    def _send_error(self, error: ApiError) -> None:
        if self.headers_sent:
            return
        status, body = error.status, error.body()
        if self._is_messages_api():  # Anthropic's clients read Anthropic's envelope
            status, body = messages_error_of(error)
        try:
            self._send_json(status, body, error.headers)
        except OSError:
            self.close_connection = True

    # -- SSE (chunked transfer, so the connection can be reused) --------------------------------

    def _start_sse(self) -> None:
        self.status = 200
        self.send_response(200)
        self._common_headers()
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.headers_sent = True
        self.sse = SseWriter(self.wfile)

    def _keep_alive(self, renderer: Any) -> None:
        """Send the renderer's keep-alive frames (if it has any) on a stream silent for too long."""
        frames = getattr(renderer, "keep_alive", None)
        if frames is not None and self.sse is not None and \
                time.monotonic() - self.sse.last_frame_at >= KEEP_ALIVE_SECONDS:
            for name, payload in frames():
                self.sse.send(payload, name)

    # -- endpoints ------------------------------------------------------------------------------

    def _responses(self) -> None:
        body = self._read_json()
        call, renderer_for = self.server.responses_call(body)
        self.dropped_tools = ",".join(hosted_tools_of(body.get("tools")))
        self._serve_call(call, renderer_for)

    def _count_tokens(self) -> None:
        self._read_json()  # read, so the connection stays usable for the client's next request
        # The CLI has no way to count tokens without a model call; a guess would mislead the client.
        raise ApiError(501, "token counting is not available through claude-max-proxy: the Claude CLI "
                       "offers no way to count tokens without calling the model, and the proxy does not "
                       "guess. The `usage` of a real answer reports its exact input tokens.",
                       "server_error", "not_implemented", headers={"x-should-retry": "false"})

    def _is_messages_api(self) -> bool:
        path = (getattr(self, "path", "") or "").split("?", 1)[0].rstrip("/")
        return path == "/v1/messages" or path.startswith("/v1/messages/")

    def _query(self) -> Dict[str, str]:
        query = self.path.partition("?")[2]
        return {key: values[-1] for key, values in urllib.parse.parse_qs(query).items()}

    def _serve_call(self, call: CliCall, renderer_for: Callable[[CliCall], Any]) -> None:
        """Run one CLI turn for a valid call and answer in its renderer's shapes."""
        server, config = self.server, self.server.config
        urls = remote_images_in(call)  # fetched only with --allow-image-fetch (else refused already)
        call = call_with_images(call, ImageFetcher().fetch_all(urls)) if urls else call
        renderer = renderer_for(call)
        self.log_model = call.requested_model
        if config.log_prompts:
            self.log_prompt = json.dumps(call.prompt)[:500]  # ASCII: no terminal escapes in the log
        now = time.time()
        refusal = overage_refusal(server.limits.current(now), now) if config.no_overage else None
        if refusal is not None:
            raise refusal  # before any process or model call: nothing is spent
        gone = client_gone_check(self.connection)
        # While the CLI is silent, or busy with what the client does not see, a started stream
        # gets the renderer's keep-alive frames.
        with server.pool.turn(call, lambda: self._keep_alive(renderer) or gone(),
                              getattr(renderer, "translator", None)) as turn:
            self.reused_process = turn.reused
            if not call.stream:
                events = list(turn)
                return self._send_json(200, renderer.whole(events, turn.model))
            self._relay(stream_frames(turn, renderer), turn.run.next_is_delta)

    def _relay(self, frames: Iterator[Tuple[Optional[str], Any]],
               more_at_hand: Callable[[], bool] = lambda: False) -> None:
        """Write a stream's SSE frames; the headers wait for the first one, so an error before any
        output is still a proper HTTP status.

        A frame is written at once unless `more_at_hand()`: a CLI that streams faster than one
        write per frame gets its frames written in batches, never held while the CLI is waited for."""
        try:
            for name, payload in frames:
                if not self.headers_sent:
                    self.first_token_at = time.monotonic()
                    self._start_sse()
                self.sse.send(payload, name, hold=more_at_hand())
        except OSError:
            raise ClientGone()
        finally:
            if self.sse is not None:
                with contextlib.suppress(OSError):
                    self.sse.write_held()  # what was held still goes out before an error propagates
        self.sse.end()

    # -- access log and metrics -----------------------------------------------------------------

    def _count_request(self) -> None:
        metrics, labels = self.server.metrics, {"endpoint": self.endpoint}
        metrics.count("claude_max_proxy_requests_total", dict(labels, status=str(self.status)))
        metrics.observe("claude_max_proxy_request_duration_seconds", labels, time.monotonic() - self.started)
        if self.first_token_at is not None:
            metrics.observe("claude_max_proxy_time_to_first_token_seconds", labels,
                            self.first_token_at - self.started)

    def _access_log(self, method: str) -> None:
        elapsed = time.monotonic() - self.started
        ttft = "%.3f" % (self.first_token_at - self.started) if self.first_token_at else "-"
        sys.stderr.write("%s %s %s %s %d model=%s dur=%.3f ttft=%s bytes=%d%s" % (
            time.strftime("%Y-%m-%dT%H:%M:%S"), self.request_id, method,
            json.dumps(self.path.split("?", 1)[0][:200])[1:-1], self.status, self.log_model, elapsed, ttft,
            self.sent_bytes + (self.sse.sent_bytes if self.sse else 0), " reused=1" if self.reused_process else "")
            + (" dropped_tools=%s" % self.dropped_tools if getattr(self, "dropped_tools", "") else "")
            + (" prompt=%s" % self.log_prompt if self.log_prompt else "") + "\n")


# ================================================================================================
# Commands: serve (default)
# ================================================================================================

def default_first_turn(config: Config) -> CliCall:
    """The shape of a first turn that names nothing: the default model, no system prompt, no tools."""
    return cli_call_for({"model": config.default_model, "messages": [{"role": "user", "content": "."}]}, config)


def serve(config: Config) -> int:
    claude = ClaudeInstall(config.claude)
    server = ProxyServer(config, claude)
    remove_leftovers(config.workdir, dict(os.environ))
    host, port = server.server_address[:2]
    # Probing `claude --version` takes ~0.3 s: do it beside serving, not before.
    threading.Thread(target=claude.probe, args=(cli_base_env(config, dict(os.environ)),),
                     daemon=True).start()

    def expire_kept():
        while True:
            time.sleep(1.0)
            server.pool.expire()

    threading.Thread(target=expire_kept, daemon=True).start()
    # Ready before the first request, and all loaded in one round (one per core), so that the
    # first request finds the CPU free; a burst past them takes answered conversations, rewound.
    server.pool.prestart(default_first_turn(config), min(config.warm, LOADS_AT_ONCE))
    if server.ignored_api_keys:
        sys.stderr.write("note: %s set but ignored: the CLI uses your Claude subscription login "
                         "(--use-api-key would bill that API account instead).\n"
                         % names_are(server.ignored_api_keys))
    if config.use_api_key and any(os.environ.get(name) for name in API_KEY_NAMES):
        sys.stderr.write("warning: --use-api-key: the CLI bills the API key in the environment, not your "
                         "Claude subscription.\n")
    if not claude.path:
        sys.stderr.write("warning: the Claude CLI `%s` was not found; requests will get 503 until it "
                         "is installed.\n" % config.claude)
    if config.allow_unauthenticated_remote and not is_loopback_host(config.host) and not config.api_keys:
        sys.stderr.write("WARNING: serving %s WITHOUT an API key: anyone who can reach this port "
                         "can use your subscription.\n" % config.host)
    stopping = threading.Event()

    def on_signal(signum, frame):
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()
        elif signum == signal.SIGINT:  # a second Ctrl-C: the user does not want to wait
            end_all_runs_now()
            os._exit(130)

    # SIGHUP too: a closed terminal or `kill -HUP` drains like SIGTERM rather than dropping answers.
    for name in ("SIGTERM", "SIGINT", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)
    sys.stderr.write("claude-max-proxy %s listening on http://%s:%d/v1\n" % (
        __version__, host if ":" not in host else "[%s]" % host, port))
    sys.stderr.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        grace_end = time.monotonic() + config.shutdown_grace
        with server.inflight_lock:
            while server.inflight and time.monotonic() < grace_end:
                server.inflight_lock.wait(0.2)
        server.pool.close()
        close_all_runs()
    return 0


# ================================================================================================
# Commands: doctor, install-service, uninstall-service
# ================================================================================================

SERVICE_NAME = "claude-max-proxy"
LAUNCHD_LABEL = "local.claude-max-proxy"
# [lowest, first unsupported) Claude Code version. The e2e tests pin one 2.1 release
# (tests/real_cli.py); outside the series, flags the proxy passes may be missing or changed.
SUPPORTED_CLI_VERSIONS = ((2, 1, 0), (3, 0, 0))
LIVE_CHECK_MODEL = "claude-haiku-4"  # the smallest model: `doctor --live` spends one short call
# Where a background service looks for programs besides the CLI's own directory.
SERVICE_BASE_PATH = {
    "macos": ["/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"],
    "linux": ["/usr/local/bin", "/usr/bin", "/bin"],
}

# The service templates. packaging/launchd.plist.template and packaging/systemd.service.template
# are the same text (a test keeps them equal): they live here too because this one module is all
# that ships in every form (plain file, zipapp, pip/pipx), so it never has to find a data file.
LAUNCHD_TEMPLATE = """\
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<!-- Written by `claude-max-proxy install-service`: re-run it to change this file. -->
<plist version="1.0">
<dict>
\t<key>Label</key>
\t<string>${label}</string>
\t<key>ProgramArguments</key>
\t<array>
${program_arguments}
\t</array>
\t<key>EnvironmentVariables</key>
\t<dict>
${environment}
\t</dict>
\t<key>WorkingDirectory</key>
\t<string>${working_directory}</string>
\t<key>RunAtLoad</key>
\t<true/>
\t<key>KeepAlive</key>
\t<true/>
\t<key>ThrottleInterval</key>
\t<integer>10</integer>
\t<key>ExitTimeOut</key>
\t<integer>${stop_timeout}</integer>
\t<key>StandardOutPath</key>
\t<string>${log_path}</string>
\t<key>StandardErrorPath</key>
\t<string>${log_path}</string>
</dict>
</plist>
"""

SYSTEMD_TEMPLATE = """\
# Written by `claude-max-proxy install-service`: re-run it to change this file.
[Unit]
Description=claude-max-proxy: OpenAI-compatible API answered by the Claude Code CLI

[Service]
Type=simple
ExecStart=${exec_start}
${environment}
Restart=always
RestartSec=5
# SIGTERM goes to the proxy alone so in-flight answers get their grace time; whatever is still
# in the unit when it exits (or at TimeoutStopSec) is killed.
KillMode=mixed
TimeoutStopSec=${stop_timeout}

[Install]
WantedBy=default.target
"""


class ServiceError(Exception):
    """Something that stops install-service/uninstall-service before it changes anything."""


@dataclasses.dataclass
class ServiceAction:
    """One step of installing or removing the service, in order: mkdir, write, run or remove."""
    kind: str
    path: str = ""
    text: str = ""
    argv: List[str] = dataclasses.field(default_factory=list)
    may_fail: bool = False  # e.g. unloading a service that is not loaded
    attempts: int = 1


@dataclasses.dataclass
class Finding:
    """One line of the doctor's report: OK, WARN or FAIL, what was found, and the fix."""
    status: str
    check: str
    summary: str
    fix: str = ""


# -- the service: pure builders -----------------------------------------------------------------

def platform_of(sys_platform: str) -> str:
    if sys_platform == "darwin":
        return "macos"
    if sys_platform.startswith("linux"):
        return "linux"
    raise ServiceError("services are supported on macOS (launchd) and Linux (systemd), not %s"
                       % sys_platform)


def program_argv_for(executable: str, module_file: str) -> List[str]:
    """The command that runs this same main(): the interpreter, then the .pyz or the module file.

    The interpreter path is kept as given, not resolved: a venv's (pipx's) `python` is a symlink
    whose location is what makes it use the venv. A pip/pipx install runs the installed module
    file, which is the same main() the console script calls.
    """
    if not executable:
        raise ServiceError("cannot tell which Python runs this program (sys.executable is empty)")
    module_file = os.path.normpath(os.path.abspath(module_file))
    container = os.path.dirname(module_file)
    # Inside a zipapp the module's __file__ is <archive>/claude_max_proxy.py (.pyc): run the archive.
    program = container if os.path.isfile(container) else module_file
    return [os.path.abspath(executable), program]


def service_path_for(platform: str, claude_path: str, node_path: Optional[str]) -> str:
    """PATH for the service: launchd and systemd start with a bare one that rarely holds `claude`
    (or the `node` an npm-installed CLI runs on), so their directories come first."""
    dirs = [os.path.dirname(claude_path)]
    if node_path:
        dirs.append(os.path.dirname(node_path))
    dirs += SERVICE_BASE_PATH[platform]
    return ":".join(collections.OrderedDict.fromkeys(dirs))


def service_args_for(given: Dict[str, Any], config: Config, claude_path: str) -> List[str]:
    """The proxy's flags in the service: address and CLI always, then what the user passed."""
    args = ["--host", config.host, "--port", str(config.port), "--claude", claude_path]
    for flag, kind, _ in OPTIONS:
        key = flag.lstrip("-").replace("-", "_")
        value = given.get(key)
        if key in ("host", "port", "claude") or value is None or value is False:
            continue
        args += [flag] if kind is bool else [flag, str(value)]
    return args


def unit_path_for(platform: str, home: str) -> str:
    if platform == "macos":
        return os.path.join(home, "Library", "LaunchAgents", LAUNCHD_LABEL + ".plist")
    # Not $XDG_CONFIG_HOME: the user manager reads its own environment, where it is rarely set.
    return os.path.join(home, ".config", "systemd", "user", SERVICE_NAME + ".service")


def log_path_for(home: str) -> str:
    return os.path.join(home, "Library", "Logs", SERVICE_NAME + ".log")


def xml_text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def launchd_plist_for(argv: List[str], environment: Dict[str, str], home: str,
                      stop_timeout: int) -> str:
    return string.Template(LAUNCHD_TEMPLATE).substitute(
        label=LAUNCHD_LABEL,
        program_arguments="\n".join("\t\t<string>%s</string>" % xml_text(a) for a in argv),
        environment="\n".join("\t\t<key>%s</key>\n\t\t<string>%s</string>" % (xml_text(k), xml_text(v))
                              for k, v in sorted(environment.items())),
        working_directory=xml_text(home), stop_timeout=stop_timeout,
        log_path=xml_text(log_path_for(home)))


def systemd_word(word: str, dollars: bool = True) -> str:
    """One ExecStart/Environment word: `%` starts a specifier and `$` a variable, so both are doubled."""
    if "\n" in word or "\r" in word:
        raise ServiceError("a systemd unit cannot hold a value with a line break: %r" % word)
    word = word.replace("%", "%%")
    if dollars:
        word = word.replace("$", "$$")
    if re.match(r"^[A-Za-z0-9_@%+=:,./-]+$", word):
        return word
    return '"%s"' % word.replace("\\", "\\\\").replace('"', '\\"')


def systemd_unit_for(argv: List[str], environment: Dict[str, str], stop_timeout: int) -> str:
    return string.Template(SYSTEMD_TEMPLATE).substitute(
        exec_start=" ".join(systemd_word(a) for a in argv),
        # Environment= does no `$` expansion, only specifiers.
        environment="\n".join("Environment=%s" % systemd_word("%s=%s" % item, dollars=False)
                              for item in sorted(environment.items())),
        stop_timeout=stop_timeout)


def argv_from_systemd_unit(text: str) -> List[str]:
    """The ExecStart argv of a unit install-service wrote (the doctor checks its paths)."""
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            words = shlex.split(line[len("ExecStart="):])
            return [w.replace("$$", "$").replace("%%", "%") for w in words]
    return []


def install_actions_for(platform: str, uid: int, home: str, unit_text: str,
                        previous_text: Optional[str]) -> List[ServiceAction]:
    """Write the unit and (re)load it. Re-running converges on the same state."""
    path = unit_path_for(platform, home)
    actions = [ServiceAction("mkdir", os.path.dirname(path))]
    if platform == "macos":
        actions.append(ServiceAction("mkdir", os.path.dirname(log_path_for(home))))
    actions.append(ServiceAction("write", path, unit_text))
    if platform == "macos":
        domain, target = "gui/%d" % uid, "gui/%d/%s" % (uid, LAUNCHD_LABEL)
        # `enable` clears an earlier `launchctl disable`, which would make bootstrap fail; a
        # loaded copy must be booted out first, as launchd never rereads a loaded plist.
        return actions + [
            ServiceAction("run", argv=["launchctl", "enable", target]),
            ServiceAction("run", argv=["launchctl", "bootout", target], may_fail=True),
            # launchd finishes a bootout in the background; until then bootstrap fails with
            # "5: Input/output error", so it is tried again for a few seconds.
            ServiceAction("run", argv=["launchctl", "bootstrap", domain, path], attempts=10),
        ]
    unit = SERVICE_NAME + ".service"
    actions += [ServiceAction("run", argv=["systemctl", "--user", "daemon-reload"]),
                ServiceAction("run", argv=["systemctl", "--user", "enable", "--now", unit])]
    if previous_text is not None and previous_text != unit_text:
        # `enable --now` leaves a running service alone: a changed unit needs a restart.
        actions.append(ServiceAction("run", argv=["systemctl", "--user", "restart", unit]))
    return actions


def uninstall_actions_for(platform: str, uid: int, home: str, installed: bool) -> List[ServiceAction]:
    """Stop and unload (harmless when not loaded), then remove the unit file."""
    path = unit_path_for(platform, home)
    removal = [ServiceAction("remove", path)] if installed else []
    if platform == "macos":
        return [ServiceAction("run", argv=["launchctl", "bootout", "gui/%d/%s" % (uid, LAUNCHD_LABEL)],
                              may_fail=True)] + removal
    unit = SERVICE_NAME + ".service"
    return ([ServiceAction("run", argv=["systemctl", "--user", "disable", "--now", unit], may_fail=True)]
            + removal
            + [ServiceAction("run", argv=["systemctl", "--user", "daemon-reload"], may_fail=True),
               ServiceAction("run", argv=["systemctl", "--user", "reset-failed", unit], may_fail=True)])


def described_actions(actions: List[ServiceAction]) -> str:
    """What --dry-run prints: every directory, file (in full) and command, in order."""
    lines = []
    for action in actions:
        if action.kind == "mkdir":
            lines.append("would create directory %s" % action.path)
        elif action.kind == "write":
            lines += ["would write %s (mode 0600):" % action.path,
                      "----- begin %s -----" % action.path, action.text.rstrip("\n"),
                      "----- end %s -----" % action.path]
        elif action.kind == "remove":
            lines.append("would remove %s" % action.path)
        else:
            lines.append("would run: %s%s" % (" ".join(shlex.quote(a) for a in action.argv),
                                              "   (may fail harmlessly)"
                                              if action.may_fail else ""))
    return "\n".join(lines) + "\n"


# -- the service: I/O --------------------------------------------------------------------------

def read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def write_private_file(path: str, text: str) -> None:
    """Write atomically with mode 0600: the unit may hold an API key or an OAuth token."""
    fd, tmp_path = tempfile.mkstemp(prefix="." + os.path.basename(path), dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp_path, 0o600)
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def run_tool(argv: List[str], timeout: float = 60.0,
             env: Optional[Dict[str, str]] = None) -> Tuple[int, str]:
    """Run a helper program: (exit code, stdout and stderr). 127 when it does not exist."""
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=timeout, env=env,
                             start_new_session=True)
    except FileNotFoundError:
        return 127, "%s: command not found" % argv[0]
    except subprocess.TimeoutExpired:
        return 124, "%s did not finish within %.0f s" % (argv[0], timeout)
    return out.returncode, out.stdout.decode("utf-8", "replace").strip()


def service_manager_hint(tool: str, output: str) -> str:
    """Why launchctl/systemctl refuse in the two common headless cases."""
    if tool == "systemctl" and re.search(r"\bbus\b|XDG_RUNTIME_DIR", output):
        return ("\nthere is no systemd user session here (a container, or SSH without "
                "`loginctl enable-linger %s`?)" % os.environ.get("USER", "$USER"))
    if tool == "launchctl" and "Domain does not support" in output:
        return "\nlaunchctl needs your desktop login: log in on the Mac itself once, then re-run"
    return ""


def apply_actions(actions: List[ServiceAction]) -> None:
    for action in actions:
        if action.kind == "mkdir":
            os.makedirs(action.path, exist_ok=True)
        elif action.kind == "write":
            write_private_file(action.path, action.text)
        elif action.kind == "remove":
            try:
                os.unlink(action.path)
            except FileNotFoundError:
                pass
        else:
            for attempt in range(action.attempts):
                if attempt:
                    time.sleep(0.5)
                code, output = run_tool(action.argv)
                if code == 0:
                    break
            if code != 0 and not action.may_fail:
                raise ServiceError("`%s` failed (exit %d): %s%s" % (
                    " ".join(action.argv), code, output or "no output",
                    service_manager_hint(action.argv[0], output)))


def service_parser(command: str, description: str, serve_flags: bool) -> argparse.ArgumentParser:
    if serve_flags:
        parser = parser_for("claude-max-proxy " + command)
        parser.description = description
    else:
        parser = argparse.ArgumentParser(prog="claude-max-proxy " + command, description=description)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the files and commands, change nothing")
    parser.add_argument("--platform", choices=("macos", "linux"),
                        help="service kind: launchd (macos) or systemd (linux); default: this machine's")
    return parser


@dataclasses.dataclass
class ServiceSetup:
    """What install-service decided: the unit file, where it goes, and what to tell the user."""
    platform: str
    config: Config
    program: List[str]  # the interpreter and the .pyz or module file
    unit_path: str
    unit_text: str
    notes: List[str]


def service_setup_for(args: argparse.Namespace, environ: Dict[str, str], home: str) -> ServiceSetup:
    """Validate the flags as `serve` would and fill the template; raises ServiceError."""
    platform = args.platform or platform_of(sys.platform)
    given = {key: getattr(args, key) for key in (f.lstrip("-").replace("-", "_") for f, _, _ in OPTIONS)}
    for key in ("api_key_file", "workdir"):
        if given[key]:
            given[key] = os.path.abspath(os.path.expanduser(given[key]))
    try:
        # Only flags reach the service, so only flags are validated (not this shell's env vars).
        config = config_from(given, {k: v for k, v in environ.items() if not k.startswith(ENV_PREFIX)})
    except ConfigError as exc:
        raise ServiceError(str(exc))
    if config.port == 0:
        raise ServiceError("a service needs a fixed --port (0 picks a different one each start)")
    found = shutil.which(config.claude, path=environ.get("PATH"))
    if not found:
        raise ServiceError("the Claude CLI `%s` is not on PATH: install it (npm install -g "
                           "@anthropic-ai/claude-code) or pass --claude /path/to/claude" % config.claude)
    # Not resolved: the native installer's `claude` is a symlink to a versioned binary that
    # auto-updates replace, and the symlink is what stays valid.
    claude_path = os.path.abspath(found)
    environment = {"PATH": service_path_for(platform, claude_path,
                                            shutil.which("node", path=environ.get("PATH")))}
    for name in args.pass_env:
        if name not in environ:
            raise ServiceError("--pass-env %s: %s is not set here" % (name, name))
        # A dry run is printed, so it shows where a secret goes but not the secret.
        environment[name] = ("<value of %s>" % name) if args.dry_run else environ[name]
    program = program_argv_for(sys.executable, __file__)
    argv = program + service_args_for(given, config, claude_path)
    stop_timeout = int(config.shutdown_grace) + 10  # the proxy's own grace, then a margin
    if platform == "macos":
        unit_text = launchd_plist_for(argv, environment, home, stop_timeout)
    else:
        unit_text = systemd_unit_for(argv, environment, stop_timeout)
    unit_path = unit_path_for(platform, home)
    notes = []
    if given.get("api_key"):
        notes.append("the --api-key value is stored in %s and visible in `ps`; --api-key-file "
                     "keeps it out of both" % unit_path)
    if environ.get("CLAUDE_CODE_OAUTH_TOKEN") and "CLAUDE_CODE_OAUTH_TOKEN" not in args.pass_env:
        notes.append("CLAUDE_CODE_OAUTH_TOKEN is set here but the service will not see it; add "
                     "--pass-env CLAUDE_CODE_OAUTH_TOKEN to use it")
    if platform == "linux":
        notes.append("a user service stops when you log out unless lingering is on: "
                     "`loginctl enable-linger %s`" % environ.get("USER", "$USER"))
    return ServiceSetup(platform, config, program, unit_path, unit_text, notes)


def installed_message(setup: ServiceSetup, home: str) -> str:
    host = setup.config.host if ":" not in setup.config.host else "[%s]" % setup.config.host
    if setup.platform == "macos":
        kind, logs = "LaunchAgent", "tail -f %s" % shlex.quote(log_path_for(home))
    else:
        kind, logs = "systemd user service", "journalctl --user -u %s -f" % SERVICE_NAME
    return "installed %s: %s\n  serves http://%s:%d/v1\n  logs:  %s\n  check: %s doctor\n" % (
        kind, setup.unit_path, host, setup.config.port, logs,
        " ".join(shlex.quote(a) for a in setup.program))


def install_service_command(argv: List[str]) -> int:
    """Write and load a per-user service (LaunchAgent on macOS, systemd user unit on Linux)."""
    parser = service_parser(
        "install-service",
        "Run the proxy as a per-user service that starts at login and restarts if it stops: a "
        "LaunchAgent on macOS, a systemd user unit on Linux. Serve flags (--port, --host, "
        "--api-key-file, ...) are passed to the service; CLAUDE_MAX_PROXY_* variables are not.",
        serve_flags=True)
    parser.add_argument("--pass-env", action="append", default=[], metavar="NAME",
                        help="copy this variable's current value into the service, e.g. "
                             "CLAUDE_CODE_OAUTH_TOKEN (repeatable)")
    args = parser.parse_args(argv)
    home = os.path.expanduser("~")
    try:
        setup = service_setup_for(args, dict(os.environ), home)
    except ServiceError as exc:
        sys.stderr.write("claude-max-proxy install-service: %s\n" % exc)
        return 2
    actions = install_actions_for(setup.platform, os.getuid(), home, setup.unit_text,
                                  read_text(setup.unit_path))
    if args.dry_run:
        sys.stdout.write("install-service --dry-run: nothing is written or run.\n")
        sys.stdout.write(described_actions(actions))
    else:
        try:
            apply_actions(actions)
        except (ServiceError, OSError) as exc:
            sys.stderr.write("claude-max-proxy install-service: %s\n" % exc)
            return 1
        sys.stdout.write(installed_message(setup, home))
    for note in setup.notes:
        sys.stdout.write("note: %s\n" % note)
    return 0


def uninstall_service_command(argv: List[str]) -> int:
    """Stop and remove what install-service wrote."""
    parser = service_parser("uninstall-service",
                            "Stop the service install-service set up and remove its file "
                            "(log files stay).", serve_flags=False)
    args = parser.parse_args(argv)
    try:
        platform = args.platform or platform_of(sys.platform)
    except ServiceError as exc:
        sys.stderr.write("claude-max-proxy uninstall-service: %s\n" % exc)
        return 2
    home = os.path.expanduser("~")
    unit_path = unit_path_for(platform, home)
    installed = os.path.exists(unit_path)
    actions = uninstall_actions_for(platform, os.getuid(), home, installed)
    if args.dry_run:
        sys.stdout.write("uninstall-service --dry-run: nothing is removed or run.\n")
        sys.stdout.write(described_actions(actions))
        return 0
    try:
        apply_actions(actions)
    except (ServiceError, OSError) as exc:
        sys.stderr.write("claude-max-proxy uninstall-service: %s\n" % exc)
        return 1
    sys.stdout.write(("removed %s\n" % unit_path) if installed else
                     "no service file at %s; made sure nothing is loaded\n" % unit_path)
    return 0


# -- doctor: pure findings ----------------------------------------------------------------------

def processes_finding(config: Config, total: Optional[int], available: Optional[int]) -> Finding:
    """How many CLI processes this configuration runs and keeps, and the memory they may take."""
    gb = lambda size: "%.1f GB" % (size / 1e9)  # noqa: E731
    if not total:
        source = "the machine's memory is unknown: the fallback of %d" % FALLBACK_MAX_KEPT
    else:
        source = "%s RAM%s" % (gb(total), ", %s available" % gb(available) if available else "")
    kept = "%d kept between turns (--max-parked; %s)" % (config.max_parked, (
        "default from " + source) if config.max_parked == default_max_parked(total, available) else "as set")
    summary = "up to %d CLI processes answering (--max-concurrency), %s, up to %d warm per kind of " \
              "first turn (--warm)" % (config.max_concurrency, kept, config.warm)
    worst = (config.max_concurrency + max(config.max_parked, 0)) * CLI_PROCESS_BYTES
    if available and worst > available:
        return Finding("WARN", "processes", "%s: up to %s, more than the %s available" % (
            summary, gb(worst), gb(available)), "lower --max-parked (each kept CLI holds up to ~320 MB)")
    return Finding("OK", "processes", summary)


def python_finding(version_info: Tuple[int, ...], executable: str) -> Finding:
    version = ".".join(str(part) for part in version_info[:3])
    if tuple(version_info[:2]) < (3, 9):
        return Finding("FAIL", "python", "Python %s is too old (%s)" % (version, executable),
                       "run with Python 3.9 or newer")
    return Finding("OK", "python", "Python %s (%s)" % (version, executable))


def cli_version_finding(path: Optional[str], name: str, version_text: Optional[str],
                        error: Optional[str]) -> Finding:
    if not path:
        return Finding("FAIL", "claude", "the Claude CLI `%s` is not on PATH" % name,
                       "install it (npm install -g @anthropic-ai/claude-code, or see "
                       "https://docs.anthropic.com/en/docs/claude-code), or pass --claude PATH")
    if error:
        return Finding("FAIL", "claude", "%s does not run: %s" % (path, error),
                       "reinstall the Claude CLI, or pass --claude with a working one")
    low, high = SUPPORTED_CLI_VERSIONS
    supported = "supported: %s to before %s" % (".".join(map(str, low)), ".".join(map(str, high)))
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", version_text or "")
    if not match:
        return Finding("WARN", "claude", "%s prints an unknown version %r (%s)" % (
            path, version_text, supported), "check `%s --version`" % path)
    version = tuple(int(part) for part in match.groups())
    summary = "%s, version %s (%s)" % (path, ".".join(match.groups()), supported)
    if version < low:
        return Finding("FAIL", "claude", summary, "update it: `claude update` (or npm install -g "
                       "@anthropic-ai/claude-code@latest)")
    if version >= high:
        return Finding("WARN", "claude", summary + "; newer than this proxy was tested with",
                       "if requests fail, look for a newer claude-max-proxy")
    return Finding("OK", "claude", summary)


def login_finding(exit_code: int, output: str) -> Finding:
    """From `claude auth status --json` (no model call): exit 0 and loggedIn when usable."""
    start, end = output.find("{"), output.rfind("}")
    try:
        status = json.loads(output[start:end + 1]) if start >= 0 else None
    except ValueError:
        status = None
    if not isinstance(status, dict) or "loggedIn" not in status:
        return Finding("WARN", "login", "cannot tell: `claude auth status --json` exited %d: %s"
                       % (exit_code, output[-300:] or "no output"),
                       "run `claude auth status` yourself, or `doctor --live` for a real request")
    method = status.get("authMethod")
    if not status.get("loggedIn"):
        return Finding("FAIL", "login", "the Claude CLI is not logged in (authMethod %s)" % method,
                       "run `claude auth login` and sign in with your Claude Pro/Max account; for a "
                       "service, `claude setup-token` gives a CLAUDE_CODE_OAUTH_TOKEN to install with "
                       "--pass-env CLAUDE_CODE_OAUTH_TOKEN")
    if method == "claude.ai":
        plan = status.get("subscriptionType") or "unknown plan"
        who = status.get("email") or "your account"
        return Finding("OK", "login", "logged in to claude.ai as %s (%s)" % (who, plan))
    if method == "oauth_token":
        # The CLI takes any token at its word here; only a request (`--live`) tests it.
        return Finding("OK", "login", "an OAuth token is set (CLAUDE_CODE_OAUTH_TOKEN or "
                       "ANTHROPIC_AUTH_TOKEN); `doctor --live` proves it works")
    if method == "api_key":
        source = status.get("apiKeySource") or "an API key"
        if source == "ANTHROPIC_API_KEY":
            return Finding("OK", "login", "logged in with an API key from ANTHROPIC_API_KEY "
                           "(see the billing line)")
        return Finding("WARN", "login", "logged in with an Anthropic Console API key (%s): usage "
                       "is billed to the API, not a subscription" % source,
                       "run `claude auth login` and choose your Claude Pro/Max account")
    return Finding("OK", "login", "logged in (authMethod %s, provider %s)" % (
        method, status.get("apiProvider")))


def ignored_api_keys(config: Config, environ: Dict[str, str]) -> List[str]:
    """The API credentials in our environment that the CLI does not get (no --use-api-key)."""
    return [] if config.use_api_key else [name for name in API_KEY_NAMES if environ.get(name)]


def names_are(names: List[str]) -> str:
    """"A is" or "A and B are": for messages about the variables that are set."""
    return "%s %s" % (" and ".join(names), "are" if len(names) > 1 else "is")


def api_key_finding(environ: Dict[str, str], config: Config) -> Finding:
    present = [name for name in API_KEY_NAMES if environ.get(name)]
    if present and config.use_api_key:
        return Finding("WARN", "billing", "%s set and --use-api-key is on: the CLI bills that API "
                       "account, not your Claude subscription" % names_are(present),
                       "drop --use-api-key (CLAUDE_MAX_PROXY_USE_API_KEY) to use the subscription")
    if present:
        return Finding("OK", "billing", "%s set but ignored: the CLI uses your subscription login "
                       "(--use-api-key would bill that API account instead)" % names_are(present))
    return Finding("OK", "billing", "no ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN: requests use your login")


def port_finding(host: str, port: int, health: Optional[Dict[str, Any]],
                 bind_error: Optional[str]) -> Finding:
    where = "%s:%d" % (host, port)
    if health is not None:
        claude = health.get("claude") or {}
        if claude.get("error"):
            return Finding("FAIL", "port", "claude-max-proxy %s answers on %s but cannot run the "
                           "CLI: %s" % (health.get("version"), where, claude["error"]),
                           "reinstall the service (install-service records claude's absolute path), "
                           "or start the proxy with --claude /path/to/claude")
        limits = "; %s" % limit_summary(health["limits"]) if "limits" in health else ""
        return Finding("OK", "port", "claude-max-proxy %s is answering on %s (CLI %s%s)" % (
            health.get("version"), where, claude.get("version") or "not probed yet", limits))
    if bind_error is None:
        return Finding("OK", "port", "%s is free" % where)
    return Finding("FAIL", "port", "%s is taken by another program (%s)" % (where, bind_error),
                   "stop that program, or choose another --port (for the service too)")


def limit_summary(state: Optional[Dict[str, Any]]) -> str:
    """The plan-limit state a running proxy reports in /health, in a few words (no model call)."""
    if not state:
        return "no plan limit reported yet"
    used = state.get("utilization")
    return "plan limit %s: %s%s, resets %s%s" % (
        state.get("window") or "-", state.get("status"),
        " at %d%%" % round(used * 100) if isinstance(used, (int, float)) else "",
        utc_time(state["resets_at"]), ", extra usage in use" if state.get("overage_in_use") else "")


def flag_value(argv: List[str], flag: str) -> Optional[str]:
    return next((value for name, value in zip(argv, argv[1:]) if name == flag), None)


def service_finding(platform: str, home: str, argv: Optional[List[str]], missing: List[str],
                    state: str) -> Finding:
    """`argv` is what the installed unit runs (None: not installed); `state` e.g. running."""
    unit_path = unit_path_for(platform, home)
    if argv is None:
        return Finding("OK", "service", "not installed (optional: `install-service` runs the "
                       "proxy at login)")
    if not argv or missing:
        return Finding("FAIL", "service", "%s runs %s" % (
            unit_path, ("%s, which no longer exist(s)" % ", ".join(missing)) if missing
            else "nothing this doctor can read"),
            "re-run install-service with the installation you use now")
    port = flag_value(argv, "--port") or str(DEFAULT_PORT)
    if state == "running":
        return Finding("OK", "service", "installed and running on port %s (%s)" % (port, unit_path))
    if platform == "macos":
        look = "see %s; reload it with install-service" % log_path_for(home)
    else:
        look = "see `systemctl --user status %s` and `journalctl --user -u %s`" % (
            SERVICE_NAME, SERVICE_NAME)
    return Finding("WARN", "service", "installed but %s (%s)" % (state, unit_path), look)


def live_finding(status: Optional[int], body: bytes, elapsed: float, url: str) -> Finding:
    if status is None:
        return Finding("FAIL", "live", "nothing answers at %s: %s" % (url, body.decode("utf-8", "replace")),
                       "start the proxy (or `install-service`), then run doctor --live again")
    try:
        answer = json.loads(body.decode("utf-8"))
    except ValueError:
        answer = None
    if status == 200 and isinstance(answer, dict) and answer.get("choices"):
        text = (answer["choices"][0].get("message") or {}).get("content") or ""
        return Finding("OK", "live", "round trip through %s in %.1f s: %r" % (url, elapsed, text[:60]))
    error = (answer or {}).get("error") if isinstance(answer, dict) else None
    message = error.get("message") if isinstance(error, dict) else body[:300].decode("utf-8", "replace")
    fixes = {401: "if the message is about the proxy's own key, give doctor --api-key-file; "
                  "otherwise log the CLI in (see the login line)",
             429: "the subscription's usage limit is reached: wait for the reset the message names",
             402: "extra usage (billing): see the README section \"Limits, extra usage and billing\""}
    return Finding("FAIL", "live", "HTTP %d from %s: %s" % (status, url, message),
                   fixes.get(status, "see the proxy's log for the request"))


def doctor_report(findings: List[Finding]) -> Tuple[str, int]:
    """The printed report and the exit code (1 if anything FAILed)."""
    lines = []
    for finding in findings:
        lines.append("%-5s %-8s %s" % (finding.status, finding.check, finding.summary))
        if finding.fix and finding.status != "OK":
            lines.append("%14s %s" % ("fix:", finding.fix))
    failed = sum(f.status == "FAIL" for f in findings)
    warned = sum(f.status == "WARN" for f in findings)
    lines.append("%d problem(s), %d warning(s)" % (failed, warned) if failed or warned
                 else "all good")
    return "\n".join(lines) + "\n", 1 if failed else 0


# -- doctor: probes (I/O) -----------------------------------------------------------------------

def connect_host(host: str) -> str:
    """Where to reach a server bound to `host` (a wildcard address is reached on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def proxy_health(host: str, port: int) -> Optional[Dict[str, Any]]:
    """/health of a claude-max-proxy on host:port, or None if something else (or nothing) is there."""
    conn = http.client.HTTPConnection(connect_host(host), port, timeout=5)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        body = response.read()
        if not (response.getheader("Server") or "").startswith("claude-max-proxy/"):
            return None
        health = json.loads(body.decode("utf-8"))
        return health if isinstance(health, dict) else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def port_bind_error(host: str, port: int) -> Optional[str]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        sock.bind((host, port))
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        sock.close()


def missing_paths(argv: List[str]) -> List[str]:
    """The interpreter, program and CLI of a service command that are gone (moved, uninstalled)."""
    paths = argv[:2] + [flag_value(argv, "--claude") or ""]
    return [p for p in paths if p and not (os.path.isabs(p) and os.path.exists(p))]


def installed_service_argv(platform: str, unit_path: str) -> Optional[List[str]]:
    text = read_text(unit_path)
    if text is None:
        return None
    if platform == "macos":
        import plistlib  # only here: it loads an XML parser that serving never needs
        try:
            return list(plistlib.loads(text.encode("utf-8")).get("ProgramArguments") or [])
        except Exception:  # plistlib raises several types for a damaged file
            return []
    return argv_from_systemd_unit(text)


def service_state(platform: str) -> str:
    if platform == "macos":
        code, output = run_tool(["launchctl", "print", "gui/%d/%s" % (os.getuid(), LAUNCHD_LABEL)], 15)
        if code != 0:
            return "not loaded"
        return "running" if re.search(r"^\s*state = running", output, re.M) else "stopped"
    code, output = run_tool(["systemctl", "--user", "is-active", SERVICE_NAME + ".service"], 15)
    state = output.strip().splitlines()[-1] if output.strip() else "unknown"
    return "running" if code == 0 and state == "active" else "not running (%s)" % state


def live_round_trip(host: str, port: int, api_key: Optional[str]) -> Tuple[Optional[int], bytes, float]:
    """One short completion through the proxy: (HTTP status or None, body or error, seconds)."""
    body = json.dumps({"model": LIVE_CHECK_MODEL, "messages": [
        {"role": "user", "content": "Reply with the single word: pong"}]}).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = "Bearer " + api_key
    started = time.monotonic()
    conn = http.client.HTTPConnection(connect_host(host), port, timeout=180)
    try:
        conn.request("POST", "/v1/chat/completions", body, headers)
        response = conn.getresponse()
        return response.status, response.read(), time.monotonic() - started
    except (OSError, http.client.HTTPException) as exc:
        return None, str(exc).encode("utf-8"), time.monotonic() - started
    finally:
        conn.close()


def claude_findings(name: str, environ: Dict[str, str]) -> List[Finding]:
    """The CLI: found, its version, and its login (`auth status` spends no model call)."""
    path = shutil.which(name, path=environ.get("PATH"))
    if not path:
        return [cli_version_finding(None, name, None, None)]
    code, output = run_tool([path, "--version"], 60, environ)
    if code != 0:
        return [cli_version_finding(path, name, None, "`--version` exited %d: %s" % (code, output[-300:]))]
    return [cli_version_finding(path, name, output, None),
            login_finding(*run_tool([path, "auth", "status", "--json"], 60, environ))]


def port_check(host: str, port: int) -> Finding:
    health = proxy_health(host, port)
    return port_finding(host, port, health, None if health else port_bind_error(host, port))


def service_check(platform: Optional[str]) -> Finding:
    try:
        platform = platform or platform_of(sys.platform)
    except ServiceError as exc:
        return Finding("WARN", "service", str(exc))
    home = os.path.expanduser("~")
    argv = installed_service_argv(platform, unit_path_for(platform, home))
    state = service_state(platform) if argv is not None else "not installed"
    return service_finding(platform, home, argv, missing_paths(argv or []), state)


def live_check(config: Config) -> Finding:
    host = connect_host(config.host)
    url = "http://%s:%d/v1/chat/completions" % ("[%s]" % host if ":" in host else host, config.port)
    status, body, elapsed = live_round_trip(config.host, config.port,
                                            config.api_keys[0] if config.api_keys else None)
    return live_finding(status, body, elapsed, url)


def doctor_command(argv: List[str]) -> int:
    """Check the installation and explain each problem with its fix; non-zero exit on FAIL."""
    parser = parser_for("claude-max-proxy doctor")
    parser.description = ("Check what the proxy needs (Python, the Claude CLI and its login, the "
                          "port, the service) and say how to fix each problem. Takes the serve "
                          "flags (--port, --claude, ...) to check that configuration. Exits 1 if "
                          "anything FAILs.")
    parser.add_argument("--live", action="store_true",
                        help="also send one short request through the running proxy (one model call)")
    parser.add_argument("--platform", choices=("macos", "linux"),
                        help="service kind to look for (default: this machine's)")
    args = parser.parse_args(argv)
    environ = dict(os.environ)
    findings = [python_finding(sys.version_info, sys.executable)]
    given = {key: getattr(args, key) for key in (f.lstrip("-").replace("-", "_") for f, _, _ in OPTIONS)}
    try:
        config = config_from(given, environ)
    except ConfigError as exc:
        findings.append(Finding("FAIL", "config", str(exc), "fix the flag or environment variable"))
        config = Config()
    findings.append(processes_finding(config, *machine_memory()))
    findings += claude_findings(config.claude, cli_base_env(config, environ))  # as a request's CLI sees it
    findings.append(api_key_finding(environ, config))
    findings.append(port_check(config.host, config.port))
    findings.append(service_check(args.platform))
    if args.live:
        findings.append(live_check(config))
    report, code = doctor_report(findings)
    sys.stdout.write("claude-max-proxy %s doctor\n%s" % (__version__, report))
    return code


# ================================================================================================
# main()
# ================================================================================================

def parser_for(prog: str = "claude-max-proxy") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="OpenAI-compatible API on localhost, answered by the Claude Code CLI. Every flag "
                    "can also be set as an environment variable CLAUDE_MAX_PROXY_<FLAG>. Other "
                    "commands: doctor, install-service, uninstall-service (each has --help).")
    parser.add_argument("--version", action="version", version="claude-max-proxy " + __version__)
    for flag, kind, help_text in OPTIONS:
        help_text = "%s [env %s]" % (help_text, env_name(flag))
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)
    return parser


def serve_command(argv: List[str]) -> int:
    args = parser_for().parse_args(argv)
    try:
        config = config_from(vars(args), dict(os.environ))
        return serve(config)
    except ConfigError as exc:
        sys.stderr.write("claude-max-proxy: %s\n" % exc)
        return 2
    except OSError as exc:
        sys.stderr.write("claude-max-proxy: cannot listen: %s\n" % exc)
        return 1


COMMANDS = {
    "serve": serve_command,
    "doctor": doctor_command,
    "install-service": install_service_command,
    "uninstall-service": uninstall_service_command,
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "serve"
    return COMMANDS[command](argv)


if __name__ == "__main__":
    sys.exit(main())
