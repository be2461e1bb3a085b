"""Malformed requests by the thousand against one running proxy (hypothesis property tests).

Each test starts ONE proxy on the fake CLI (mode `text`, so a request that happens to be valid is
answered in ~50 ms) and throws its examples at it. The property everywhere: the answer is an
OpenAI error envelope with a 4xx status, or (for a valid request) a 200 completion; never a 5xx,
a body that is not JSON, a dropped connection or a hang, and the server stays up. Afterwards a
normal request still gets 200 and the `start_proxy` teardown finds no leaked process.

  * known nasty requests: a hand-picked table, every case run and every failure listed at once.
  * chat bodies: wrong types at every field, huge strings, deep nesting, absurd numbers, invalid
    UTF-8 and NUL bytes, unknown roles, bad content parts, non-JSON bodies, bad Content-Types.
  * framing: missing, lying, duplicated or ill-formed Content-Length and Transfer-Encoding.
  * request heads: garbage request lines and header blocks.

Chat examples go over a fresh connection each, and a drawn minority then asks GET /health on the
same connection, so a refused request that leaves bytes behind shows up as a broken next answer.
(A fresh connection, not one shared keep-alive connection: the proxy writes a JSON answer's
headers and body in two sends without TCP_NODELAY, so every answer on a reused connection waits
~40 ms for the client's delayed ACK; 1,000 examples would take a minute on that alone.)
"""

import http.client
import json
import re
import socket
import time

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import claude_max_proxy
from conftest import sse_payloads

HELLO = "Hello from the fake CLI."
CHAT = "/v1/chat/completions"
TIMEOUT = 20           # seconds any one answer may take; a valid request takes ~0.1 s
MAX_BODY = 2_000_000   # generated bodies stay under ~2 MB so the run stays fast
ENVELOPE_KEYS = {"message", "type", "param", "code"}
FUZZ_SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))


# ---- what gets sent ------------------------------------------------------------------------------

class Raw:
    """A JSON fragment written verbatim: what json.dumps cannot write (1e309, -0, deep nesting)."""

    def __init__(self, text, sketch=None):
        self.text = text
        self.sketch = sketch or repr(text)

    def __repr__(self):
        return "Raw(%s)" % self.sketch


def deep(depth, kind="list"):
    """`depth` nested arrays (or objects) as a Raw JSON fragment."""
    if kind == "list":
        return Raw("[" * depth + "]" * depth, "'[' * %d + ']' * %d" % (depth, depth))
    return Raw('{"a": ' * depth + "0" + "}" * depth, "'{\"a\": ' * %d + '0' + '}' * %d" % (depth, depth))


class Sketched(str):
    """A generated string that shows itself by its recipe (`'a' * 140000`) in hypothesis's report."""

    def __new__(cls, text, sketch):
        self = str.__new__(cls, text)
        self.sketch = sketch
        return self

    def __repr__(self):
        return self.sketch

    def _repr_pretty_(self, printer, cycle):
        printer.text(self.sketch)


def huge(prefix, char, count):
    return Sketched(prefix + char * count, "%r + %r * %d" % (prefix, char, count))


def deep_text(depth):
    """JSON text nested `depth` arrays deep, as a string value (for fields parsed a second time)."""
    return Sketched("[" * depth + "]" * depth, "'[' * %d + ']' * %d" % (depth, depth))


def to_json(value, ensure_ascii=True):
    """JSON text that may hold Raw fragments; NaN and Infinity are written as Python does."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{%s}" % ", ".join("%s: %s" % (json.dumps(k, ensure_ascii=ensure_ascii),
                                             to_json(v, ensure_ascii)) for k, v in value.items())
    if isinstance(value, list):
        return "[%s]" % ", ".join(to_json(v, ensure_ascii) for v in value)
    return json.dumps(value, ensure_ascii=ensure_ascii)


def encode(value, ensure_ascii=True):
    # surrogatepass: a lone surrogate written raw becomes bytes that are not UTF-8 at all.
    return to_json(value, ensure_ascii).encode("utf-8", "surrogatepass")


def sketch(value, limit=120):
    """A short repr of a generated value for failure messages (huge strings abbreviated)."""
    if isinstance(value, (Raw, Sketched)):
        return repr(value)
    if isinstance(value, dict):
        return "{%s}" % ", ".join("%s: %s" % (sketch(k, limit), sketch(v, limit)) for k, v in value.items())
    if isinstance(value, list):
        return "[%s]" % ", ".join(sketch(v, limit) for v in value)
    text = repr(value)
    return text if len(text) <= limit else "%s...<%d chars>" % (text[:limit], len(text))


def shorten(data, keep=400):
    return repr(data) if len(data) <= keep else "%r...<%d bytes in all>" % (data[:keep], len(data))


class Request:
    """One generated chat-completions POST; its repr is what hypothesis reports."""

    def __init__(self, body, recipe=None, content_type="application/json", expect_continue=False,
                 follow_up=False):
        self.body, self.content_type = body, content_type
        self.recipe = recipe if recipe is not None else shorten(body)
        self.expect_continue, self.follow_up = expect_continue, follow_up

    def __repr__(self):
        extras = "".join([", expect_continue=True" if self.expect_continue else "",
                          ", follow_up=True" if self.follow_up else ""])
        return "Request(%s, content_type=%r%s, %d bytes)" % (self.recipe, self.content_type, extras,
                                                            len(self.body))


# ---- strategies ----------------------------------------------------------------------------------

def safe_text(max_size=12):
    # No `@@`: a generated `@@fake:hang@@` would switch the fake CLI's mode.
    return st.text(max_size=max_size).map(lambda s: s.replace("@@", "@"))


TRICKY_STRINGS = ["", " ", "\x00", "a\x00b", "\ud800", "x\udfffy", "\ufeff", "\u2028", "\U0001f600",
                  "null", "user", "assistant", "claude-sonnet-4", "sonnet", "[DONE]", "\r\n", "%s%n",
                  "data: x\n\n", "../../etc/passwd", "-" * 40]
ABSURD_NUMBERS = [Raw(t) for t in (
    "1e309", "-1e309", "-0", "-0.0", "1E400", "1e-400", "NaN", "Infinity", "-Infinity",
    "01", "+1", ".5", "1.", "0x10", "1_000", "2e", "--1")] + [
    Raw("1" + "0" * 4299, "'1' + '0' * 4299"), Raw("1" + "0" * 4300, "'1' + '0' * 4300"),
    Raw("-" + "9" * 5000, "'-' + '9' * 5000"),
    2 ** 31, 2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 30, 0.1, 1e308, 5e-324, -0.0]
SMALL_DEPTHS = [2, 50, 900, 1000, 5000]
BIG_DEPTHS = [990, 1000, 5000, 100_000]

strings = st.one_of(safe_text(), st.sampled_from(TRICKY_STRINGS))
numbers = st.one_of(st.integers(), st.floats(), st.sampled_from(ABSURD_NUMBERS))
nestings = st.builds(deep, st.sampled_from(SMALL_DEPTHS), st.sampled_from(["list", "dict"]))
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)
junk = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                    st.dictionaries(strings, kids, max_size=4)),
                    max_leaves=12)
any_value = st.one_of(junk, nestings)


@st.composite
def huge_strings(draw):
    prefix = draw(st.sampled_from(["", "claude-", " "]))
    char = draw(st.sampled_from(["a", "x", "\u00e9", "\U0001f600", "\x00", "\ud800", "\\"]))
    # 12 bytes is the most one character can take once escaped; stay under MAX_BODY either way.
    limit = 1_400_000 if char in "ax" else 110_000
    return huge(prefix, char, draw(st.integers(1_000, limit)))


ROLES = ["user", "assistant", "system", "developer", "tool", "function", "User", "", "bogus",
         "assistant "]
PART_TYPES = ["text", "input_text", "output_text", "refusal", "image_url", "input_image",
              "input_audio", "file", "input_file", "", "TEXT", "tool_result"]
IMAGE_URLS = ["data:image/png;base64,iVBORw0KGgo=", "data:image/png;base64,!!!", "data:image/jpg;base64,AAAA",
              "data:text/plain;base64,AAAA", "data:image/png,AAAA", "http://example.com/a.png",
              "data:image/png;base64,\ud800", "data:;base64,", ""]
image_urls = st.one_of(st.sampled_from(IMAGE_URLS), st.builds(lambda n: huge("data:image/png;base64,", "A", n),
                                                               st.integers(1000, 1_400_000)))
parts = st.one_of(
    st.fixed_dictionaries({"type": st.one_of(st.sampled_from(PART_TYPES), junk)},
                          optional={"text": st.one_of(strings, junk), "refusal": st.one_of(strings, junk),
                                    "image_url": st.one_of(st.fixed_dictionaries({"url": image_urls}),
                                                           image_urls, junk),
                                    "cache_control": junk}),
    junk)
contents = st.one_of(strings, st.none(), st.lists(parts, max_size=4), junk)

TOOL_NAMES = ["get_weather", "", "a" * 64, "a" * 65, "bad name", "x.y", "\ud800"]
ARGUMENTS = ["{}", '{"city": "Paris"}', "[]", "not json", "", "null", "NaN", "{\"a\": 1e309}",
             deep_text(900), deep_text(100_000)]
function_defs = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(TOOL_NAMES), strings, junk)},
    optional={"description": st.one_of(strings, junk),
              "parameters": st.one_of(st.just({"type": "object", "properties": {"city": {"type": "string"}}}),
                                      junk, nestings)})
tool_defs = st.one_of(
    st.fixed_dictionaries({"type": st.one_of(st.sampled_from(["function", "code_interpreter"]), junk),
                           "function": st.one_of(function_defs, junk)}),
    junk)
function_calls = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(TOOL_NAMES), junk)},
    optional={"arguments": st.one_of(st.sampled_from(ARGUMENTS), junk)})
tool_calls = st.one_of(
    st.fixed_dictionaries({"id": st.one_of(st.sampled_from(["call_1", "", "bad id!", "a" * 129]), junk),
                           "type": st.just("function"), "function": st.one_of(function_calls, junk)}),
    junk)
messages = st.one_of(
    st.fixed_dictionaries({"role": st.one_of(st.sampled_from(ROLES), junk)},
                          optional={"content": contents, "name": st.one_of(st.sampled_from(TOOL_NAMES), junk),
                                    "tool_calls": st.one_of(st.lists(tool_calls, max_size=3), junk),
                                    "function_call": st.one_of(function_calls, junk),
                                    "tool_call_id": st.one_of(st.sampled_from(["call_1", ""]), junk),
                                    "refusal": junk}),
    junk)

# Near-valid values per field, so range and type edges are hit, not only random junk.
EFFORT_WORDS = ["minimal", "low", "medium", "high", "xhigh", "max", "", "extreme", "LOW"]
int_edges = st.one_of(st.integers(-3, 5), st.sampled_from([0, 1, 4096, 2 ** 31, 2 ** 63, -1]))
schemas = st.one_of(st.just({"type": "object"}), junk, nestings,
                    st.builds(lambda n: {"description": huge("", "x", n)}, st.integers(90_000, 200_000)))
PLAUSIBLE = {
    "model": st.sampled_from(["claude-sonnet-4", "sonnet", "gpt-4o", "", " ", "openai/claude-opus-4",
                              "claude-", "claude-x!", "CLAUDE-HAIKU-4", "claude-3-5-sonnet-20241022",
                              "claude-\ud800", "\ud800"]),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.just({"include_usage": True}),
                                st.dictionaries(st.sampled_from(["include_usage", "x"]), junk, max_size=2)),
    "max_tokens": int_edges,
    "max_completion_tokens": int_edges,
    "stop": st.one_of(strings, st.lists(strings, max_size=6)),
    "n": int_edges,
    "temperature": st.one_of(st.floats(-1, 3), st.integers(-1, 3)),
    "top_p": st.floats(-0.5, 1.5),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "seed": st.integers(),
    "user": strings,
    "metadata": st.dictionaries(strings, strings, max_size=3),
    "logit_bias": st.dictionaries(strings, st.integers(-100, 100), max_size=3),
    "store": st.booleans(),
    "service_tier": st.sampled_from(["auto", "default", "flex", ""]),
    "logprobs": st.booleans(),
    "top_logprobs": int_edges,
    "tools": st.lists(tool_defs, max_size=3),
    "functions": st.lists(st.one_of(function_defs, junk), max_size=3),
    "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required", {"type": "function"},
                                              {"type": "function", "function": {"name": "get_weather"}}]), junk),
    "function_call": st.one_of(st.sampled_from(["auto", "none", {"name": "get_weather"}]), junk),
    "parallel_tool_calls": st.booleans(),
    "response_format": st.one_of(
        st.sampled_from([{"type": "json_object"}, {"type": "text"}, {"type": "bogus"}]),
        st.fixed_dictionaries({"type": st.just("json_schema"),
                               "json_schema": st.one_of(st.fixed_dictionaries({"name": strings, "schema": schemas}),
                                                        junk)})),
    "reasoning_effort": st.one_of(st.sampled_from(EFFORT_WORDS), junk),
    "reasoning": st.one_of(st.fixed_dictionaries({"effort": st.one_of(st.sampled_from(EFFORT_WORDS), junk)}), junk),
    "include_reasoning": st.booleans(),
}
# Every parameter the proxy knows (its own table, so new ones are fuzzed too), and a few it does not.
FIELDS = sorted(set(PLAUSIBLE) | set(claude_max_proxy.PARAMETERS)) + [
    "messages", "modalities", "audio", "prediction", "web_search_options", "input"]
HUGE_PLACES = ["model", "content", "system", "part", "stop", "user", "name", "key"]


def user_message(text="hi"):
    return {"role": "user", "content": text}


@st.composite
def chat_bodies(draw):
    """A valid request with one to three things broken (some edits leave it valid)."""
    body = {"model": "claude-sonnet-4", "messages": [user_message()]}
    if draw(st.booleans()):
        body["stream"] = True
    # Mostly one edit, mostly to one field: a wrong value deep in the checks is only reached
    # when everything checked before it is right.
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        kind = draw(st.sampled_from(["field"] * 5 + ["drop", "messages", "message", "message", "huge",
                                                     "many", "tool-flow", "whole-field-deep"]))
        if not isinstance(body.get("messages"), list):
            body["messages"] = [user_message()]
        if kind == "field":
            name = draw(st.sampled_from(FIELDS)) if draw(st.integers(0, 9)) else draw(safe_text(8))
            body[name] = draw(st.one_of(PLAUSIBLE.get(name, junk), any_value))
        elif kind == "drop":
            body.pop(draw(st.sampled_from(["model", "messages"])), None)
        elif kind == "messages":
            body["messages"] = draw(st.one_of(st.lists(messages, max_size=5), any_value))
        elif kind == "message":
            position = draw(st.integers(0, len(body["messages"])))
            body["messages"].insert(position, draw(messages))
            if draw(st.booleans()):
                body["messages"].append(user_message())  # so the checks after the bad one run too
        elif kind == "huge":
            place, text = draw(st.sampled_from(HUGE_PLACES)), draw(huge_strings())
            if place in ("model", "stop", "user"):
                body[place] = text
            elif place == "content":
                body["messages"].append(user_message(text))
            elif place == "system":
                body["messages"].insert(0, {"role": "system", "content": text})
            elif place == "part":
                body["messages"].append({"role": "user", "content": [{"type": "text", "text": text}]})
            elif place == "name":
                body["messages"].append({"role": "user", "content": "hi", "name": text})
            else:
                body[text] = 1
        elif kind == "tool-flow":
            # A well-formed exchange with one drawn piece, so the tool-call checks are reached.
            arguments = draw(st.one_of(st.sampled_from(ARGUMENTS), junk))
            function = {"name": "get_weather", "arguments": arguments}
            if draw(st.booleans()):
                body["functions"] = [{"name": "get_weather"}]
                asked = {"role": "assistant", "content": None, "function_call": function}
                answer = {"role": "function", "name": draw(st.one_of(st.just("get_weather"), junk))}
            else:
                body["tools"] = [{"type": "function", "function": {"name": "get_weather", "parameters": {
                    "type": "object", "properties": {"city": {"type": "string"}}}}}]
                call = {"id": "call_1", "type": "function", "function": function}
                asked = {"role": "assistant", "content": None,
                         "tool_calls": [draw(st.one_of(st.just(call), tool_calls))]}
                answer = {"role": "tool", "tool_call_id": draw(st.one_of(st.just("call_1"), junk))}
            answer["content"] = draw(contents)
            body["messages"] = [user_message("weather?"), asked, answer]
        elif kind == "many":
            count = draw(st.sampled_from([0, 1999, 2000, 2001, 5000]))
            roles = draw(st.sampled_from([["user"], ["user", "assistant"], ["system"]]))
            body["messages"] = [{"role": roles[i % len(roles)], "content": "m%d" % i}
                                for i in range(count)] + ([user_message()] if count else [])
        else:
            body[draw(st.sampled_from(["messages", "model", "stop", "metadata"]))] = \
                deep(draw(st.sampled_from(BIG_DEPTHS)), draw(st.sampled_from(["list", "dict"])))
    return body


CONTENT_TYPES = ["application/json"] * 8 + [
    "application/json; charset=utf-8", "Application/JSON", " application/json ",
    "application/json;charset=latin-1", "text/plain", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", "application/jsonl", "application/json-patch+json", "",
    "*/*", "application/json, text/plain", "\xff\xfe", None]
BAD_BYTES = [b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x80", b"\xf4\x90\x80\x80",
             b"\x00" * 1000]


@st.composite
def requests(draw):
    shape = draw(st.sampled_from(["chat"] * 6 + ["junk", "bytes", "deep", "literal", "empty"]))
    ensure_ascii = draw(st.booleans())
    if shape == "chat":
        value = draw(chat_bodies())
    elif shape == "junk":
        value = draw(junk)
    elif shape == "deep":
        value = deep(draw(st.sampled_from(BIG_DEPTHS)), draw(st.sampled_from(["list", "dict"])))
    elif shape == "literal":
        value = draw(st.sampled_from(ABSURD_NUMBERS + TRICKY_STRINGS))
    else:
        value = None
    if shape == "bytes":
        body = draw(st.binary(max_size=512))
        recipe = repr(body)
    elif shape == "empty":
        body, recipe = b"", "b''"
    else:
        body, recipe = encode(value, ensure_ascii), sketch(value)
        if not ensure_ascii:
            recipe += " (ensure_ascii=False)"
    damage = draw(st.sampled_from([None] * 6 + ["insert", "truncate", "append"]))
    if damage:
        position = draw(st.integers(0, len(body)))
        bad = draw(st.sampled_from(BAD_BYTES))
        if damage == "insert":
            body = body[:position] + bad + body[position:]
        elif damage == "truncate":
            body = body[:position]
        else:
            body += bad
        recipe += " then %s %r at byte %d" % (damage, bad[:8], position)
    if len(body) > MAX_BODY:
        body = body[:MAX_BODY]
        recipe += " cut to %d bytes" % MAX_BODY
    return Request(body, recipe, content_type=draw(st.sampled_from(CONTENT_TYPES)),
                   expect_continue=draw(st.sampled_from([False] * 7 + [True])),
                   follow_up=draw(st.sampled_from([False] * 7 + [True])))


# ---- sending and judging -------------------------------------------------------------------------

def media_type(content_type):
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_envelope(raw, where):
    try:
        body = json.loads(raw)
    except ValueError:
        raise AssertionError("error body is not JSON: " + where)
    assert isinstance(body, dict) and list(body) == ["error"], "not an error envelope: " + where
    error = body["error"]
    assert isinstance(error, dict) and set(error) == ENVELOPE_KEYS, "envelope keys: " + where
    assert isinstance(error["message"], str) and error["message"], "message: " + where
    assert isinstance(error["type"], str) and error["type"], "type: " + where
    assert error["param"] is None or isinstance(error["param"], str), "param: " + where
    assert error["code"] is None or isinstance(error["code"], str), "code: " + where


def answer_text(headers, raw, where):
    """The answer text of a 200 chat completion, streamed or not; fails on a malformed one."""
    if headers.get("content-type", "").startswith("text/event-stream"):
        payloads = sse_payloads(raw)
        assert payloads and payloads[-1] == "[DONE]", "stream without [DONE]: " + where
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert all(c.get("object") == "chat.completion.chunk" for c in chunks), where
        assert not any("error" in c for c in chunks), "error event in the stream: " + where
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert headers.get("content-type", "").startswith("application/json"), where
    completion = json.loads(raw)
    assert completion.get("object") == "chat.completion", where
    return completion["choices"][0]["message"]["content"]


def check_chat_answer(request, status, headers, raw):
    where = "%r -> %d %s" % (request, status, shorten(raw))
    if status == 200:
        assert media_type(request.content_type) == "application/json", "served a non-JSON type: " + where
        assert isinstance(json.loads(request.body.decode("utf-8")), dict), "served a non-object: " + where
        # A stop string may cut the fake's answer, so any prefix of it is right.
        assert HELLO.startswith(answer_text(headers, raw, where)), "wrong answer: " + where
        return
    assert 400 <= status < 500, "not a 4xx: " + where
    assert headers.get("content-type", "").startswith("application/json"), "not JSON: " + where
    check_envelope(raw, where)
    if media_type(request.content_type) != "application/json":
        assert status == 415, "a wrong Content-Type is a 415: " + where


def lowered(response):
    return {k.lower(): v for k, v in response.getheaders()}


def send_chat(port, request):
    """POST the request on a fresh connection; (status, headers, body, connection) or a failure."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    headers = {}
    if request.content_type is not None:
        headers["Content-Type"] = request.content_type
    if request.expect_continue:
        headers["Expect"] = "100-continue"
    try:
        try:
            conn.request("POST", CHAT, body=request.body, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the upload ended (no lingering close): read the answer, as httpx does
        response = conn.getresponse()
        return response.status, lowered(response), response.read(), response.will_close, conn
    except socket.timeout:
        conn.close()
        raise AssertionError("no answer within %d s (a hang): %r" % (TIMEOUT, request))
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise AssertionError("no HTTP answer (%r): %r" % (exc, request))


def check_follow_up(conn, request, port):
    """A second request on the same connection must be answered on its own."""
    try:
        conn.request("GET", "/health", headers={"Host": "127.0.0.1:%d" % port})
        response = conn.getresponse()
        status, raw = response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise AssertionError("connection kept open after %r, but the next request got %r"
                             % (request, exc))
    assert status == 200 and json.loads(raw).get("status") == "ok", \
        "the request after %r on the same connection got %d %s" % (request, status, shorten(raw))


def raw_exchange(port, data, half_close=False, method="POST"):
    """Send raw bytes on a fresh connection; (status, headers, body), or None when the server
    closed without a byte. Each request asks for `Connection: close`, so reading ends at EOF."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer before reading everything: its answer is what counts
        response = http.client.HTTPResponse(sock, method=method)
        try:
            response.begin()
        except http.client.RemoteDisconnected:
            return None
        except http.client.HTTPException as exc:
            raise AssertionError("not an HTTP/1.x response: %r" % exc)
        return response.status, lowered(response), response.read()
    except socket.timeout:
        raise AssertionError("no answer within %d s (a hang)" % TIMEOUT)
    finally:
        sock.close()


def head_bytes(request_line, header_lines, body=b""):
    return b"\r\n".join([request_line] + header_lines) + b"\r\n\r\n" + body


def assert_server_fine(proxy):
    assert proxy.proc.poll() is None, "the proxy died:\n" + "\n".join(proxy.lines[-30:])
    status, _, raw = proxy.chat({"model": "claude-sonnet-4", "messages": [user_message()]},
                                timeout=TIMEOUT)
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == HELLO, raw
    deadline = time.monotonic() + 10
    while True:
        slots = json.loads(proxy.request("GET", "/health", timeout=TIMEOUT)[2])["slots"]
        if slots["busy"] == 0 and slots["waiting"] == 0:
            break
        assert time.monotonic() < deadline, "slots still taken after the run: %s" % slots
        time.sleep(0.05)


def fuzz_proxy(fake_proxy):
    return fake_proxy(FAKE_CLAUDE_MODE="text")


# ---- a hand-picked table, every case run --------------------------------------------------------

def post_bytes(port, body, content_type="application/json", extra=()):
    lines = [b"Host: 127.0.0.1:%d" % port, b"Connection: close"]
    if content_type is not None:
        lines.append(b"Content-Type: " + content_type.encode("latin-1"))
    lines += [b"Content-Length: %d" % len(body)] + list(extra)
    return head_bytes(b"POST /v1/chat/completions HTTP/1.1", lines, body)


NASTY = [
    # (name, request: value for to_json or raw bytes)
    ("lone surrogate model", {"model": "\ud800", "messages": [user_message()]}),
    ("lone surrogate in an unknown full model id", {"model": "claude-a\udfff", "messages": [user_message()]}),
    ("model id longer than one argv string (128 KiB)",
     {"model": huge("claude-", "a", 140_000), "messages": [user_message()]}),
    ("model id of 1 MB", {"model": huge("claude-", "a", 1_000_000), "messages": [user_message()]}),
    ("100,000 nested arrays", deep(100_000)),
    ("100,000 nested objects", deep(100_000, "dict")),
    ("tool call arguments nested 100,000 deep",
     {"tools": [{"type": "function", "function": {"name": "get_weather"}}],
      "messages": [user_message(), {"role": "assistant", "tool_calls": [
          {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": deep_text(100_000)}}]},
          {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]}),
    ("legacy function_call arguments nested 100,000 deep",
     {"functions": [{"name": "get_weather"}],
      "messages": [user_message(), {"role": "assistant", "function_call": {"name": "get_weather",
                                                                           "arguments": deep_text(100_000)}},
                   {"role": "function", "name": "get_weather", "content": "sunny"}]}),
    ("reasoning_effort an array", {"messages": [user_message()], "reasoning_effort": []}),
    ("reasoning.effort an object", {"messages": [user_message()], "reasoning": {"effort": {}}}),
    ("990 nested arrays as the role", {"messages": [{"role": deep(990), "content": "hi"}]}),
    ("990 nested arrays as a part type",
     {"messages": [{"role": "user", "content": [{"type": deep(990)}]}]}),
    ("invalid UTF-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    ("raw lone surrogate bytes", b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'),
    ("NUL bytes between tokens", b'{"messages":\x00[]}'),
    ("a UTF-8 BOM", b'\xef\xbb\xbf{"messages": [{"role": "user", "content": "hi"}]}'),
    ("1e309 temperature", {"messages": [user_message()], "temperature": Raw("1e309")}),
    ("NaN top_p", {"messages": [user_message()], "top_p": Raw("NaN")}),
    ("-0 n", {"messages": [user_message()], "n": Raw("-0")}),
    ("4301-digit max_tokens", {"messages": [user_message()], "max_tokens": Raw("1" + "0" * 4300)}),
    ("4300-digit max_tokens", {"messages": [user_message()], "max_tokens": Raw("1" + "0" * 4299)}),
    ("huge seed", {"messages": [user_message()], "seed": Raw("9" * 4000)}),
    ("unknown role", {"messages": [{"role": "tool", "content": "hi"}]}),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
    ("part without type", {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}),
    ("2001 messages", {"messages": [user_message()] * 2001}),
    ("stop with a lone surrogate", {"messages": [user_message()], "stop": "\ud800"}),
    ("NUL in the system prompt", {"messages": [{"role": "system", "content": "a\x00b"}, user_message()]}),
    ("form content type", {"messages": [user_message()]}, "application/x-www-form-urlencoded"),
    ("no content type", {"messages": [user_message()]}, None),
    ("not JSON at all", b"model=claude&messages=hi"),
    ("empty body", b""),
]


def test_known_nasty_requests_get_a_json_4xx_or_a_completion(fake_proxy):
    proxy = fuzz_proxy(fake_proxy)
    failures = []
    for case in NASTY:
        name, value = case[0], case[1]
        content_type = case[2] if len(case) > 2 else "application/json"
        body = value if isinstance(value, bytes) else encode(value)
        request = Request(body, name, content_type)
        try:
            answer = raw_exchange(proxy.port, post_bytes(proxy.port, body, content_type))
            assert answer is not None, "connection closed without an answer: %r" % request
            check_chat_answer(request, *answer)
        except AssertionError as exc:
            failures.append("%s: %s" % (name, str(exc)[:600]))
    assert_server_fine(proxy)
    assert not failures, "%d of %d cases failed:\n" % (len(failures), len(NASTY)) + "\n".join(failures)


# ---- 1,000+ generated chat requests against one proxy -------------------------------------------

def check_chat_example(proxy, request):
    status, headers, raw, will_close, conn = send_chat(proxy.port, request)
    try:
        note("answer: %d %s" % (status, shorten(raw)))
        check_chat_answer(request, status, headers, raw)
        if request.follow_up and not will_close:
            check_follow_up(conn, request, proxy.port)
    finally:
        conn.close()
    assert proxy.proc.poll() is None, "the proxy died after %r" % request


def test_fuzzed_chat_requests_get_a_json_4xx_or_a_completion(fake_proxy):
    proxy = fuzz_proxy(fake_proxy)
    sent = []

    @settings(max_examples=1100, **FUZZ_SETTINGS)
    @given(request=requests())
    def check(request):
        sent.append(1)
        check_chat_example(proxy, request)

    started = time.monotonic()
    check()
    print("\n%d chat examples in %.1f s" % (len(sent), time.monotonic() - started))
    assert len(sent) >= 1000
    assert_server_fine(proxy)


# ---- framing: Content-Length and Transfer-Encoding ------------------------------------------------

VALID_BODY = encode({"model": "claude-sonnet-4", "messages": [user_message()]})
FRAMING_BODIES = [VALID_BODY, b'{"messages": "x"}', b"", b"{", b"[]"]
DIGITS = re.compile(r"^[0-9]+$")


@st.composite
def framed_requests(draw):
    """(description, raw bytes, half_close, framing_is_invalid, transfer_encoding)."""
    body = draw(st.sampled_from(FRAMING_BODIES))
    size = len(body)
    kind = draw(st.sampled_from(["exact", "missing", "shorter", "longer", "zero", "syntax",
                                 "duplicate-same", "duplicate-other", "list"]))
    values, sent, half_close = [], body, False
    if kind == "exact":
        values = [draw(st.sampled_from(["%d", " %d", "%d ", "\t%d", "00%d"])) % size]
    elif kind == "shorter" and size:
        values = ["%d" % draw(st.integers(0, size - 1))]
    elif kind == "longer":
        values, half_close = ["%d" % (size + draw(st.integers(1, 100)))], True
    elif kind == "zero":
        values = ["0"]
    elif kind == "syntax":
        spelled = "%d" % size if size >= 10 else "0%d" % size
        values = [draw(st.sampled_from([
            "+%d" % size, spelled[0] + "_" + spelled[1:], "%d.0" % size, "%de0" % size,
            "0x%x" % size, "-%d" % size, "", "abc", "9" * 25, "%d\x00" % size, "%d;x" % size,
            "\xbd", "%d %d" % (size, size)]))]
    elif kind == "duplicate-same":
        values = ["%d" % size, "%d" % size]
    elif kind == "duplicate-other":
        other = size + draw(st.sampled_from([-1, 1, 5])) if size else 3
        values = draw(st.permutations(["%d" % size, "%d" % max(other, 0)]))
        half_close = True  # a server that believes the larger value waits for bytes that never come
    elif kind == "list":
        values = ["%d, %d" % (size, size)]
    encoding = draw(st.sampled_from([None] * 5 + ["chunked", "Chunked", "gzip", "gzip, chunked",
                                                  "chunked, gzip", "identity"]))
    if encoding and "chunked" in encoding.lower() and draw(st.booleans()):
        sent = b"%x\r\n%s\r\n0\r\n\r\n" % (size, body) if size else b"0\r\n\r\n"
    lines = [b"Host: 127.0.0.1", b"Connection: close", b"Content-Type: application/json"]
    lines += [b"Content-Length: " + v.encode("latin-1") for v in values]
    if encoding:
        lines.append(b"Transfer-Encoding: " + encoding.encode())
    data = head_bytes(b"POST /v1/chat/completions HTTP/1.1", lines, sent)
    stripped = [v.strip(" \t") for v in values]
    # RFC 9112 6.3: Content-Length is 1*DIGIT; differing values make the framing invalid
    # ("n, n" may be taken as n or refused, so it counts as neither).
    invalid = (kind != "list" and any(not DIGITS.match(v) for v in stripped)) or len(set(stripped)) > 1
    description = "Content-Length %r, Transfer-Encoding %r, body %r%s" % (
        values, encoding, sent[:80], ", then half-close" if half_close else "")
    return description, data, half_close, invalid, encoding


def check_framing_example(proxy, case):
    description, data, half_close, invalid, encoding = case
    answer = raw_exchange(proxy.port, data, half_close=half_close)
    assert proxy.proc.poll() is None, "the proxy died after: " + description
    if answer is None:
        # Only a request whose body never completed may go unanswered.
        assert half_close, "connection closed without an answer: " + description
        return
    status, headers, raw = answer
    where = "%s -> %d %s" % (description, status, shorten(raw))
    if status == 200:
        assert not invalid, "invalid Content-Length served as a request (RFC 9112 6.3): " + where
        assert not encoding, "Transfer-Encoding ignored, body framed by Content-Length: " + where
        assert answer_text(headers, raw, where) == HELLO, where
        return
    # 501 is what RFC 9112 asks for a transfer coding the server does not know.
    assert 400 <= status < 500 or (status == 501 and encoding), "not a 4xx: " + where
    assert headers.get("content-type", "").startswith("application/json"), "not JSON: " + where
    check_envelope(raw, where)


def test_fuzzed_framing_headers_get_a_json_4xx_or_a_completion(fake_proxy):
    proxy = fuzz_proxy(fake_proxy)
    sent = []

    @settings(max_examples=300, **FUZZ_SETTINGS)
    @given(case=framed_requests())
    def check(case):
        sent.append(1)
        check_framing_example(proxy, case)

    check()
    assert len(sent) >= 300
    assert_server_fine(proxy)


# ---- request heads: request lines and header blocks ---------------------------------------------

METHODS = ["POST", "GET", "PUT", "DELETE", "PATCH", "FOO", "post", "Get", "P\x00ST", "\xff\xfe",
           "CONNECT", "TRACE", "PRI", "M-SEARCH", "G E T"]
KNOWN_METHODS = {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"}
TARGETS = ["/v1/chat/completions", "/health", "/v1/models", "*", "http://127.0.0.1/v1/chat/completions",
           "/v1/chat/completions?x=\xff", "/%00", "/\x00", "/v1/models/\xff", "//v1//chat",
           "/v1/models/claude-" + "a" * 200, "/" + "a" * 70_000, "/v1/chat/completions#frag"]
# No HTTP/0.9 forms: a 0.9 request gets a bare body by design, which no 1.x client could parse.
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/3.0", "HTTP/1.1x", "HTTP/1", "HTTP/11.1",
            "http/1.1", "FOO/1.1", "HTTP/1.1.1", "HTTP/1.-1", "HTTP/1.10"]
HEADER_LINES = [b"X-Test: 1", b"no-colon-here", b" folded: continuation", b"\tfolded", b"X-Nul: a\x00b",
                b"X-High: \xff\xfe", b": no-name", b"Bad Name: x", b"Content-Type: text/plain",
                b"Host: attacker.example", b"Origin: http://evil.example", b"Authorization: Bearer x",
                b"Expect: 100-continue", b"Expect: nonsense", b"Connection: keep-alive, close",
                b"X-Long: " + b"a" * 70_000, b"Accept: \x00"]


@st.composite
def request_heads(draw):
    method, target, version = (draw(st.sampled_from(METHODS)), draw(st.sampled_from(TARGETS)),
                               draw(st.sampled_from(VERSIONS)))
    lines = [b"Host: 127.0.0.1"] if draw(st.booleans()) else []
    lines += draw(st.lists(st.sampled_from(HEADER_LINES), max_size=4))
    if draw(st.sampled_from([False] * 9 + [True])):
        lines += [b"X-Many: 1"] * 101
    body = b""
    if method in ("POST", "PUT", "PATCH", "FOO"):
        body = draw(st.sampled_from([VALID_BODY, b'{"messages": 1}', b""]))
        lines += [b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
    lines.append(b"Connection: close")
    request_line = ("%s %s %s" % (method, target, version)).encode("latin-1")
    data = head_bytes(request_line, lines, body)
    description = "%s, headers %s, body %r" % (shorten(request_line, 120),
                                               shorten(b" | ".join(lines), 300), body[:60])
    return description, data, method, version


def check_head_example(proxy, case):
    description, data, method, version = case
    answer = raw_exchange(proxy.port, data, method=method if method in KNOWN_METHODS else "GET")
    assert proxy.proc.poll() is None, "the proxy died after: " + description
    assert answer is not None, "connection closed without an answer: " + description
    status, headers, raw = answer
    where = "%s -> %d %s %s" % (description, status, headers.get("content-type"), shorten(raw))
    assert headers.get("content-type", "").startswith("application/json"), "not JSON: " + where
    if status == 200:
        json.loads(raw)
        return
    check_envelope(raw, where)
    # RFC 9110/9112 name two 5xx codes for what the client got wrong: 501 for a method the
    # server does not know, 505 for an HTTP major version it does not speak.
    allowed_5xx = {501} if method not in KNOWN_METHODS else set()
    major = re.match(r"^HTTP/(\d+)\.\d+$", version)
    if major and int(major.group(1)) >= 2:
        allowed_5xx.add(505)
    assert 400 <= status < 500 or status in allowed_5xx, "status: " + where


def test_fuzzed_request_heads_get_a_json_error(fake_proxy):
    proxy = fuzz_proxy(fake_proxy)
    sent = []

    @settings(max_examples=300, **FUZZ_SETTINGS)
    @given(case=request_heads())
    def check(case):
        sent.append(1)
        check_head_example(proxy, case)

    check()
    assert len(sent) >= 300
    assert_server_fine(proxy)


# ---- client text that looks like a CLI command or a file mention --------------------------------

PROMPT_SIGILS = ["/", "@", "!", "#", "@~/", "@/", '@"', "/cost ", "/heapdump", "/context ", "@./"]
prompt_texts = st.builds(lambda sigil, rest, lead: lead + sigil + rest, st.sampled_from(PROMPT_SIGILS),
                         safe_text(40), st.sampled_from(["", " ", "\n", "see "]))


def test_fuzzed_command_and_mention_texts_reach_the_cli_verbatim_and_marked(fake_proxy):
    """Whatever `/`, `@`, `!` or `#` text a client sends is handed over unchanged, marked as not
    typed (the real CLI's handling of that mark is pinned in tests/test_e2e_cli.py)."""
    proxy = fake_proxy(FAKE_CLAUDE_MODE="echo_args")
    sent = []

    @settings(max_examples=150, **FUZZ_SETTINGS)
    @given(text=prompt_texts, stream=st.booleans())
    def check(text, stream):
        sent.append(1)
        status, headers, raw = proxy.chat({"model": "claude-sonnet-4", "stream": stream,
                                           "messages": [user_message(text)]}, timeout=TIMEOUT)
        assert status == 200, raw
        echoed = json.loads(answer_text(headers, raw, text))
        assert echoed["stdin"]["text_not_typed"] is True
        assert echoed["stdin"]["message"]["content"] == ([{"type": "text", "text": text}] if text else [])
        assert "--disable-slash-commands" in echoed["argv"] and "--restricted" in echoed["argv"]

    check()
    assert len(sent) >= 150
