"""The real server on an ephemeral port, answered by tests/fake_claude.py.

Each test starts its own proxy process (the `fake_proxy` fixture) and picks the fake CLI's
behaviour per request with an `@@fake:MODE@@` marker in the prompt. What the fake saw (argv,
cwd, env, stdin, pids) comes back through FAKE_CLAUDE_LOG and FAKE_CLAUDE_PIDFILE. Waits are
on observable events (a log record, a pid, a socket read, an access-log line) with deadlines;
nothing sleeps a fixed time to let the server "catch up".
"""

import base64
import collections
import errno
import http.client
import json
import os
import re
import signal
import socket
import threading
import time
import uuid

import pytest

from conftest import FAKE_CLAUDE, ROOT, sse_payloads, wait_until
import fake_claude
import claude_max_proxy

HELLO = "Hello from the fake CLI."
CHAT = "/v1/chat/completions"


# ---- helpers -----------------------------------------------------------------------------------

def chat_body(mode=None, text="hi", **extra):
    content = text if mode is None else "%s @@fake:%s@@" % (text, mode)
    body = {"model": "claude-sonnet-4", "messages": [{"role": "user", "content": content}]}
    body.update(extra)
    return body


def stream_body(mode=None, **extra):
    return chat_body(mode, stream=True, **extra)


def process_state(pid):
    """The /proc state letter of a pid ("R", "S", "Z", ...), or None when it does not exist."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(") ", 1)[1][:1]
    except (OSError, IndexError):
        return None


def pid_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_reaped(pid, timeout=5.0):
    """A child of the proxy must be killed *and* reaped: the pid disappears entirely."""
    wait_until(lambda: not pid_exists(pid), timeout, "pid %d to be gone (state %s)"
               % (pid, process_state(pid)))


def wait_dead(pid, timeout=5.0):
    """A grandchild must be killed; reaping it is its new parent's job, so a zombie counts."""
    wait_until(lambda: process_state(pid) in (None, "Z", "X"), timeout,
               "pid %d to die (state %s)" % (pid, process_state(pid)))


def error_of(response, status):
    """Check the OpenAI error envelope and the request id; return the inner error object."""
    got_status, headers, raw = response
    assert got_status == status, raw
    assert headers.get("x-request-id", "").startswith("req_"), headers
    assert headers.get("content-type", "").startswith("application/json"), headers
    body = json.loads(raw)
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    return error


def ok_json(response):
    status, headers, raw = response
    assert status == 200, raw
    assert headers.get("x-request-id", "").startswith("req_"), headers
    return json.loads(raw)


def stream_chunks(response):
    """(chunk dicts, last payload) of a 200 SSE answer; checks the SSE framing headers."""
    status, headers, raw = response
    assert status == 200, raw
    assert headers["content-type"].startswith("text/event-stream"), headers
    assert headers.get("transfer-encoding") == "chunked", headers
    assert "content-length" not in headers, headers
    assert headers.get("x-request-id", "").startswith("req_"), headers
    payloads = sse_payloads(raw)
    assert payloads, raw
    assert payloads.count("[DONE]") == 1 and payloads[-1] == "[DONE]", payloads
    return [json.loads(p) for p in payloads[:-1]]


def content_of(chunks):
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def finish_reasons(chunks):
    return [c["choices"][0]["finish_reason"] for c in chunks
            if c["choices"] and c["choices"][0]["finish_reason"] is not None]


class FakeTrace:
    """What the fake CLI wrote about itself: FAKE_CLAUDE_LOG records and FAKE_CLAUDE_PIDFILE pids."""

    def __init__(self, folder):
        self.log_path = os.path.join(str(folder), "fake-claude.log")
        self.pid_path = os.path.join(str(folder), "fake-claude.pids")
        self.env = {"FAKE_CLAUDE_LOG": self.log_path, "FAKE_CLAUDE_PIDFILE": self.pid_path}

    @staticmethod
    def _lines(path):
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            return []
        return [line for line in text[:text.rfind("\n") + 1].split("\n") if line]

    def records(self):
        return [json.loads(line) for line in self._lines(self.log_path)]

    def runs(self):
        """The latest record of each chat invocation (not the startup `--version` probe)."""
        latest = collections.OrderedDict()
        for record in self.records():
            if "-p" in record["argv"]:
                latest[record["pid"]] = record
        return list(latest.values())

    def turns(self):
        """Chat invocations that have read their prompt from stdin."""
        return [run for run in self.runs() if run["event"] == "stdin"]

    def wait_for_turn(self, timeout=10.0):
        return wait_until(self.turns, timeout, "the fake CLI to read its prompt")[-1]

    def pids(self):
        return [int(line) for line in self._lines(self.pid_path)]

    def unlogged_pids(self):
        """Pids in the pidfile with no log record of their own: children the fake spawned."""
        logged = {record["pid"] for record in self.records()}
        return [pid for pid in self.pids() if pid not in logged]

    def probed(self):
        return any(record["argv"] == ["--version"] for record in self.records())


@pytest.fixture
def trace(tmp_path):
    return FakeTrace(tmp_path)


def open_raw(port, body, path=CHAT, headers=()):
    """Send one POST on a raw socket and return the socket, for reading bytes as they come."""
    data = json.dumps(body).encode()
    head = ["POST %s HTTP/1.1" % path, "Host: 127.0.0.1:%d" % port,
            "Content-Type: application/json", "Content-Length: %d" % len(data)] + list(headers)
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    return sock


def recv_until(sock, buffer, needle):
    while needle not in buffer:
        data = sock.recv(65536)
        if not data:
            raise AssertionError("connection closed before %r arrived; got %r" % (needle, buffer[-400:]))
        buffer += data
    return buffer


def recv_to_eof(sock):
    buffer = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return buffer
        buffer += data


def split_response(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def dechunk(raw):
    """(body, rest, complete) of a chunked transfer: complete when the 0-size chunk ended it."""
    body = b""
    while True:
        line, sep, raw = raw.partition(b"\r\n")
        if not sep:
            return body, b"", False
        size = int(line.split(b";")[0], 16)
        if size == 0:
            if raw.startswith(b"\r\n"):
                return body, raw[2:], True
            return body, raw, False
        assert raw[size:size + 2] == b"\r\n", "chunk of %d bytes not followed by CRLF" % size
        body, raw = body + raw[:size], raw[size + 2:]


def health(proxy, headers=None):
    return ok_json(proxy.request("GET", "/health", headers=headers))


# ---- routing and the error envelope -------------------------------------------------------------

def test_unknown_path_is_404_in_the_openai_envelope(fake_proxy):
    proxy = fake_proxy()
    error = error_of(proxy.request("GET", "/v1/nope"), 404)
    assert error["type"] == "invalid_request_error"
    error = error_of(proxy.request("POST", "/v1/embeddings", {"input": "x"}), 404)
    assert error["type"] == "invalid_request_error"


def test_every_response_has_its_own_request_id_that_the_access_log_names(fake_proxy):
    proxy = fake_proxy()
    ids = [proxy.request("GET", "/v1/nope")[1]["x-request-id"],
           proxy.chat(chat_body())[1]["x-request-id"],
           proxy.request("GET", "/health")[1]["x-request-id"]]
    assert len(set(ids)) == 3, ids
    for request_id in ids:
        assert proxy.wait_for_line(request_id, timeout=5), request_id


def test_get_on_chat_completions_is_405_with_allow(fake_proxy):
    proxy = fake_proxy()
    response = proxy.request("GET", CHAT)
    error = error_of(response, 405)
    assert error["type"] == "invalid_request_error"
    assert response[1]["allow"] == "POST"


def test_post_on_models_is_405_with_or_without_a_json_body(fake_proxy):
    proxy = fake_proxy()
    response = proxy.request("POST", "/v1/models", {})
    error_of(response, 405)
    assert "GET" in response[1]["allow"]
    # No body, so no Content-Type: the method is wrong for the resource whatever the body is.
    error_of(proxy.request("POST", "/v1/models"), 405)


def test_malformed_json_is_400(fake_proxy, trace):
    proxy = fake_proxy(**trace.env)
    error = error_of(proxy.request("POST", CHAT, b'{"model": "claude-sonnet-4", "messages": ['), 400)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_json"
    assert trace.runs() == []


def test_missing_messages_is_400_naming_the_param(fake_proxy):
    proxy = fake_proxy()
    error = error_of(proxy.chat({"model": "claude-sonnet-4"}), 400)
    assert error["param"] == "messages"
    assert error["type"] == "invalid_request_error"


def test_unknown_model_is_404_model_not_found(fake_proxy, trace):
    proxy = fake_proxy(**trace.env)
    error = error_of(proxy.chat(chat_body(model="gpt-4o")), 404)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "gpt-4o" in error["message"]
    assert trace.runs() == []


def test_body_over_max_body_bytes_is_413_and_one_under_is_served(fake_proxy, trace):
    proxy = fake_proxy(["--max-body-bytes", "2048"], **trace.env)
    big = chat_body(text="x" * 4000)
    error = error_of(proxy.chat(big), 413)
    assert error["code"] == "request_too_large"
    assert trace.runs() == []
    small = chat_body(text="x" * 1500)
    assert len(json.dumps(small)) < 2048
    assert ok_json(proxy.chat(small))["choices"][0]["message"]["content"] == HELLO


def test_body_far_over_the_limit_still_gets_a_readable_413(fake_proxy):
    """8 MiB to a 64 KiB limit: a client that reads after its upload fails (as httpx does) sees the 413."""
    proxy = fake_proxy(["--max-body-bytes", "65536"])
    data = json.dumps(chat_body(text="x" * (8 << 20))).encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=15)
    with sock:
        sock.sendall(("POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                      "Content-Length: %d\r\n\r\n" % (CHAT, proxy.port, len(data))).encode())
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server stopped reading: expected, the answer is what counts
        try:
            raw = recv_until(sock, b"", b"\r\n\r\n")
        except OSError as exc:
            pytest.fail("the client got %r instead of a 413" % exc)
    assert split_response(raw)[0] == 413


def test_non_json_content_type_is_415(fake_proxy, trace):
    proxy = fake_proxy(**trace.env)
    data = json.dumps(chat_body()).encode()
    error = error_of(proxy.request("POST", CHAT, data, {"Content-Type": "text/plain"}), 415)
    assert error["type"] == "invalid_request_error"
    assert trace.runs() == []
    # Parameters on the media type are fine.
    ok_json(proxy.request("POST", CHAT, data, {"Content-Type": "application/json; charset=utf-8"}))


def test_chunked_request_body_is_refused_with_411(fake_proxy):
    proxy = fake_proxy()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    with sock:
        data = json.dumps(chat_body()).encode()
        sock.sendall(("POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                      "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n%x\r\n"
                      % (CHAT, proxy.port, len(data))).encode() + data + b"\r\n0\r\n\r\n")
        status, headers, body = split_response(recv_to_eof(sock))
    assert status == 411
    length = int(headers["content-length"])
    assert set(json.loads(body[:length])["error"]) == {"message", "type", "param", "code"}


# ---- keep-alive after a refused request ---------------------------------------------------------

KEY = "test-key-" + uuid.uuid4().hex[:8]
GOOD = {"Authorization": "Bearer " + KEY}
SMALL = json.dumps(chat_body()).encode()
REFUSALS = [
    # (name, request headers, path, body, expected status)
    ("no-key", {}, CHAT, SMALL, 401),
    ("text-plain", dict(GOOD, **{"Content-Type": "text/plain"}), CHAT, SMALL, 415),
    ("unknown-path", GOOD, "/v1/embeddings", SMALL, 404),
    ("post-models", GOOD, "/v1/models", SMALL, 405),
    ("bad-host", dict(GOOD, Host="attacker.example"), CHAT, SMALL, 421),
    ("bad-origin", dict(GOOD, Origin="http://attacker.example"), CHAT, SMALL, 403),
    ("too-large", GOOD, CHAT, json.dumps(chat_body(text="x" * 6000)).encode(), 413),
    ("chunked-body", GOOD, CHAT, iter([SMALL]), 411),
]


@pytest.mark.parametrize("name,headers,path,body,status", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refused_post_leaves_the_connection_usable_or_closes_it(fake_proxy, name, headers, path, body,
                                                                status):
    """The refused request's body must not be read as the next request on a keep-alive connection;
    if the server closes instead, it must say so (`Connection: close`)."""
    proxy = fake_proxy(["--api-key", KEY, "--max-body-bytes", "4096"])
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        sent = {"Host": "127.0.0.1:%d" % proxy.port, "Content-Type": "application/json"}
        sent.update(headers)
        if isinstance(body, bytes):
            conn.request("POST", path, body=body, headers=sent)
        else:
            conn.request("POST", path, body=list(body), headers=sent, encode_chunked=True)
        first = conn.getresponse()
        first_body = first.read()
        assert first.status == status, first_body
        if (first.getheader("Connection") or "").lower() == "close":
            return  # announced: a client opens a new connection
        conn.request("GET", "/health", headers={"Host": "127.0.0.1:%d" % proxy.port})
        second = conn.getresponse()
        second_body = second.read()
        assert second.status == 200, second_body
        assert json.loads(second_body)["status"] == "ok"
    finally:
        conn.close()


# ---- Host and Origin guards ---------------------------------------------------------------------

def test_foreign_host_is_421_and_no_cli_starts(fake_proxy, trace):
    proxy = fake_proxy(**trace.env)
    for host in ("attacker.example", "attacker.example:%d" % proxy.port):
        error = error_of(proxy.chat(chat_body("text"), headers={"Host": host}), 421)
        assert error["code"] == "host_not_allowed"
    assert trace.runs() == []
    # The same request with a loopback Host does reach the CLI (so the log above can show one).
    ok_json(proxy.chat(chat_body("text")))
    assert len(trace.runs()) == 1


def test_hosts_that_merely_start_like_loopback_are_421(fake_proxy):
    """DNS rebinding: an attacker's `127.evil.example` resolves to them first, then to 127.0.0.1."""
    proxy = fake_proxy()
    accepted = []
    for host in ("127.attacker.example", "127.0.0.1.attacker.example", "localhost.attacker.example",
                 "127.0.0.1.nip.io"):
        status = proxy.request("GET", "/health", headers={"Host": host})[0]
        if status != 421:
            accepted.append((host, status))
    assert accepted == []


def test_allowed_hosts_flag_admits_a_named_host(fake_proxy):
    proxy = fake_proxy(["--allowed-hosts", "proxy.lan, other.lan"])
    assert ok_json(proxy.chat(chat_body(), headers={"Host": "proxy.lan:%d" % proxy.port}))
    assert ok_json(proxy.request("GET", "/health", headers={"Host": "other.lan"}))["status"] == "ok"
    error_of(proxy.request("GET", "/health", headers={"Host": "third.lan"}), 421)


def test_foreign_origin_is_403_and_no_cli_starts(fake_proxy, trace):
    proxy = fake_proxy(**trace.env)
    response = proxy.chat(chat_body("text"), headers={"Origin": "http://attacker.example"})
    error = error_of(response, 403)
    assert error["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in response[1]
    assert trace.runs() == []
    ok_json(proxy.chat(chat_body("text")))
    assert len(trace.runs()) == 1


def test_allowed_origin_gets_cors_headers_and_a_preflight(fake_proxy):
    origin = "http://app.example:8080"
    proxy = fake_proxy(["--allowed-origins", origin, "--api-key", KEY])
    status, headers, raw = proxy.request("OPTIONS", CHAT, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert status in (200, 204), raw
    assert raw == b""
    assert headers["access-control-allow-origin"] == origin
    assert "POST" in [m.strip() for m in headers["access-control-allow-methods"].split(",")]
    allowed = [h.strip().lower() for h in headers["access-control-allow-headers"].split(",")]
    assert "authorization" in allowed and "content-type" in allowed
    assert "origin" in headers.get("vary", "").lower()

    status, headers, raw = proxy.chat(chat_body(), headers=dict(GOOD, Origin=origin))
    assert status == 200, raw
    assert headers["access-control-allow-origin"] == origin
    assert "origin" in headers.get("vary", "").lower()
    # A page's script can read the proxy's own headers, not only the CORS-safelisted ones.
    exposed = [h.strip().lower() for h in headers["access-control-expose-headers"].split(",")]
    assert headers["x-request-id"] and {"x-request-id", "retry-after"} <= set(exposed)
    # Errors carry CORS headers too, or the page could not read why it failed.
    response = proxy.chat(chat_body(), headers={"Origin": origin})
    error_of(response, 401)
    assert response[1]["access-control-allow-origin"] == origin
    # A preflight from another origin is refused and names no allowed origin.
    status, headers, _ = proxy.request("OPTIONS", CHAT, headers={
        "Origin": "http://attacker.example", "Access-Control-Request-Method": "POST"})
    assert status == 403
    assert "access-control-allow-origin" not in headers


# ---- API key ------------------------------------------------------------------------------------

def test_api_key_is_required_except_for_health(fake_proxy, trace):
    other = "second-" + uuid.uuid4().hex[:8]
    proxy = fake_proxy(["--api-key", "%s,%s" % (KEY, other)], **trace.env)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": "Basic " + KEY}, {"Authorization": "Bearer " + KEY + "x"}):
        error = error_of(proxy.chat(chat_body(), headers=headers), 401)
        assert error["type"] == "authentication_error"
    error_of(proxy.request("GET", "/v1/models"), 401)
    assert trace.runs() == []
    assert ok_json(proxy.chat(chat_body(), headers=GOOD))["choices"][0]["message"]["content"] == HELLO
    assert ok_json(proxy.chat(chat_body(), headers={"Authorization": "bearer " + other}))
    assert ok_json(proxy.request("GET", "/v1/models", headers=GOOD))["object"] == "list"
    assert health(proxy)["status"] == "ok"


# ---- models and health --------------------------------------------------------------------------

def test_models_list_and_retrieve(fake_proxy):
    proxy = fake_proxy()
    listing = ok_json(proxy.request("GET", "/v1/models"))
    assert listing["object"] == "list"
    ids = [m["id"] for m in listing["data"]]
    assert {"claude-opus-4", "claude-sonnet-4", "claude-haiku-4"} <= set(ids)
    assert len(ids) == len(set(ids))
    for model in listing["data"]:
        assert set(model) == {"id", "object", "created", "owned_by"}, model
        assert model["object"] == "model" and isinstance(model["created"], int)
        assert model["owned_by"] == "anthropic"
    one = ok_json(proxy.request("GET", "/v1/models/claude-opus-4"))
    assert one == next(m for m in listing["data"] if m["id"] == "claude-opus-4")
    error = error_of(proxy.request("GET", "/v1/models/gpt-4o"), 404)
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/claude-opus-4", "/health"])
def test_head_is_answered_like_get_without_a_body(fake_proxy, path):
    proxy = fake_proxy()
    status, headers, raw = proxy.request("GET", path)
    head_status, head_headers, head_raw = proxy.request("HEAD", path)
    assert (head_status, head_raw) == (status, b"")
    assert head_headers["content-type"] == headers["content-type"] == "application/json"
    assert int(head_headers["content-length"]) > 0
    assert proxy.request("HEAD", "/v1/chat/completions")[1]["allow"] == "POST"


def test_health_reports_version_and_the_probed_cli(fake_proxy):
    proxy = fake_proxy()
    report = wait_until(lambda: (lambda h: h if h["claude"]["version"] else None)(health(proxy)),
                        10, "the startup `claude --version` probe")
    assert report["status"] == "ok"
    assert report["version"] == claude_max_proxy.__version__
    assert os.path.realpath(report["claude"]["path"]) == os.path.realpath(proxy.claude)
    assert report["claude"]["version"].startswith(fake_claude.VERSION)
    assert report["claude"]["usable"] is True


def test_the_version_probe_gets_the_cli_environment_not_ours(fake_proxy, trace):
    proxy = fake_proxy(**dict(trace.env, ANTHROPIC_API_KEY="sk-ant-api03-stray"))
    wait_until(trace.probed, 10, "the startup probe's log record")
    [probe] = [record for record in trace.records() if record["argv"] == ["--version"]]
    assert "ANTHROPIC_API_KEY" not in probe["env"], probe
    ok_json(proxy.chat(chat_body()))
    assert all("ANTHROPIC_API_KEY" not in run["env"] for run in trace.runs())


def test_missing_cli_is_503_and_health_says_not_usable(fake_proxy):
    proxy = fake_proxy(["--claude", "/nonexistent/claude"])
    error = error_of(proxy.chat(chat_body()), 503)
    assert error["type"] == "server_error"
    assert "/nonexistent/claude" in error["message"]
    report = wait_until(lambda: (lambda h: h if h["claude"]["error"] else None)(health(proxy)),
                        10, "the probe to report the missing CLI")
    assert report["claude"]["usable"] is False
    assert report["claude"]["version"] is None


# ---- answers: shape -----------------------------------------------------------------------------

def test_plain_answer_is_a_chat_completion_with_usage(fake_proxy):
    proxy = fake_proxy()
    status, headers, raw = proxy.chat(chat_body("text"))
    assert status == 200, raw
    assert headers["content-type"].startswith("application/json")
    assert int(headers["content-length"]) == len(raw)
    body = json.loads(raw)
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == fake_claude.MODEL
    assert isinstance(body["created"], int)
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": HELLO, "refusal": None}
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] == fake_claude.INPUT_TOKENS
    assert usage["completion_tokens"] == len(fake_claude.HELLO_PIECES)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("include_usage", [False, True])
def test_streamed_answer_shape(fake_proxy, include_usage):
    proxy = fake_proxy()
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = stream_chunks(proxy.chat(stream_body("text", **extra)))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:] if c["choices"])
    assert content_of(chunks) == HELLO
    assert finish_reasons(chunks) == ["stop"]
    if include_usage:
        last = chunks[-1]
        assert last["choices"] == []
        assert last["usage"]["prompt_tokens"] == fake_claude.INPUT_TOKENS
        assert last["usage"]["completion_tokens"] == len(fake_claude.HELLO_PIECES)
        assert last["usage"]["total_tokens"] == fake_claude.INPUT_TOKENS + len(fake_claude.HELLO_PIECES)
        assert all(c["usage"] is None for c in chunks[:-1])
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    else:
        assert all(c["choices"] for c in chunks)
        assert all(c.get("usage") is None for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_bytes_are_well_formed_chunks_and_the_connection_is_reused(fake_proxy):
    proxy = fake_proxy()
    sock = open_raw(proxy.port, stream_body("text"))
    with sock:
        raw = recv_until(sock, b"", b"\r\n0\r\n\r\n")
        status, headers, rest = split_response(raw)
        assert status == 200
        assert headers["transfer-encoding"] == "chunked"
        body, leftover, complete = dechunk(rest)
        assert complete and leftover == b""
        assert body.endswith(b"data: [DONE]\n\n")
        assert content_of([json.loads(p) for p in sse_payloads(body)[:-1]]) == HELLO
        # Same connection, next request: the stream ended cleanly, so keep-alive works.
        sock.sendall(("GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % proxy.port).encode())
        raw = recv_until(sock, b"", b"\r\n\r\n")
        status, headers, body = split_response(raw)
        while len(body) < int(headers["content-length"]):
            body += sock.recv(65536)
        assert status == 200
        assert json.loads(body)["status"] == "ok"


def test_a_fast_cli_stream_arrives_whole_in_order_in_well_formed_chunks(fake_proxy):
    # Frames of a CLI that writes faster than one write per frame go out in batches.
    proxy = fake_proxy()
    count = 5000
    sock = open_raw(proxy.port, stream_body("words:%d" % count, stream_options={"include_usage": True}))
    with sock:
        raw = recv_until(sock, b"", b"\r\n0\r\n\r\n")
    status, headers, rest = split_response(raw)
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    body, leftover, complete = dechunk(rest)
    assert complete and leftover == b""
    payloads = sse_payloads(body)
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    chunks = [json.loads(p) for p in payloads[:-1]]
    texts = [c["choices"][0]["delta"]["content"] for c in chunks[1:] if c["choices"]
             and c["choices"][0]["delta"].get("content")]
    assert texts == ["w%d " % i for i in range(count)]
    assert finish_reasons(chunks) == ["stop"] and chunks[-1]["usage"]["completion_tokens"] == count


def test_a_delta_is_sent_while_the_cli_is_silent_after_it(fake_proxy, trace):
    # A frame is never held back while the proxy waits for the CLI's next line: the first
    # delta arrives although the CLI then stays silent far longer than the socket's timeout.
    proxy = fake_proxy(**trace.env)
    sock = open_raw(proxy.port, stream_body("stall:120"))
    with sock:
        sock.settimeout(15)
        raw = recv_until(sock, b"", b'"content": "Hello "')
        assert b"HTTP/1.1 200" in raw and b"from " not in raw
    wait_reaped(trace.runs()[0]["pid"], timeout=15)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("stop", ["w3", ["nowhere", "w3"]])
def test_stop_string_cuts_the_answer(fake_proxy, trace, stream, stop):
    proxy = fake_proxy(**trace.env)
    body = chat_body("words:50", stop=stop, stream=stream)
    if stream:
        chunks = stream_chunks(proxy.chat(body))
        content, reasons = content_of(chunks), finish_reasons(chunks)
    else:
        choice = ok_json(proxy.chat(body))["choices"][0]
        content, reasons = choice["message"]["content"], [choice["finish_reason"]]
    assert content == "w0 w1 w2 "
    assert reasons == ["stop"]
    wait_reaped(trace.runs()[0]["pid"])


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_stop_reason_is_length(fake_proxy, stream):
    proxy = fake_proxy()
    if stream:
        chunks = stream_chunks(proxy.chat(stream_body("max_tokens")))
        assert content_of(chunks) == "This answer is cut"
        assert finish_reasons(chunks) == ["length"]
    else:
        choice = ok_json(proxy.chat(chat_body("max_tokens")))["choices"][0]
        assert choice["message"]["content"] == "This answer is cut"
        assert choice["finish_reason"] == "length"


# ---- what the CLI is given ----------------------------------------------------------------------

def test_cli_gets_max_tokens_in_env_prompt_on_stdin_and_an_empty_private_cwd(fake_proxy, trace):
    # A value in the proxy's own environment must not leak into requests that set none.
    proxy = fake_proxy(CLAUDE_CODE_MAX_OUTPUT_TOKENS="5", **trace.env)
    secret = "prompt-" + uuid.uuid4().hex
    ok_json(proxy.chat(chat_body("text", text=secret, max_tokens=77)))
    ok_json(proxy.chat(chat_body("text", text=secret + "-again")))
    first, second = trace.runs()
    assert first["env"].get("CLAUDE_CODE_MAX_OUTPUT_TOKENS") == "77"
    assert "CLAUDE_CODE_MAX_OUTPUT_TOKENS" not in second["env"]

    argv = first["argv"]
    assert argv[argv.index("--tools") + 1] == ""
    assert argv[argv.index("--setting-sources") + 1] == ""
    assert not any(secret in arg for arg in argv)
    stdin_text = json.dumps(first["stdin"])
    assert secret in stdin_text

    cwd = os.path.realpath(first["cwd"])
    assert cwd != os.path.realpath(ROOT)  # the proxy's own cwd (see conftest.Proxy)
    assert not cwd.startswith(os.path.realpath(ROOT) + os.sep)
    assert os.path.isdir(cwd) and os.listdir(cwd) == []


def test_one_megabyte_prompt_goes_through_stdin_not_argv(fake_proxy):
    proxy = fake_proxy()
    prompt = "%s @@fake:echo_args@@" % ("0123456789abcdef" * (1 << 16))  # 1 MiB of text
    body = {"model": "claude-sonnet-4", "messages": [{"role": "user", "content": prompt}]}
    answer = ok_json(proxy.chat(body, timeout=60))
    echo = json.loads(answer["choices"][0]["message"]["content"])
    assert echo["stdin"]["message"]["content"] == [{"type": "text", "text": prompt}]
    assert not any("0123456789abcdef" * 4 in arg for arg in echo["argv"])
    assert sum(len(arg) for arg in echo["argv"]) < 16384


# ---- CLI faults ---------------------------------------------------------------------------------

FAULTS = [
    # (fake mode, HTTP status, error type, error code, a phrase the message must contain)
    ("crash", 502, "server_error", "cli_failed", "fatal: something broke"),
    ("garbage", 502, "server_error", "cli_failed", ""),
    ("error_result:401", 401, "authentication_error", "invalid_api_key", "auth login"),
    ("error_result:429", 429, "rate_limit_error", "rate_limit_exceeded", ""),
    ("error_result:529", 503, "server_error", "overloaded", ""),
    ("error_result:500", 502, "server_error", "upstream_error", ""),
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("mode,status,kind,code,phrase", FAULTS, ids=[f[0] for f in FAULTS])
def test_cli_fault_before_output_is_an_http_error(fake_proxy, trace, mode, status, kind, code, phrase,
                                                  stream):
    proxy = fake_proxy(**trace.env)
    error = error_of(proxy.chat(chat_body(mode, stream=stream)), status)
    assert (error["type"], error["code"]) == (kind, code)
    assert phrase in error["message"]
    wait_reaped(trace.runs()[0]["pid"])
    # The server survives and answers the next request.
    assert ok_json(proxy.chat(chat_body("text")))["choices"][0]["message"]["content"] == HELLO


@pytest.mark.parametrize("mode,code", [("crash_mid", "cli_failed"), ("error_mid", "upstream_error")])
def test_cli_fault_after_output_ends_the_stream_with_an_error_event(fake_proxy, mode, code):
    proxy = fake_proxy()
    status, headers, raw = proxy.chat(stream_body(mode))
    assert status == 200, raw
    payloads = sse_payloads(raw)
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    last = json.loads(payloads[-2])
    assert list(last) == ["error"]
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert last["error"]["type"] == "server_error" and last["error"]["code"] == code
    chunks = [json.loads(p) for p in payloads[:-2]]
    assert content_of(chunks) == "Hello from "
    assert finish_reasons(chunks) == []  # it did not finish: no "stop" before the error


@pytest.mark.parametrize("mode", ["crash_mid", "error_mid"])
def test_cli_fault_after_output_without_streaming_is_an_http_error(fake_proxy, mode):
    proxy = fake_proxy()
    error = error_of(proxy.chat(chat_body(mode)), 502)
    assert error["type"] == "server_error"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_silent_cli_is_504_after_idle_timeout_and_is_ended(fake_proxy, trace, stream):
    proxy = fake_proxy(["--idle-timeout", "1"], **trace.env)
    error = error_of(proxy.chat(chat_body("hang", stream=stream), timeout=20), 504)
    assert error["code"] == "timeout"
    wait_reaped(trace.runs()[0]["pid"])


def test_request_timeout_is_504_and_ends_the_cli(fake_proxy, trace):
    proxy = fake_proxy(["--request-timeout", "1", "--idle-timeout", "60"], **trace.env)
    error = error_of(proxy.chat(chat_body("hang"), timeout=20), 504)
    assert error["code"] == "timeout"
    wait_reaped(trace.runs()[0]["pid"])


def test_cli_grandchild_is_killed_with_its_process_group(fake_proxy, trace):
    proxy = fake_proxy(["--idle-timeout", "1"], **trace.env)
    error_of(proxy.chat(chat_body("hang_child"), timeout=20), 504)
    cli_pid = trace.runs()[0]["pid"]
    wait_until(trace.probed, 10, "the startup probe's log record")
    children = trace.unlogged_pids()
    assert len(children) == 1, (trace.pids(), trace.records())
    wait_reaped(cli_pid)
    wait_dead(children[0])
    with pytest.raises(ProcessLookupError):
        os.kill(cli_pid, 0)


def test_cli_that_ignores_stdin_eof_is_answered_and_reaped(fake_proxy, trace):
    proxy = fake_proxy(**trace.env)
    answer = ok_json(proxy.chat(chat_body("ignore_stdin_eof"), timeout=20))
    assert answer["choices"][0]["message"]["content"] == HELLO
    assert answer["choices"][0]["finish_reason"] == "stop"
    wait_reaped(trace.runs()[0]["pid"])


# ---- client disconnects -------------------------------------------------------------------------

def test_client_disconnect_before_output_ends_the_cli(fake_proxy, trace):
    proxy = fake_proxy(**trace.env)
    sock = open_raw(proxy.port, stream_body("hang"))
    pid = trace.wait_for_turn()["pid"]
    assert pid_exists(pid)
    sock.close()
    wait_reaped(pid, timeout=5)
    assert proxy.wait_for_line(" 499 ", timeout=5)
    assert health(proxy)["slots"]["busy"] == 0


def test_client_disconnect_mid_stream_ends_the_cli(fake_proxy, trace):
    proxy = fake_proxy(**trace.env)
    sock = open_raw(proxy.port, stream_body("slow:0.5"))
    recv_until(sock, b"", b"Hello ")
    pid = trace.runs()[0]["pid"]
    assert pid_exists(pid)
    sock.close()
    wait_reaped(pid, timeout=5)


# ---- concurrency --------------------------------------------------------------------------------

def test_full_slots_and_no_queue_is_429_with_retry_after(fake_proxy, trace):
    proxy = fake_proxy(["--max-concurrency", "1", "--max-queue", "0"], **trace.env)
    first = open_raw(proxy.port, stream_body("hang"))
    try:
        pid = trace.wait_for_turn()["pid"]
        response = proxy.chat(chat_body("text"))
        error = error_of(response, 429)
        assert error["type"] == "rate_limit_error"
        assert int(response[1]["retry-after"]) >= 1
        assert len(trace.runs()) == 1  # the refused request never started a CLI
    finally:
        first.close()
    wait_reaped(pid)
    assert proxy.wait_for_line(" 499 ", timeout=5)  # logged after its slot is released
    assert ok_json(proxy.chat(chat_body("text")))["choices"][0]["message"]["content"] == HELLO


def test_queued_request_runs_when_the_slot_frees(fake_proxy, trace):
    proxy = fake_proxy(["--max-concurrency", "1", "--max-queue", "1", "--queue-timeout", "30"],
                       **trace.env)
    first = open_raw(proxy.port, stream_body("hang"))
    try:
        trace.wait_for_turn()
        result = {}
        waiter = threading.Thread(target=lambda: result.update(r=proxy.chat(chat_body("text"), timeout=30)))
        waiter.start()
        wait_until(lambda: health(proxy)["slots"]["waiting"] == 1, 10, "the second request to queue")
        assert len(trace.runs()) == 1
        # A third one finds the queue full.
        error_of(proxy.chat(chat_body("text")), 429)
    finally:
        first.close()
    waiter.join(30)
    assert not waiter.is_alive()
    assert ok_json(result["r"])["choices"][0]["message"]["content"] == HELLO


def test_queue_timeout_is_429(fake_proxy, trace):
    proxy = fake_proxy(["--max-concurrency", "1", "--max-queue", "1", "--queue-timeout", "0.5"],
                       **trace.env)
    first = open_raw(proxy.port, stream_body("hang"))
    try:
        trace.wait_for_turn()
        response = proxy.chat(chat_body("text"), timeout=20)
        error = error_of(response, 429)
        assert error["type"] == "rate_limit_error"
        assert "retry-after" in response[1]
        assert len(trace.runs()) == 1
    finally:
        first.close()


# ---- shutdown -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: a closed terminal
def test_sigterm_lets_the_streaming_request_finish_then_exits_0(fake_proxy, sig):
    proxy = fake_proxy()
    sock = open_raw(proxy.port, stream_body("slow:0.2"))
    with sock:
        raw = recv_until(sock, b"", b"Hello ")
        proxy.proc.send_signal(sig)
        raw = recv_until(sock, raw, b"\r\n0\r\n\r\n")
    status, headers, rest = split_response(raw)
    assert status == 200
    body, _, complete = dechunk(rest)
    assert complete
    payloads = sse_payloads(body)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert content_of(chunks) == HELLO
    assert finish_reasons(chunks) == ["stop"]
    assert proxy.proc.wait(timeout=15) == 0
    wait_until(lambda: not proxy.tagged_pids(), 5, "no tagged processes left")


@pytest.mark.parametrize("signals, grace, code", [
    ([signal.SIGTERM], "0.5", 0),
    ([signal.SIGINT, signal.SIGINT], "600", 130),  # a second Ctrl-C exits at once, grace or not
])
def test_sigterm_ends_a_hung_request_after_the_grace_period(fake_proxy, trace, signals, grace, code):
    proxy = fake_proxy(["--shutdown-grace", grace], **trace.env)
    sock = open_raw(proxy.port, stream_body("hang"))
    with sock:
        pid = trace.wait_for_turn()["pid"]
        for i, sig in enumerate(signals):
            if i:  # the first was taken (it stops listening), so this one is not folded into it
                wait_until(lambda: not port_open(proxy.port), 10, "the proxy to stop listening")
            proxy.proc.send_signal(sig)
        assert proxy.proc.wait(timeout=15) == code
        wait_reaped(pid)
        wait_until(lambda: not proxy.tagged_pids(), 5, "no tagged processes left")


def test_a_client_that_stops_reading_is_dropped_and_its_cli_ended(fake_proxy, trace):
    proxy = fake_proxy(["--client-timeout", "1"], **trace.env)
    # ~40 MB of SSE: far more than the socket buffers hold, so the proxy's writes must block.
    sock = open_raw(proxy.port, stream_body("words:400000"))
    try:
        recv_until(sock, b"", b"w0 ")
        pid = trace.runs()[0]["pid"]
        # Read nothing more: the CLI must be ended once the proxy's writes stall past the timeout.
        wait_reaped(pid, timeout=15)
        assert proxy.wait_for_line(" 499 ", timeout=10)
    finally:
        sock.close()


# ---- slow and numerous clients, smuggling, signals, leftovers -------------------------------------

def is_closed(sock):
    """True once the server has closed (or reset) the connection; never blocks long."""
    try:
        sock.settimeout(0.01)
        return sock.recv(4096) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def test_slow_header_senders_are_dropped_at_the_read_deadline_while_health_answers(fake_proxy):
    proxy = fake_proxy(["--read-timeout", "2"])
    socks = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(40)]
    try:
        for sock in socks:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        open_socks, line = list(socks), 0
        deadline = time.monotonic() + 30  # far past the 2 s deadline: only a per-read timeout misses it
        while open_socks:
            assert time.monotonic() < deadline, "%d slow connections still open" % len(open_socks)
            line += 1
            for sock in list(open_socks):
                try:
                    sock.sendall(b"X-Slow-%d: 1\r\n" % line)  # one more header line, each ~0.5 s
                except OSError:
                    open_socks.remove(sock)
                    continue
                if is_closed(sock):
                    open_socks.remove(sock)
            assert health(proxy)["status"] == "ok"
            time.sleep(0.5)  # the attack's pace, not a synchronisation
    finally:
        for sock in socks:
            sock.close()


def test_connections_over_the_cap_get_a_clear_503(fake_proxy):
    proxy = fake_proxy(["--max-connections", "3"])
    idle = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(3)]
    try:
        wait_until(lambda: health_status_over_fresh_connection(proxy.port) == 503, 10,
                   "the connection cap to refuse")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            status, headers, body = split_response(recv_to_eof(sock))
        assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "too_many_connections"
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: health_status_over_fresh_connection(proxy.port) == 200, 10, "the cap to free up")


def health_status_over_fresh_connection(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        raw = recv_to_eof(sock)
    return split_response(raw)[0] if raw else None


@pytest.mark.parametrize("method", ["GET", "OPTIONS", "DELETE"])
def test_a_body_on_a_request_that_takes_none_is_never_a_second_request(fake_proxy, method):
    proxy = fake_proxy()
    hidden = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"%s /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
                     % (method.encode(), len(hidden), hidden))
        raw = recv_to_eof(sock)
    assert raw.count(b"HTTP/1.1 ") == 1, raw
    assert split_response(raw)[1]["connection"] == "close"
    assert b'"object": "list"' not in raw


def test_a_non_streamed_client_that_hangs_up_ends_its_busy_cli(fake_proxy, trace):
    # The CLI writes without pause, so the proxy must look for the client between its lines too.
    proxy = fake_proxy(**trace.env)
    sock = open_raw(proxy.port, chat_body("words:50000000"))
    pid = trace.wait_for_turn()["pid"]
    sock.close()
    wait_reaped(pid, timeout=5)
    assert proxy.wait_for_line(" 499 ", timeout=10)


def test_leftovers_of_a_dead_proxy_are_removed_and_nothing_else(tmp_path):
    temp, home, workdir = tmp_path / "tmp", tmp_path / "home", tmp_path / "cwd"
    for folder in (temp, home, workdir):
        folder.mkdir()
    environ = {"HOME": str(home)}
    projects = os.path.join(claude_max_proxy.claude_projects_dir(environ),
                            claude_max_proxy.project_key(os.path.realpath(str(workdir))))
    os.makedirs(projects)
    dead = subprocess_pid_that_exited()

    def run_dir(name, session=None):
        path = temp / name
        path.mkdir()
        (path / "system-prompt.txt").write_text("secret system prompt")
        if session:
            with open(session, "w") as handle:
                handle.write("{}\n")
            (path / claude_max_proxy.SESSION_POINTER).write_text(session)
        return path

    gone = run_dir("claude-max-proxy-%d-abc" % dead, os.path.join(projects, "%s.jsonl" % uuid.uuid4()))
    foreign_session = str(tmp_path / "elsewhere.jsonl")
    also_gone = run_dir("claude-max-proxy-%d-def" % dead, foreign_session)
    alive = run_dir("claude-max-proxy-%d-ghi" % os.getpid(), os.path.join(projects, "%s.jsonl" % uuid.uuid4()))
    unrelated = run_dir("claude-max-proxy-notapid")
    removed = claude_max_proxy.remove_leftovers(str(workdir), environ, str(temp))
    assert removed == 2 and not gone.exists() and not also_gone.exists()
    assert os.listdir(projects) == [os.path.basename((alive / "session-file").read_text())]
    assert os.path.exists(foreign_session)  # outside this workdir's project folder: not ours
    assert alive.exists() and unrelated.exists()


def subprocess_pid_that_exited():
    import subprocess
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ---- ImageFetcher against local HTTP servers (the address check is widened to loopback here) ------

class ImageServer:
    """A loopback HTTP server whose answers a test scripts per path; it counts connections."""

    def __init__(self, host="127.0.0.1"):
        import http.server
        owner = self
        self.routes, self.connections = {}, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def setup(self):
                owner.connections += 1
                super().setup()

            def do_GET(self):
                route = owner.routes.get(self.path, (404, {}, b""))
                status, headers, body = route
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if callable(body):
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    return body(self.wfile)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://%s:%d" % (host, self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


@pytest.fixture
def images():
    servers = []

    def start(host="127.0.0.1"):
        servers.append(ImageServer(host))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def loopback_only(address):
    return address == "127.0.0.1"


def fetch_error(urls, **kwargs):
    with pytest.raises(claude_max_proxy.ApiError) as caught:
        claude_max_proxy.ImageFetcher(loopback_only, **kwargs).fetch_all(urls)
    error = caught.value
    assert (error.status, error.code) == (400, "image_fetch_failed") or error.code == "too_many_images"
    return error


def test_a_fetched_image_becomes_a_base64_source_following_a_redirect(images):
    server = images()
    server.routes["/cat.png"] = (200, {"Content-Type": "image/png"}, PNG_BYTES)
    server.routes["/moved"] = (302, {"Location": "/cat.png"}, b"")
    fetched = claude_max_proxy.ImageFetcher(loopback_only).fetch_all([server.url + "/moved"])
    assert fetched[server.url + "/moved"] == {"type": "base64", "media_type": "image/png",
                                             "data": base64.b64encode(PNG_BYTES).decode("ascii")}


def test_a_redirect_to_a_refused_address_or_scheme_connects_nowhere(images):
    server, other = images(), images("127.0.0.2")
    other.routes["/cat.png"] = (200, {"Content-Type": "image/png"}, PNG_BYTES)
    server.routes["/to-other"] = (302, {"Location": other.url + "/cat.png"}, b"")
    server.routes["/to-ftp"] = (301, {"Location": "ftp://127.0.0.1/cat.png"}, b"")
    server.routes["/to-file"] = (307, {"Location": "file:///etc/passwd"}, b"")
    for path in ("/to-other", "/to-ftp", "/to-file"):
        fetch_error([server.url + path])
    assert other.connections == 0


def test_fetch_errors_say_nothing_about_the_target(images):
    server = images()
    server.routes["/page"] = (200, {"Content-Type": "text/html"}, b"<html>secret</html>")
    server.routes["/cat.png"] = (200, {"Content-Type": "image/png"}, PNG_BYTES)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    messages = {fetch_error([url]).message.replace(url, "URL") for url in (
        server.url + "/page", server.url + "/missing", "http://127.0.0.1:%d/x.png" % closed_port,
        server.url.replace("127.0.0.1", "127.0.0.3") + "/cat.png")}
    assert len(messages) == 1, messages  # one message, whatever happened
    assert not re.search(r"refused|404|text/html|secret|Not Found", messages.pop())


def test_a_trickling_image_is_cut_at_the_deadline(images):
    server = images()

    def trickle(out):
        for _ in range(100):
            out.write(b"x")
            out.flush()
            time.sleep(0.2)  # the slow target's pace
    server.routes["/slow.png"] = (200, {}, trickle)
    started = time.monotonic()
    fetch_error([server.url + "/slow.png"], seconds=1.0)
    assert time.monotonic() - started < 15  # cut by the deadline, not after all 20 s of it


def test_images_are_capped_in_count_and_bytes(images):
    server = images()
    server.routes["/big.png"] = (200, {"Content-Type": "image/png"}, PNG_BYTES * 1000)
    assert fetch_error([server.url + "/%d.png" % i for i in range(claude_max_proxy.IMAGE_FETCH_COUNT + 1)]
                       ).code == "too_many_images"
    assert server.connections == 0  # counted before any fetch
    fetch_error([server.url + "/big.png"], budget=len(PNG_BYTES) * 10)


def test_a_full_disk_is_a_503_that_says_so(monkeypatch, tmp_path):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path))
    monkeypatch.setattr(claude_max_proxy.tempfile, "mkdtemp", full)
    config = claude_max_proxy.Config(workdir=str(tmp_path / "cwd"))
    call = claude_max_proxy.cli_call_for({"messages": [{"role": "user", "content": "hi"}]}, config)
    run = claude_max_proxy.CliRun(call, config, "/nonexistent/claude", {"HOME": str(tmp_path)})
    with pytest.raises(claude_max_proxy.ApiError) as caught:
        run.start()
    error = caught.value
    assert (error.status, error.code) == (503, "storage_unavailable")
    assert os.strerror(errno.ENOSPC) in error.message and str(tmp_path) in error.message
    assert run.proc is None


def test_a_cli_line_parses_exactly_as_json_loads_of_its_bytes():
    # Lines are decoded before parsing (faster); odd encodings must still end as they always did.
    output = claude_max_proxy.CliOutput(-1, lambda event: None, 600.0)
    lines = [b'{"type":"x","text":"caf\xc3\xa9 \xe2\x9c\x93"}', b'\xef\xbb\xbf{"type":"bom"}',
             '{"type":"utf-16"}'.encode("utf-16"), b'{"type":"x","text":"\xed\xa0\x80"}',
             b'{"type":"x","text":"\xff"}', b"[1]", b"not json", b'{"type":', b"  "]
    garbage = 0
    for line in lines:
        try:
            expected = json.loads(line)
        except ValueError:
            expected = None
        expected = expected if isinstance(expected, dict) else None
        garbage += expected is None and bool(line.strip())
        assert output.parse(line) == expected, line
    assert output.garbage_lines == garbage == 4


def test_control_bytes_in_the_path_are_escaped_in_the_access_log(fake_proxy):
    proxy = fake_proxy()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/\x1b[31mred\x07\x9b HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert split_response(recv_to_eof(sock))[0] == 404
    line = proxy.wait_for_line("/v1/")
    assert "\x1b" not in line and "\x07" not in line and "\x9b" not in line
    assert "\\u001b[31mred" in line


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def test_a_restart_removes_what_a_killed_proxy_left_behind(fake_proxy, trace, tmp_path):
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    first = fake_proxy(**trace.env)
    sock = open_raw(first.port, chat_body(messages=history + [{"role": "user", "content": "c @@fake:hang@@"}]))
    trace.wait_for_turn()
    left = [os.path.join(first.tmp, name) for name in os.listdir(first.tmp)
            if name.startswith("%s%d-" % (claude_max_proxy.RUN_DIR_PREFIX, first.proc.pid))]
    sessions = [os.path.join(folder, name) for folder, _, names in os.walk(str(tmp_path / ".claude"))
                for name in names if name.endswith(".jsonl")]
    assert left and sessions  # the system prompt's dir and the transcript, as a crash leaves them
    first.proc.kill()
    first.proc.wait()
    sock.close()
    for pid in first.tagged_pids():  # its CLI, which a real one would end at stdin EOF
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not first.tagged_pids(), 10, "the orphaned CLI to go")
    fake_proxy(tmp=first.tmp)
    assert not any(os.path.exists(path) for path in left + sessions)
