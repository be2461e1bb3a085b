#!/usr/bin/env python3
"""A stand-in ``claude`` executable for the faults the real Claude Code CLI cannot produce on demand.

It speaks the CLI's ``-p --input-format stream-json --output-format stream-json`` protocol: one
JSON user message per stdin line, one "turn" of stream-json lines on stdout per message, exit 0
at stdin EOF. Unknown flags are ignored (but logged). Stdlib only; runs on Python 3.9+.

The mode of a turn comes from the marker ``@@fake:MODE@@`` in the user text (so parallel tests
never share state), else the env var ``FAKE_CLAUDE_MODE``, else ``text``.

Modes:
  text                "Hello from the fake CLI." in 5 deltas (default)
  words:N             N deltas "w0 ", "w1 ", ... as fast as possible (stdout flushed every 64 lines)
  slow:SECONDS        like text, but sleeps SECONDS before each delta
  stall:SECONDS       like text, but silent for SECONDS after the first delta (default 6)
  crash               "fatal: something broke" on stderr, exit 3 before any stdout
  crash_mid           init, message_start, two deltas, then exit 3 (no result; a line on stderr)
  hang                init, then sleep until killed
  hang_child          spawn a grandchild ``sleep 1000`` in our process group, init, sleep until killed
  garbage             non-JSON lines (text, raw bytes, truncated JSON), then exit 0 without a result
  error_result:STATUS the real CLI's upstream-error shape with api_error_status STATUS, exit 1
  error_mid           init, message_start, two deltas, then an is_error result (status 500), exit 1
  max_tokens          a few deltas, then stop_reason "max_tokens"
  ignore_stdin_eof    answer like text, but keep running after stdin EOF (sleep until killed)
  echo_args           answer with JSON {"argv", "cwd", "stdin"} in 200-character deltas

Other invocations: ``--version`` prints the version; ``auth status [--json]`` prints logged-in JSON.

Environment:
  FAKE_CLAUDE_MODE     default mode for turns without a marker
  FAKE_CLAUDE_LOG      file to append JSON lines to: one at start ("event": "start") and one after
                       every stdin line ("event": "stdin"), each a full snapshot of argv, cwd, pid,
                       selected env vars and all stdin lines received so far (parsed JSON objects);
                       the last line with a given pid is that process's latest state
  FAKE_CLAUDE_PIDFILE  file to append our pid to at start, and the pid of every child we spawn
                       (one per line), so tests can check everything was reaped
"""

import json
import os
import re
import subprocess
import sys
import time
import uuid

VERSION = "2.1.332"
MODEL = "claude-sonnet-5-5"
INPUT_TOKENS = 12
HELLO_PIECES = ["Hello ", "from ", "the ", "fake ", "CLI."]
MARKER = re.compile(r"@@fake:(.*?)@@", re.S)
# Only these are logged: enough to check what the proxy passes or strips, not the whole env.
LOGGED_ENV_KEYS = (
    "CLAUDE_CODE_MAX_OUTPUT_TOKENS",
    "CLAUDE_CODE_MAX_RETRIES",
    "ANTHROPIC_API_KEY",
    "CLAUDE_CODE_OAUTH_TOKEN",
)
# The words:N benchmark writes ~100k lines; one write+flush per line would measure us, not the proxy.
BULK_FLUSH_EVERY = 64
# Upstream error kinds for error_result:STATUS, as the Anthropic API names them.
API_ERRORS = {
    400: ("invalid_request_error", "Invalid request"),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your account does not have permission"),
    404: ("not_found_error", "Not found"),
    429: ("rate_limit_error", "Number of request tokens has exceeded your rate limit"),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


class UsageError(Exception):
    """A mode or stdin line the fake does not understand: a bug in the test or the proxy."""


# ---------------------------------------------------------------------------------------------
# Bookkeeping for tests: invocation log and pidfile
# ---------------------------------------------------------------------------------------------

def append_line(path, line):
    """Append one line with a single O_APPEND write, so concurrent fakes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def log_invocation(event, stdin_lines):
    """Append a snapshot of this invocation to FAKE_CLAUDE_LOG (if set)."""
    path = os.environ.get("FAKE_CLAUDE_LOG")
    if not path:
        return
    record = {
        "event": event,
        "argv": sys.argv[1:],
        "cwd": os.getcwd(),
        "pid": os.getpid(),
        "env": {key: os.environ[key] for key in LOGGED_ENV_KEYS if key in os.environ},
        "stdin": stdin_lines,
    }
    append_line(path, json.dumps(record))


def record_pid(pid):
    """Append a pid to FAKE_CLAUDE_PIDFILE (if set)."""
    path = os.environ.get("FAKE_CLAUDE_PIDFILE")
    if path:
        append_line(path, str(pid))


# ---------------------------------------------------------------------------------------------
# Output: the CLI's stream-json lines
# ---------------------------------------------------------------------------------------------

class Transcript:
    """Writes one process's stream-json lines; session id and model stay fixed across turns."""

    def __init__(self, out, session_id):
        self.out = out
        self.session_id = session_id
        self.flush_every = 1
        self.pending = []
        # Cheap unique ids in UUID shape: a random prefix plus a counter (uuid4() per line
        # would dominate the words:N benchmark).
        self.uuid_prefix = str(uuid.uuid4())[:-12]
        self.uuid_count = 0
        tail = ',"session_id":%s,"parent_tool_use_id":null,"uuid":"' % json.dumps(session_id)
        self.delta_head = ('{"type":"stream_event","event":{"type":"content_block_delta",'
                           '"index":0,"delta":{"type":"text_delta","text":')
        self.delta_tail = "}}" + tail

    def new_uuid(self):
        self.uuid_count += 1
        return "%s%012x" % (self.uuid_prefix, self.uuid_count)

    # -- writing ----------------------------------------------------------------------------

    def write_line(self, line):
        self.pending.append(line)
        if len(self.pending) >= self.flush_every:
            self.flush()

    def write(self, obj):
        self.write_line(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))

    def write_bytes(self, data):
        """Raw bytes, bypassing JSON: for the garbage mode."""
        self.flush()
        self.out.write(data)
        self.out.flush()

    def flush(self):
        if self.pending:
            self.out.write(("\n".join(self.pending) + "\n").encode("utf-8"))
            self.pending = []
        self.out.flush()

    # -- lines ------------------------------------------------------------------------------

    def init(self):
        self.write({
            "type": "system", "subtype": "init", "cwd": os.getcwd(),
            "session_id": self.session_id, "tools": [], "mcp_servers": [], "model": MODEL,
            "permissionMode": "default", "claude_code_version": VERSION, "uuid": self.new_uuid(),
        })

    def stream_event(self, event):
        self.write({"type": "stream_event", "event": event, "session_id": self.session_id,
                    "parent_tool_use_id": None, "uuid": self.new_uuid()})

    def text_delta(self, text):
        # Prebuilt template: only the text goes through json.dumps (see words:N).
        self.write_line(self.delta_head + json.dumps(text, ensure_ascii=False)
                        + self.delta_tail + self.new_uuid() + '"}')

    def assistant(self, message):
        self.write({"type": "assistant", "message": message, "parent_tool_use_id": None,
                    "session_id": self.session_id, "uuid": self.new_uuid()})

    def result(self, text, stop_reason, started, output_tokens, api_error_status=None):
        line = {
            "type": "result", "subtype": "success", "is_error": api_error_status is not None,
            "api_error_status": api_error_status,
            "duration_ms": int((time.monotonic() - started) * 1000), "num_turns": 1,
            "result": text, "stop_reason": stop_reason, "session_id": self.session_id,
            "total_cost_usd": 0.0,
            "usage": {"input_tokens": INPUT_TOKENS if output_tokens else 0,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                      "output_tokens": output_tokens},
            "uuid": self.new_uuid(),
        }
        if api_error_status is not None:
            line["terminal_reason"] = "api_error"
        self.write(line)
        self.flush()


def message_of(message_id, model, content, stop_reason, output_tokens):
    """An Anthropic message object as the CLI embeds it in message_start and assistant lines."""
    return {
        "id": message_id, "type": "message", "role": "assistant", "model": model,
        "content": content, "stop_reason": stop_reason,
        "stop_sequence": "" if stop_reason == "stop_sequence" else None,
        "usage": {"input_tokens": INPUT_TOKENS if model == MODEL else 0,
                  "output_tokens": output_tokens,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    }


def start_message(transcript):
    """Emit message_start and the text block's start; return the message id."""
    message_id = "msg_fake_" + transcript.new_uuid().replace("-", "")[-16:]
    transcript.stream_event({"type": "message_start",
                             "message": message_of(message_id, MODEL, [], None, 1)})
    transcript.stream_event({"type": "content_block_start", "index": 0,
                             "content_block": {"type": "text", "text": ""}})
    return message_id


def stream_answer(transcript, pieces, stop_reason="end_turn", delay=0.0, pause_after_first=0.0):
    """A complete successful turn streaming `pieces` as text deltas, ending in a result line."""
    started = time.monotonic()
    transcript.init()
    message_id = start_message(transcript)
    sent = []
    for piece in pieces:
        if delay:
            time.sleep(delay)
        transcript.text_delta(piece)
        sent.append(piece)
        if pause_after_first and len(sent) == 1:
            time.sleep(pause_after_first)
    text = "".join(sent)
    output_tokens = len(sent)
    # The real CLI emits the whole assistant message before the block/message stop events.
    transcript.assistant(message_of(message_id, MODEL, [{"type": "text", "text": text}],
                                    None, output_tokens))
    transcript.stream_event({"type": "content_block_stop", "index": 0})
    transcript.stream_event({"type": "message_delta",
                             "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                             "usage": {"output_tokens": output_tokens}})
    transcript.stream_event({"type": "message_stop"})
    transcript.result(text, stop_reason, started, output_tokens)


def api_error_text(status):
    """The CLI's human text for an upstream error (tests must not depend on it; see STYLE.md)."""
    kind, message = API_ERRORS.get(status, ("api_error", "Upstream error"))
    if status == 429:
        return "API Error: Request rejected (429) · " + message
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return "API Error: %d %s" % (status, json.dumps(body, separators=(",", ":")))


# ---------------------------------------------------------------------------------------------
# Turns: one function per mode, each given (transcript, argument, user line)
# ---------------------------------------------------------------------------------------------

class Exit(Exception):
    """End the process right after this turn with `code`, without waiting for stdin EOF."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code


class LingerAfterEof(Exception):
    """Marker that this process must keep running after stdin EOF (ignore_stdin_eof)."""


def sleep_forever():
    # Default signal dispositions on purpose: SIGTERM and SIGKILL must end us.
    while True:
        time.sleep(3600)


def number_arg(arg, default, kind=int):
    """A mode's numeric argument (``words:N``), with a clear error instead of a traceback."""
    if not arg:
        return default
    try:
        return kind(arg)
    except ValueError:
        raise UsageError("mode argument %r is not a number" % arg)


def turn_text(transcript, arg, user_line):
    stream_answer(transcript, HELLO_PIECES)


def turn_words(transcript, arg, user_line):
    count = number_arg(arg, 100)
    transcript.flush_every = BULK_FLUSH_EVERY
    try:
        stream_answer(transcript, ("w%d " % i for i in range(count)))
    finally:
        transcript.flush_every = 1


def turn_slow(transcript, arg, user_line):
    stream_answer(transcript, HELLO_PIECES, delay=number_arg(arg, 0.2, float))


def turn_stall(transcript, arg, user_line):
    stream_answer(transcript, HELLO_PIECES, pause_after_first=number_arg(arg, 6.0, float))


def turn_crash(transcript, arg, user_line):
    sys.stderr.write("fatal: something broke\n")
    raise Exit(3)


def turn_crash_mid(transcript, arg, user_line):
    transcript.init()
    start_message(transcript)
    transcript.text_delta("Hello ")
    transcript.text_delta("from ")
    sys.stderr.write("fatal: crashed mid-stream\n")
    raise Exit(3)


def turn_hang(transcript, arg, user_line):
    transcript.init()
    transcript.flush()
    sleep_forever()


def turn_hang_child(transcript, arg, user_line):
    # Same process group (no start_new_session) and no inherited pipes: only a proxy that kills
    # the whole group reaps it, and a proxy that forgets still sees its own pipes close.
    child = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record_pid(child.pid)
    turn_hang(transcript, arg, user_line)


def turn_garbage(transcript, arg, user_line):
    transcript.write_bytes(b"this is not json\n")
    transcript.write_bytes(b"\x00\xff\xfe\x80 binary junk\n")
    transcript.write_bytes(b'{"type":\n')
    # The last line has no newline: readers must cope with a truncated final line at EOF.
    transcript.write_bytes(b'{"type":"result","subtype":"succ')
    raise Exit(0)


def turn_error_result(transcript, arg, user_line):
    status = number_arg(arg, 429)
    started = time.monotonic()
    text = api_error_text(status)
    transcript.init()
    transcript.assistant(message_of(str(uuid.uuid4()), "<synthetic>",
                                    [{"type": "text", "text": text}], "stop_sequence", 0))
    transcript.result(text, "stop_sequence", started, 0, api_error_status=status)
    raise Exit(1)


def turn_error_mid(transcript, arg, user_line):
    started = time.monotonic()
    transcript.init()
    start_message(transcript)
    transcript.text_delta("Hello ")
    transcript.text_delta("from ")
    transcript.result(api_error_text(500), "stop_sequence", started, 2, api_error_status=500)
    raise Exit(1)


def turn_max_tokens(transcript, arg, user_line):
    stream_answer(transcript, ["This ", "answer ", "is ", "cut"], stop_reason="max_tokens")


def turn_ignore_stdin_eof(transcript, arg, user_line):
    stream_answer(transcript, HELLO_PIECES)
    raise LingerAfterEof()


def turn_echo_args(transcript, arg, user_line):
    text = json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "stdin": user_line})
    stream_answer(transcript, [text[i:i + 200] for i in range(0, len(text), 200)])


TURNS = {
    "text": turn_text,
    "words": turn_words,
    "slow": turn_slow,
    "stall": turn_stall,
    "crash": turn_crash,
    "crash_mid": turn_crash_mid,
    "hang": turn_hang,
    "hang_child": turn_hang_child,
    "garbage": turn_garbage,
    "error_result": turn_error_result,
    "error_mid": turn_error_mid,
    "max_tokens": turn_max_tokens,
    "ignore_stdin_eof": turn_ignore_stdin_eof,
    "echo_args": turn_echo_args,
}


# ---------------------------------------------------------------------------------------------
# Input: stdin lines and the mode they ask for
# ---------------------------------------------------------------------------------------------

def text_of(content):
    """The text of a user message's content (a string or a list of blocks)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "".join(block.get("text", "") for block in content
                   if isinstance(block, dict) and block.get("type") == "text")


def mode_for(user_line):
    """The turn's mode: the first @@fake:MODE@@ marker, else FAKE_CLAUDE_MODE, else text."""
    message = user_line.get("message") or {}
    found = MARKER.search(text_of(message.get("content")))
    if found:
        return found.group(1).strip()
    return os.environ.get("FAKE_CLAUDE_MODE") or "text"


def turn_for(mode):
    """The turn function and its argument for a mode like ``words:100``."""
    name, _, arg = mode.partition(":")
    if name not in TURNS:
        raise UsageError("unknown mode %r (known: %s)" % (mode, ", ".join(sorted(TURNS))))
    return TURNS[name], arg


def parse_line(raw):
    try:
        line = json.loads(raw.decode("utf-8"))
    except ValueError as error:
        raise UsageError("stdin line is not JSON (%s): %r" % (error, raw[:200]))
    if not isinstance(line, dict):
        raise UsageError("stdin line is not a JSON object: %r" % raw[:200])
    return line


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

def flag_value(argv, name):
    """The value of ``--name VALUE`` or ``--name=VALUE`` in argv, else None."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1:]
    return None


def session_id_for(argv):
    """Like the CLI: --session-id wins, --resume keeps its id unless forking, else a new one."""
    explicit = flag_value(argv, "--session-id")
    if explicit:
        return explicit
    resumed = flag_value(argv, "--resume")
    if resumed and "--fork-session" not in argv:
        return resumed
    return str(uuid.uuid4())


def run_stream_json(argv, stdin, stdout):
    """Answer each stdin user line with one turn; return the exit code."""
    transcript = Transcript(stdout, session_id_for(argv))
    received = []
    linger = False
    while True:
        raw = stdin.readline()
        if not raw:
            break
        if not raw.strip():
            continue
        line = parse_line(raw)
        received.append(line)
        log_invocation("stdin", received)
        if line.get("type") == "control_request" and (line.get("request") or {}).get("subtype") == "initialize":
            # The SDK handshake, answered as the real CLI does once it has loaded.
            transcript.write({"type": "control_response", "response": {
                "subtype": "success", "request_id": line.get("request_id"), "response": {"commands": []}}})
            transcript.flush()
            continue
        if line.get("type") != "user":
            continue  # other control messages: accepted and logged, nothing to answer
        turn, arg = turn_for(mode_for(line))
        try:
            turn(transcript, arg, line)
        except LingerAfterEof:
            linger = True
        except Exit as exit_:
            transcript.flush()
            return exit_.code
    transcript.flush()
    if linger:
        sleep_forever()
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    record_pid(os.getpid())
    log_invocation("start", [])
    if "--version" in argv or "-v" in argv:
        print("%s (Claude Code)" % VERSION)
        return 0
    if argv[:2] == ["auth", "status"]:
        print(json.dumps({"loggedIn": True, "authMethod": "fake"}))
        return 0
    try:
        return run_stream_json(argv, sys.stdin.buffer, sys.stdout.buffer)
    except UsageError as error:
        sys.stderr.write("fake_claude: %s\n" % error)
        return 2
    except BrokenPipeError:
        return 1  # the reader went away, as when the proxy cancels a request


def exit_now(code):
    """Exit without interpreter cleanup, which would retry flushing a possibly broken stdout."""
    try:
        sys.stdout.flush()
    except OSError:
        pass
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
