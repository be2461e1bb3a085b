"""End to end: client -> proxy -> the real, pinned Claude Code CLI -> tests/fake_upstream.py.

Each test puts a unique `@@id:...@@` marker in its prompt and reads back, from the fake
upstream's request log, exactly what the CLI sent to "Anthropic" on its behalf.
"""

import json
import os
import socket
import time
import uuid

import pytest

from conftest import sse_payloads

TEXT = "Hello from the fake upstream."


def marker():
    return "@@id:%s@@" % uuid.uuid4().hex


def upstream_texts(body):
    """(role, text) for every message the upstream received, skipping the CLI's system rows."""
    out = []
    for message in body["messages"]:
        if message["role"] == "system":
            continue
        content = message["content"]
        text = content if isinstance(content, str) else "".join(
            b.get("text", "") for b in content if b.get("type") == "text")
        out.append((message["role"], text))
    return out


def only_request(upstream, mark):
    bodies = upstream.messages_requests(mark)
    assert len(bodies) == 1, "expected exactly one upstream model call, got %d" % len(bodies)
    return bodies[0]


def chat(proxy, messages, **extra):
    body = dict(model="claude-sonnet-4", messages=messages, **extra)
    return proxy.chat(body)


# ---- answers ---------------------------------------------------------------------------------

def test_plain_completion_has_openai_shape_and_one_upstream_call(e2e_proxy, upstream):
    mark = marker()
    status, headers, raw = chat(e2e_proxy, [{"role": "user", "content": "Say hi " + mark}])
    assert status == 200, raw
    body = json.loads(raw)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": TEXT, "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["model"] == only_request(upstream, mark)["model"]  # what the CLI reports
    usage = body["usage"]
    assert usage["completion_tokens"] > 0 and usage["prompt_tokens"] > usage["prompt_tokens_details"]["cached_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert headers["x-request-id"].startswith("req_")


def test_streamed_completion_arrives_in_deltas_with_usage(e2e_proxy, upstream):
    mark = marker()
    status, headers, raw = chat(e2e_proxy, [{"role": "user", "content": "Say hi " + mark}],
                                stream=True, stream_options={"include_usage": True})
    assert status == 200, raw
    assert headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(raw)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert "".join(x for x in contents if x) == TEXT
    assert len([x for x in contents if x]) >= 3  # token by token, not one buffered blob
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [f for f in finishes if f] == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    only_request(upstream, mark)


# ---- what reaches the upstream ---------------------------------------------------------------

def test_system_prompt_replaces_agent_prompt_and_request_is_small(e2e_proxy, upstream):
    mark = marker()
    system = "You are a pirate. " + uuid.uuid4().hex
    status, _, raw = chat(e2e_proxy, [{"role": "system", "content": system},
                                      {"role": "user", "content": "Say hi " + mark}])
    assert status == 200, raw
    sent = only_request(upstream, mark)
    system_text = "\n".join(b["text"] for b in sent["system"])
    assert system in system_text
    assert len(system_text) < 1000  # not Claude Code's ~100 KB agent prompt
    assert sent["tools"] == [] if "tools" in sent else True
    logged = [r for r in upstream.requests if mark in json.dumps(r["body"])]
    assert logged[0]["bytes"] <= 4000, logged[0]["bytes"]


def test_neutral_system_prompt_when_client_sends_none(e2e_proxy, upstream):
    mark = marker()
    assert chat(e2e_proxy, [{"role": "user", "content": "Say hi " + mark}])[0] == 200
    system_text = "\n".join(b["text"] for b in only_request(upstream, mark)["system"])
    assert "You are Claude" in system_text and len(system_text) < 1000


def test_history_reaches_model_as_real_alternating_turns(e2e_proxy, upstream):
    mark = marker()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My name is Bob."},
        {"role": "assistant", "content": "Nice to meet you, Bob."},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And my name? " + mark},
    ]
    status, _, raw = chat(e2e_proxy, messages)
    assert status == 200, raw
    assert upstream_texts(only_request(upstream, mark)) == [
        ("user", "My name is Bob."), ("assistant", "Nice to meet you, Bob."),
        ("user", "What is 2+2?"), ("assistant", "4."), ("user", "And my name? " + mark)]


def test_history_session_file_is_removed_after_the_request(e2e_proxy, cli_home):
    mark = marker()
    status, headers, _ = chat(e2e_proxy, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                          {"role": "user", "content": "c " + mark}])
    assert status == 200
    # The access-log line is written once the request's CLI is reaped and its files removed.
    assert e2e_proxy.wait_for_line(headers["x-request-id"]) is not None
    projects = os.path.join(cli_home, ".claude", "projects")
    leftovers = []
    for folder, _, files in os.walk(projects):
        leftovers += [os.path.join(folder, f) for f in files if f.endswith(".jsonl")]
    assert leftovers == []


def test_max_tokens_reaches_upstream(e2e_proxy, upstream):
    mark = marker()
    assert chat(e2e_proxy, [{"role": "user", "content": "hi " + mark}], max_completion_tokens=123)[0] == 200
    assert only_request(upstream, mark)["max_tokens"] == 123


def test_length_finish_and_exactly_one_call_when_upstream_hits_max_tokens(e2e_proxy, upstream):
    mark = marker()
    status, _, raw = chat(e2e_proxy, [{"role": "user", "content": "@@scenario:max_tokens@@ " + mark}])
    assert status == 200, raw
    body = json.loads(raw)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "This answer is cut"
    only_request(upstream, mark)


def test_stop_string_cuts_the_real_stream(e2e_proxy):
    mark = marker()
    status, _, raw = chat(e2e_proxy, [{"role": "user", "content": "hi " + mark}], stop=["fake"], stream=True)
    chunks = [json.loads(p) for p in sse_payloads(raw)[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "Hello from the "
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["stop"]


def test_one_megabyte_prompt_goes_through_stdin(e2e_proxy, upstream):
    mark = marker()
    big = ("lorem ipsum " * 90000)[:1000000]
    status, _, raw = chat(e2e_proxy, [{"role": "user", "content": big + mark}])
    assert status == 200, raw[:500]
    assert upstream_texts(only_request(upstream, mark))[-1] == ("user", big + mark)


# ---- safety ----------------------------------------------------------------------------------

def test_host_tools_are_off_and_a_secret_file_never_leaves(e2e_proxy, upstream, tmp_path):
    secret = "SECRET-" + uuid.uuid4().hex
    path = tmp_path / "secret.txt"
    path.write_text(secret)
    mark = marker()
    status, _, raw = chat(e2e_proxy, [{"role": "user", "content": "@@scenario:read_file@@ @@path:%s@@ %s"
                                       % (path, mark)}])
    assert secret not in raw.decode()
    for request in upstream.messages_requests(mark):
        assert secret not in json.dumps(request)
        assert request.get("tools", []) == []


def test_user_and_project_claude_md_do_not_leak(start_proxy, real_claude, e2e_env, upstream, cli_home, tmp_path):
    """~/.claude/CLAUDE.md, and CLAUDE.md in the CLI's directory or above it, stay out."""
    canaries = ["CANARY-%d-%s" % (i, uuid.uuid4().hex) for i in range(3)]
    os.makedirs(os.path.join(cli_home, ".claude"), exist_ok=True)
    user_md = os.path.join(cli_home, ".claude", "CLAUDE.md")
    workdir = tmp_path / "work"
    workdir.mkdir()
    with open(user_md, "w") as handle:
        handle.write(canaries[0])
    (tmp_path / "CLAUDE.md").write_text(canaries[1])
    (workdir / "CLAUDE.md").write_text(canaries[2])
    try:
        proxy = start_proxy(["--claude", real_claude, "--workdir", str(workdir)], e2e_env)
        mark = marker()
        assert chat(proxy, [{"role": "user", "content": "hi " + mark}])[0] == 200
        sent = json.dumps(only_request(upstream, mark))
        assert [c for c in canaries if c in sent] == []
    finally:
        os.unlink(user_md)


# ---- upstream errors become HTTP errors ------------------------------------------------------

@pytest.mark.parametrize("scenario,status,kind", [
    ("401", 401, "authentication_error"),
    ("429", 429, "rate_limit_error"),
    ("529", 503, "server_error"),
    ("500", 502, "server_error"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_errors_map_to_http_errors(e2e_proxy, scenario, status, kind, stream):
    mark = marker()
    got, headers, raw = chat(e2e_proxy, [{"role": "user", "content": "@@scenario:%s@@ %s" % (scenario, mark)}],
                             stream=stream)
    assert got == status, raw
    error = json.loads(raw)["error"]
    assert error["type"] == kind and error["message"]
    assert "Hello" not in raw.decode()
    if status == 401:
        assert "claude auth login" in error["message"]
    # the server is still up and answers normally
    assert chat(e2e_proxy, [{"role": "user", "content": "Say hi " + marker()}])[0] == 200


def test_dropped_upstream_connection_is_an_error_not_an_answer(e2e_proxy):
    status, _, raw = chat(e2e_proxy, [{"role": "user", "content": "@@scenario:drop@@ " + marker()}])
    if status == 200:
        pytest.fail("a dropped upstream stream was reported as a success: %r" % raw[:300])
    assert status == 502 and json.loads(raw)["error"]["type"] == "server_error"


# ---- processes -------------------------------------------------------------------------------

def test_client_disconnect_ends_the_cli(e2e_proxy, upstream):
    mark = marker()
    body = json.dumps({"model": "claude-sonnet-4", "stream": True,
                       "messages": [{"role": "user", "content": "@@scenario:hang@@ " + mark}]}).encode()
    sock = socket.create_connection(("127.0.0.1", e2e_proxy.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 30
    while not upstream.messages_requests(mark):  # the CLI is running and waiting on the model
        assert time.monotonic() < deadline, "the CLI never reached the upstream"
        time.sleep(0.05)
    assert e2e_proxy.tagged_pids(), "a claude process should be running now"
    sock.close()
    deadline = time.monotonic() + 5
    while e2e_proxy.tagged_pids():
        assert time.monotonic() < deadline, "the CLI outlived its client by 5 s"
        time.sleep(0.05)
    line = e2e_proxy.wait_for_line(" 499 ", timeout=5)
    assert line is not None


# ---- a real client -------------------------------------------------------------------------------

def test_openai_python_client_accepts_streamed_and_plain_answers(e2e_proxy):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=e2e_proxy.url + "/v1", api_key="unused", max_retries=0)
    plain = client.chat.completions.create(model="claude-opus-4",
                                           messages=[{"role": "user", "content": "Say hi " + marker()}])
    assert plain.choices[0].message.content == TEXT
    assert plain.usage.total_tokens > 0
    stream = client.chat.completions.create(model="claude-opus-4", stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "Say hi " + marker()}])
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == TEXT and usage.completion_tokens > 0
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="claude-opus-4",
                                       messages=[{"role": "user", "content": "@@scenario:429@@ " + marker()}])
