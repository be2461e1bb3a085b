"""A fake Anthropic Messages API on loopback, for driving the real Claude Code CLI in tests.

The scenario of a request is picked by a marker in the text of its last user message,
``@@scenario:NAME@@`` (so parallel tests never share state), else by ``server.default_scenario``.
Every request body is logged in ``server.requests`` (method, path, headers, parsed JSON).

Scenarios:
  text        stream "Hello from the fake upstream." a few tokens at a time (default)
  say:WORDS   stream exactly WORDS (underscores become spaces), one word per delta
  slow        like text, but wait ``slow_delay`` seconds between deltas
  hang        send message_start, then nothing until the client goes away
  thinking    a thinking block, then text
  tool_use    call the tool named in ``@@tool:NAME@@`` (else the first offered tool) with the
              JSON in ``@@args:{...}@@`` (else {}); after a tool_result, answer "tool said: <result>"
  read_file   ask for the CLI's own Read tool on the path in ``@@path:/x@@`` (host-tools test)
  echo        answer with the JSON of the request body itself
  long:N      stream N deltas of "tok " as fast as possible
  max_tokens  stop with stop_reason max_tokens
  401 403 429 500 529   the matching HTTP error (429 with retry-after: 7)
  drop        start the stream, then close the connection mid-message

Subscription limits, with the `anthropic-ratelimit-unified-*` headers Anthropic sends to an OAuth
login (the CLI turns them into a `rate_limit_event`); =N sets the window's reset N seconds ahead
(default 3600):
  limit_rejected=N   429: the 5-hour limit is reached, no extra usage
  limit_warning=N    200: answer normally, 5-hour window at 92% (surpassed the 0.9 threshold)
  overage_in_use=N   200: answer normally, the 5-hour limit is reached and extra usage pays
  extra_usage_400    400: "Third-party apps now draw from your extra usage..." (billing classifier)
  out_of_extra_usage 400: "You're out of extra usage..."
  prompt_too_long    400: the prompt exceeds the context window
"""

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARKER = re.compile(r"@@(\w+):(.*?)@@", re.S)
ERRORS = {
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your account does not have permission"),
    429: ("rate_limit_error", "Number of request tokens has exceeded your rate limit"),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}
UNIFIED = "anthropic-ratelimit-unified-"
# Classifier and context errors: (status, Anthropic error type, message), as users report them.
REFUSALS = {
    "extra_usage_400": (400, "invalid_request_error",
                        "Third-party apps now draw from your extra usage, not your plan limits. "
                        "Add extra usage to keep going."),
    "out_of_extra_usage": (400, "invalid_request_error",
                           "You're out of extra usage. Add more at claude.ai/settings/usage."),
    "prompt_too_long": (400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"),
}


def unified_headers(scenario, reset_in):
    """The subscription-limit headers for a limit scenario, with the window resetting in `reset_in` s."""
    reset = str(int(time.time()) + reset_in)
    week = str(int(time.time()) + 6 * 86400)
    base = [(UNIFIED + "reset", reset), (UNIFIED + "5h-reset", reset), (UNIFIED + "7d-reset", week),
            (UNIFIED + "representative-claim", "five_hour"), (UNIFIED + "7d-utilization", "0.41"),
            (UNIFIED + "7d-status", "allowed")]
    if scenario == "limit_rejected":
        return base + [(UNIFIED + "status", "rejected"), (UNIFIED + "5h-utilization", "1.0"),
                       (UNIFIED + "5h-status", "rejected"), (UNIFIED + "overage-status", "rejected"),
                       (UNIFIED + "overage-disabled-reason", "out_of_credits")]
    if scenario == "limit_warning":
        return base + [(UNIFIED + "status", "allowed_warning"), (UNIFIED + "5h-utilization", "0.92"),
                       (UNIFIED + "5h-surpassed-threshold", "0.9"), (UNIFIED + "5h-status", "allowed_warning"),
                       (UNIFIED + "overage-status", "allowed")]
    if scenario == "overage_in_use":
        return base + [(UNIFIED + "status", "rejected"), (UNIFIED + "5h-utilization", "1.0"),
                       (UNIFIED + "5h-status", "rejected"), (UNIFIED + "overage-status", "allowed"),
                       (UNIFIED + "overage-in-use", "true"), (UNIFIED + "overage-reset", week)]
    return [(UNIFIED + "status", "allowed"), (UNIFIED + "reset", reset), (UNIFIED + "5h-utilization", "0.1")]


def text_of(content):
    """Concatenate the text of a message's content (string or list of blocks)."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") == "tool_result":
            parts.append(text_of(block.get("content")))
    return "".join(parts)


def last_user_message(body):
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            return message
    return {}


def markers_of(body):
    """The @@key:value@@ markers in the last user turn that carries text (tool results skip)."""
    found = {}
    for message in body.get("messages") or []:
        if message.get("role") == "user":
            for key, value in MARKER.findall(text_of(message.get("content"))):
                found[key] = value
    return found


def tool_results_after_last_call(body):
    """Tool results the user side sent after the assistant's latest tool call (any user turn)."""
    messages = body.get("messages") or []
    last_call = max([i for i, m in enumerate(messages) if m.get("role") == "assistant"
                     and any(b.get("type") == "tool_use" for b in m.get("content") or [] if isinstance(b, dict))]
                    or [-1])
    found = []
    for message in messages[last_call + 1:]:
        if message.get("role") == "user":
            found += tool_results_of(message)
    return found


def tool_results_of(message):
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [b for b in content if b.get("type") == "tool_result"]


class FakeUpstream(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, default_scenario="text", slow_delay=0.05):
        super().__init__(("127.0.0.1", 0), Handler)
        self.default_scenario = default_scenario
        self.slow_delay = slow_delay
        self.requests = []
        self.lock = threading.Lock()
        self.thread = None
        self.stopping = threading.Event()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.server_address[1]

    def start(self):
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        self.shutdown()
        self.server_close()

    def messages_requests(self, marker=None):
        """Logged POST /v1/messages bodies, optionally only those whose text has `marker`."""
        with self.lock:
            bodies = [r["body"] for r in self.requests if r["path"].startswith("/v1/messages")
                      and "count_tokens" not in r["path"] and isinstance(r["body"], dict)]
        if marker is None:
            return bodies
        return [b for b in bodies if marker in json.dumps(b)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.reply_json(200, {"data": [], "has_more": False})

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with self.server.lock:
            self.server.requests.append({"path": self.path, "headers": dict(self.headers),
                                         "body": body, "bytes": len(raw)})
        if not self.path.startswith("/v1/messages") or not isinstance(body, dict):
            return self.reply_json(404, {"type": "error", "error": {"type": "not_found_error",
                                                                     "message": "no route"}})
        if "count_tokens" in self.path:
            return self.reply_json(200, {"input_tokens": 10})
        self.answer(body)

    # -- answering -------------------------------------------------------------------------------

    def answer(self, body):
        markers = markers_of(body)
        scenario = markers.get("scenario", self.server.default_scenario)
        name, _, arg = scenario.partition("=")
        if name.isdigit() and int(name) in ERRORS:
            return self.reply_error(int(name))
        if name in REFUSALS:
            status, kind, message = REFUSALS[name]
            return self.reply_json(status, {"type": "error", "error": {"type": kind, "message": message}},
                                   [("request-id", "req_fake_%s" % name)])
        if name == "limit_rejected":
            headers = unified_headers(name, int(arg or 3600)) + [("request-id", "req_fake_limit")]
            return self.reply_json(429, {"type": "error", "error": {
                "type": "rate_limit_error", "message": "This request would exceed your account's rate limit."}},
                headers)
        limit_headers = unified_headers(name, int(arg or 3600) if name in ("limit_warning", "overage_in_use") else 3600)
        results = tool_results_after_last_call(body)
        model = body.get("model", "claude-fake")
        if name == "tool_use" and results:
            return self.stream(body, model, [("text", "tool said: " + text_of(results[0].get("content")))])
        if name == "tool_use":
            tools = [t for t in body.get("tools") or [] if not t.get("defer_loading")]
            wanted = markers.get("tool")
            tool = next((t["name"] for t in tools if wanted and t["name"].endswith(wanted)),
                        tools[0]["name"] if tools else "none")
            args = json.loads(markers.get("args", "{}"))
            blocks = []
            if "say" in markers:
                blocks.append(("text", markers["say"].replace("_", " ")))
            blocks.append(("tool_use", tool, args))
            if "second_args" in markers:
                blocks.append(("tool_use", tool, json.loads(markers["second_args"])))
            return self.stream(body, model, blocks, stop_reason="tool_use")
        if name == "read_file":
            if results:
                return self.stream(body, model, [("text", "done reading")])
            return self.stream(body, model, [("tool_use", "Read", {"file_path": markers.get("path", "/etc/hostname")})],
                               stop_reason="tool_use")
        if name == "echo":
            return self.stream(body, model, [("text", json.dumps(body))])
        if name == "say":
            return self.stream(body, model, [("words", arg.replace("_", " "))])
        if name == "long":
            return self.stream(body, model, [("repeat", "tok ", int(arg or 100))])
        if name == "thinking":
            return self.stream(body, model, [("thinking", "Let me think about this."), ("text", "Thought done.")])
        if name == "max_tokens":
            return self.stream(body, model, [("text", "This answer is cut")], stop_reason="max_tokens")
        if name == "slow":
            return self.stream(body, model, [("words", "one two three four five six seven eight")],
                               delay=self.server.slow_delay)
        if name == "hang":
            return self.stream(body, model, [("hang",)])
        if name == "drop":
            return self.stream(body, model, [("words", "partial answer then"), ("drop",)])
        return self.stream(body, model, [("words", "Hello from the fake upstream.")], headers=limit_headers)

    def reply_json(self, status, obj, headers=()):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def reply_error(self, status):
        kind, message = ERRORS[status]
        headers = [("retry-after", "7")] if status == 429 else []
        headers.append(("request-id", "req_fake_%d" % status))
        self.reply_json(status, {"type": "error", "error": {"type": kind, "message": message}}, headers)

    def stream(self, body, model, blocks, stop_reason="end_turn", delay=0.0, headers=()):
        input_tokens = max(1, len(json.dumps(body.get("messages"))) // 4)
        if not body.get("stream"):
            return self.reply_whole(model, blocks, stop_reason, input_tokens)
        self.send_response(200)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.end_headers()
        self.close_connection = True
        send = self.send_event
        try:
            send("message_start", {"type": "message_start", "message": {
                "id": "msg_fake%d" % int(time.time() * 1e6), "type": "message", "role": "assistant",
                "model": model, "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": 1,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 3}}})
            output_tokens = 0
            for index, block in enumerate(blocks):
                kind = block[0]
                if kind == "hang":
                    while not self.server.stopping.wait(0.2):
                        send("ping", {"type": "ping"})
                    return
                if kind == "drop":
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if kind == "tool_use":
                    _, tool, args = block
                    send("content_block_start", {"type": "content_block_start", "index": index,
                         "content_block": {"type": "tool_use", "id": "toolu_fake%d_%d" % (index, int(time.time() * 1e3)),
                                           "name": tool, "input": {}}})
                    text = json.dumps(args)
                    for piece in (text[:len(text) // 2], text[len(text) // 2:]):
                        send("content_block_delta", {"type": "content_block_delta", "index": index,
                             "delta": {"type": "input_json_delta", "partial_json": piece}})
                    send("content_block_stop", {"type": "content_block_stop", "index": index})
                    output_tokens += 5
                    continue
                if kind == "thinking":
                    send("content_block_start", {"type": "content_block_start", "index": index,
                         "content_block": {"type": "thinking", "thinking": ""}})
                    send("content_block_delta", {"type": "content_block_delta", "index": index,
                         "delta": {"type": "thinking_delta", "thinking": block[1]}})
                    send("content_block_delta", {"type": "content_block_delta", "index": index,
                         "delta": {"type": "signature_delta", "signature": "c2lnbmF0dXJl"}})
                    send("content_block_stop", {"type": "content_block_stop", "index": index})
                    continue
                send("content_block_start", {"type": "content_block_start", "index": index,
                     "content_block": {"type": "text", "text": ""}})
                for piece in pieces_of(block):
                    if delay:
                        time.sleep(delay)
                    send("content_block_delta", {"type": "content_block_delta", "index": index,
                         "delta": {"type": "text_delta", "text": piece}})
                    output_tokens += 1
                send("content_block_stop", {"type": "content_block_stop", "index": index})
            send("message_delta", {"type": "message_delta",
                 "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                 "usage": {"output_tokens": max(1, output_tokens)}})
            send("message_stop", {"type": "message_stop"})
        except OSError:
            pass

    def send_event(self, name, data):
        self.wfile.write(("event: %s\ndata: %s\n\n" % (name, json.dumps(data))).encode())
        self.wfile.flush()

    def reply_whole(self, model, blocks, stop_reason, input_tokens):
        content = []
        for block in blocks:
            if block[0] == "tool_use":
                content.append({"type": "tool_use", "id": "toolu_fake", "name": block[1], "input": block[2]})
            elif block[0] in ("text", "words", "repeat"):
                content.append({"type": "text", "text": "".join(pieces_of(block))})
        self.reply_json(200, {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                              "content": content, "stop_reason": stop_reason, "stop_sequence": None,
                              "usage": {"input_tokens": input_tokens, "output_tokens": 5}})


def pieces_of(block):
    kind = block[0]
    if kind == "words":
        words = block[1].split(" ")
        return [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
    if kind == "repeat":
        return [block[1]] * block[2]
    text = block[1]
    return [text[i:i + 8] for i in range(0, len(text), 8)] or [""]


if __name__ == "__main__":
    import sys
    server = FakeUpstream(default_scenario=sys.argv[1] if len(sys.argv) > 1 else "text").start()
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
