"""End to end for the Messages API: the official `anthropic` SDK -> proxy -> the real CLI -> the fake
upstream (tests/fake_upstream.py), unmodified, as an Anthropic-native client would use it.

Each test puts a unique `@@id:...@@` marker in its prompt and reads back from the fake upstream's
request log exactly what the CLI sent on its behalf.
"""

import json
import uuid

import pytest

from conftest import marker, only_request, sse_payloads, upstream_texts

anthropic = pytest.importorskip("anthropic")

TEXT = "Hello from the fake upstream."
MODEL = "claude-sonnet-4"
WEATHER = {"name": "get_weather", "description": "Current weather for a city " + uuid.uuid4().hex[:6],
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


@pytest.fixture
def client(e2e_proxy):
    # The base URL has no /v1: the SDK adds /v1/messages itself.
    return anthropic.Anthropic(base_url=e2e_proxy.url, api_key="unused", max_retries=0)


def user(text):
    return [{"role": "user", "content": text}]


def tool_prompt(mark, args, say=None):
    text = "weather? @@scenario:tool_use@@ @@args:%s@@ %s" % (json.dumps(args), mark)
    return text + (" @@say:%s@@" % say if say else "")


def system_texts(body):
    # The first block is the CLI's billing header (a per-request hash): not part of the prompt.
    return [b["text"] for b in body["system"] if not b["text"].startswith("x-anthropic-billing-header")]


def fake_input_tokens(body):
    """What tests/fake_upstream.py reports as input tokens for a request it received."""
    return max(1, len(json.dumps(body.get("messages"))) // 4)


# ---- answers ---------------------------------------------------------------------------------

def test_plain_message_has_anthropics_shape_and_the_upstream_usage(client, upstream):
    mark = marker()
    message = client.messages.create(model=MODEL, max_tokens=256, messages=user("Say hi " + mark))
    sent = only_request(upstream, mark)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message._request_id.startswith("req_")  # the SDK reads Anthropic's `request-id` header
    assert [(b.type, b.text) for b in message.content] == [("text", TEXT)]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.model == sent["model"]  # what the CLI reports using
    assert message.usage.input_tokens == fake_input_tokens(sent)
    assert message.usage.cache_read_input_tokens == 3 and message.usage.cache_creation_input_tokens == 0
    assert message.usage.output_tokens > 0
    assert sent["max_tokens"] == 256


def test_streamed_message_sends_anthropics_events_in_order(client, upstream):
    mark = marker()
    with client.messages.stream(model=MODEL, max_tokens=256, messages=user("Say hi " + mark)) as stream:
        events = list(stream)
        final = stream.get_final_message()
    names = [e.type for e in events if e.type in ("message_start", "content_block_start", "content_block_delta",
                                                  "content_block_stop", "message_delta", "message_stop")]
    deltas = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert names == ["message_start", "content_block_start"] + ["content_block_delta"] * len(deltas) + [
        "content_block_stop", "message_delta", "message_stop"]
    assert len(deltas) >= 3 and "".join(deltas) == TEXT  # token by token, not one buffered blob
    assert [(b.type, b.text) for b in final.content] == [("text", TEXT)]
    assert final.stop_reason == "end_turn"
    sent = only_request(upstream, mark)
    start = next(e for e in events if e.type == "message_start")
    assert start.message.usage.input_tokens == final.usage.input_tokens == fake_input_tokens(sent)
    assert final.usage.output_tokens > 0 and final.usage.cache_read_input_tokens == 3


def test_streamed_bytes_name_each_event_as_its_data_type(e2e_proxy):
    body = {"model": MODEL, "max_tokens": 100, "stream": True, "messages": user("Say hi " + marker())}
    status, headers, raw = e2e_proxy.request("POST", "/v1/messages", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    frames = [block for block in raw.decode().split("\n\n") if block.strip()]
    assert frames[0].startswith("event: message_start\n") and frames[1] == 'event: ping\ndata: {"type": "ping"}'
    for frame in frames:
        name, data = frame.split("\n")
        assert name == "event: " + json.loads(data[len("data: "):])["type"]
    assert json.loads(sse_payloads(raw)[-1]) == {"type": "message_stop"}


@pytest.mark.parametrize("system", ["You are a pirate. SYS", [
    {"type": "text", "text": "You are a pirate."}, {"type": "text", "text": "SYS", "cache_control": {"type": "ephemeral"}}]])
def test_system_prompt_as_string_or_blocks_replaces_the_agent_prompt(client, upstream, system):
    mark, secret = marker(), uuid.uuid4().hex
    system = system.replace("SYS", secret) if isinstance(system, str) else [
        dict(b, text=b["text"].replace("SYS", secret)) for b in system]
    client.messages.create(model=MODEL, max_tokens=100, system=system, messages=user("Say hi " + mark))
    text = "\n".join(system_texts(only_request(upstream, mark)))
    assert "You are a pirate." in text and secret in text and len(text) < 1000


def test_three_turn_history_reaches_the_model_as_real_turns(client, upstream):
    mark = marker()
    messages = [
        {"role": "user", "content": "My name is Bob."},
        {"role": "assistant", "content": [{"type": "text", "text": "Nice to meet you, Bob."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And my name? " + mark},
    ]
    message = client.messages.create(model=MODEL, max_tokens=100, messages=messages)
    assert message.content[0].text == TEXT
    assert upstream_texts(only_request(upstream, mark)) == [
        ("user", "My name is Bob."), ("assistant", "Nice to meet you, Bob."),
        ("user", "What is 2+2?"), ("assistant", "4."), ("user", "And my name? " + mark)]


# ---- tools -----------------------------------------------------------------------------------

def test_tool_loop_returns_the_clients_name_and_exact_input_then_continues(client, upstream, e2e_proxy):
    mark, args = marker(), {"city": "Paris", "units": ["c", 1, None], "deep": {"x": 1.5}}
    messages = user(tool_prompt(mark, args, "Let_me_check."))
    first = client.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER], messages=messages)
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["text", "tool_use"] and first.content[0].text == "Let me check."
    call = first.content[1]
    assert call.name == "get_weather" and call.input == args and call.id
    offered = [t for t in only_request(upstream, mark)["tools"] if t["name"].endswith("get_weather")]
    assert offered[0]["input_schema"] == WEATHER["input_schema"]
    result = "Sunny, 21C " + uuid.uuid4().hex[:6]
    messages += [{"role": "assistant", "content": first.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": result}]}]
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=200, tools=[WEATHER], messages=messages)
    second = raw.parse()
    assert [(b.type, b.text) for b in second.content] == [("text", "tool said: " + result)]
    assert second.stop_reason == "end_turn"
    bodies = upstream.messages_requests(mark)
    assert len(bodies) == 2  # one model call per request
    assert " reused=1" in e2e_proxy.wait_for_line(raw.headers["x-request-id"])  # the waiting process went on


def test_streamed_tool_loop_sends_input_json_deltas_and_continues(client, upstream):
    mark, args = marker(), {"city": "Oslo", "days": 3}
    messages = user(tool_prompt(mark, args))
    with client.messages.stream(model=MODEL, max_tokens=200, tools=[WEATHER], messages=messages) as stream:
        events = list(stream)
        first = stream.get_final_message()
    fragments = [e.delta.partial_json for e in events
                 if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert json.loads("".join(fragments)) == args
    assert first.stop_reason == "tool_use"
    [call] = [b for b in first.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.input == args
    messages += [{"role": "assistant", "content": first.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                               "content": [{"type": "text", "text": "Snow"}]}]}]
    with client.messages.stream(model=MODEL, max_tokens=200, tools=[WEATHER], messages=messages) as stream:
        assert "".join(stream.text_stream) == "tool said: Snow"
        assert stream.get_final_message().stop_reason == "end_turn"
    assert len(upstream.messages_requests(mark)) == 2


def test_tool_result_without_a_waiting_process_replays_the_exchange(client, upstream):
    mark = marker()
    messages = [
        {"role": "user", "content": tool_prompt(mark, {"city": "Rome"})},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_cold1", "name": "get_weather",
                                           "input": {"city": "Rome"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_cold1", "content": "Hot"}]},
    ]
    message = client.messages.create(model=MODEL, max_tokens=100, tools=[WEATHER], messages=messages)
    assert message.content[0].text == "tool said: Hot"
    sent = only_request(upstream, mark)
    uses = [b for m in sent["messages"] if m["role"] == "assistant" for b in m["content"] if b["type"] == "tool_use"]
    assert [(u["id"], u["input"]) for u in uses] == [("toolu_cold1", {"city": "Rome"})]


def test_tool_choice_none_hides_the_tools_and_any_is_an_instruction(client, upstream):
    mark = marker()
    client.messages.create(model=MODEL, max_tokens=100, tools=[WEATHER], tool_choice={"type": "none"},
                           messages=user("hi " + mark))
    assert not [t for t in only_request(upstream, mark).get("tools", []) if t["name"].endswith("get_weather")]
    mark = marker()
    client.messages.create(model=MODEL, max_tokens=100, tools=[WEATHER], messages=user("hi " + mark),
                           tool_choice={"type": "tool", "name": "get_weather"})
    assert "must call the tool `mcp__client__get_weather`" in "\n".join(system_texts(only_request(upstream, mark)))


# ---- images, thinking, stop sequences, max_tokens --------------------------------------------

def test_base64_image_reaches_the_model_as_an_image_block(client, upstream):
    mark = marker()
    content = [{"type": "text", "text": "what is this? " + mark},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1PX}}]
    client.messages.create(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": content}])
    blocks = [b for m in only_request(upstream, mark)["messages"] if m["role"] == "user"
              for b in m["content"] if isinstance(b, dict) and b.get("type") == "image"]
    assert [b["source"] for b in blocks] == [{"type": "base64", "media_type": "image/png", "data": PNG_1PX}]


def test_image_url_is_refused_without_reaching_the_cli(client, upstream):
    mark = marker()
    content = [{"type": "text", "text": "what is this? " + mark},
               {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}]
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": content}])
    assert "--allow-image-fetch" in caught.value.body["error"]["message"]
    assert upstream.messages_requests(mark) == []


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_cuts_the_answer_and_is_named(client, stream):
    kwargs = dict(model=MODEL, max_tokens=100, stop_sequences=["zzz", "fake"], messages=user("hi " + marker()))
    if stream:
        with client.messages.stream(**kwargs) as running:
            text = "".join(running.text_stream)
            message = running.get_final_message()
        assert text == "Hello from the "
    else:
        message = client.messages.create(**kwargs)
    assert message.content[0].text == "Hello from the "
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "fake")


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_cut_gives_stop_reason_max_tokens(client, upstream, stream):
    mark = marker()
    kwargs = dict(model=MODEL, max_tokens=5, messages=user("@@scenario:max_tokens@@ " + mark))
    if stream:
        with client.messages.stream(**kwargs) as running:
            message = running.get_final_message()
    else:
        message = client.messages.create(**kwargs)
    assert message.stop_reason == "max_tokens" and message.content[0].text == "This answer is cut"
    assert only_request(upstream, mark)["max_tokens"] == 5


def test_thinking_blocks_come_back_only_when_asked(client):
    kwargs = dict(model=MODEL, max_tokens=2048, messages=user("@@scenario:thinking@@ " + marker()))
    with client.messages.stream(thinking={"type": "enabled", "budget_tokens": 1024}, **kwargs) as stream:
        kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
        message = stream.get_final_message()
    assert kinds[:2] == ["thinking_delta", "signature_delta"] and set(kinds[2:]) == {"text_delta"}
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Let me think about this." and message.content[0].signature
    # Sent back in the next turn, the thinking block is accepted (and dropped, as the API does).
    follow = kwargs["messages"] + [{"role": "assistant", "content": message.content}, {"role": "user", "content": "ok"}]
    assert client.messages.create(model=MODEL, max_tokens=100, messages=follow).content[0].text == "Thought done."
    plain = client.messages.create(**kwargs)
    assert [(b.type, b.text) for b in plain.content] == [("text", "Thought done.")]


@pytest.mark.parametrize("stream", [False, True])
def test_output_config_format_makes_the_answer_the_structured_json_and_effort_reaches_upstream(
        client, upstream, stream):
    mark = marker()
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    kwargs = dict(model=MODEL, max_tokens=200, messages=user(tool_prompt(mark, {"city": "Paris"}, "Sure,_here:")),
                  output_config={"effort": "high", "format": {"type": "json_schema", "schema": schema}})
    if stream:
        with client.messages.stream(**kwargs) as running:
            message = running.get_final_message()
    else:
        message = client.messages.create(**kwargs)
    assert [b.type for b in message.content] == ["text"] and json.loads(message.content[0].text) == {"city": "Paris"}
    assert message.stop_reason == "end_turn"
    sent = only_request(upstream, mark)
    assert [t["input_schema"] for t in sent["tools"] if t["name"] == "StructuredOutput"] == [schema]
    assert sent["output_config"]["effort"] == "high"


# ---- errors ----------------------------------------------------------------------------------

def test_unknown_model_is_the_sdks_not_found_error(client, upstream):
    mark = marker()
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="gpt-4o", max_tokens=100, messages=user("hi " + mark))
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "not_found_error"
    assert upstream.messages_requests(mark) == []


@pytest.mark.parametrize("scenario, error_class, status, kind", [
    ("429", anthropic.RateLimitError, 429, "rate_limit_error"),
    ("401", anthropic.AuthenticationError, 401, "authentication_error"),
    ("529", anthropic.InternalServerError, 529, "overloaded_error"),
    ("500", anthropic.InternalServerError, 502, "api_error"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_errors_are_the_sdks_error_classes(client, stream, scenario, error_class, status, kind):
    kwargs = dict(model=MODEL, max_tokens=100, messages=user("@@scenario:%s@@ %s" % (scenario, marker())))
    with pytest.raises(error_class) as caught:
        if stream:
            with client.messages.stream(**kwargs) as running:
                list(running)
        else:
            client.messages.create(**kwargs)
    assert caught.value.status_code == status
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == kind
    assert client.messages.create(model=MODEL, max_tokens=50, messages=user("again " + marker())).content


@pytest.mark.parametrize("change", [
    {"max_tokens": 0},
    {"extra_body": {"frequency_penalty": 1}},
    {"messages": [{"role": "system", "content": "no"}]},
    {"extra_body": {"temperature": 3}},
    {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
    {"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "text", "data": "x"}}]}]},
])
def test_malformed_request_is_the_sdks_bad_request_error_in_anthropics_envelope(client, upstream, change):
    mark = marker()
    kwargs = dict(dict(model=MODEL, max_tokens=100, messages=user("hi " + mark)), **change)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(**kwargs)
    body = caught.value.body
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    assert upstream.messages_requests(mark) == []


def test_missing_max_tokens_is_a_400_as_anthropic_answers(e2e_proxy):
    status, _, raw = e2e_proxy.request("POST", "/v1/messages", {"model": MODEL, "messages": user("hi")})
    assert status == 400
    assert json.loads(raw) == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: Field required"}}


def test_count_tokens_is_an_honest_error_without_a_model_call(client, upstream):
    mark = marker()
    with pytest.raises(anthropic.InternalServerError) as caught:
        client.messages.count_tokens(model=MODEL, messages=user("hi " + mark))
    assert caught.value.status_code == 501
    assert caught.value.body["error"]["type"] == "api_error"
    assert "does not guess" in caught.value.body["error"]["message"]
    assert upstream.messages_requests(mark) == [] and not [
        r for r in upstream.requests if mark in json.dumps(r["body"])]


# ---- auth ------------------------------------------------------------------------------------

def test_the_proxy_key_is_accepted_as_x_api_key_and_as_a_bearer_token(start_proxy, real_claude, e2e_env):
    key = "sk-proxy-" + uuid.uuid4().hex
    proxy = start_proxy(["--claude", real_claude, "--api-key", key], e2e_env)
    good = anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0)  # sends x-api-key
    assert good.messages.create(model=MODEL, max_tokens=50, messages=user("hi " + marker())).content[0].text == TEXT
    bearer = anthropic.Anthropic(base_url=proxy.url, auth_token=key, max_retries=0)  # sends Authorization
    assert bearer.messages.create(model=MODEL, max_tokens=50, messages=user("hi " + marker())).content
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic.Anthropic(base_url=proxy.url, api_key=key + "x", max_retries=0).messages.create(
            model=MODEL, max_tokens=50, messages=user("hi"))
    assert caught.value.body["error"]["type"] == "authentication_error"
    status, _, _ = proxy.request("GET", "/v1/models", headers={"x-api-key": key})
    assert status == 200


# ---- faults the real CLI cannot produce on demand (tests/fake_claude.py) ----------------------

def anthropic_frames(raw):
    """(event name, data) of each SSE frame."""
    frames = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            name, data = block.split("\n")
            frames.append((name[len("event: "):], json.loads(data[len("data: "):])))
    return frames


def test_an_error_after_output_ends_the_stream_with_an_error_event(fake_proxy):
    proxy = fake_proxy()
    body = {"model": MODEL, "max_tokens": 100, "stream": True, "messages": user("@@fake:error_mid@@ hi")}
    status, _, raw = proxy.request("POST", "/v1/messages", body)
    assert status == 200
    frames = anthropic_frames(raw)
    assert [name for name, _ in frames[:3]] == ["message_start", "ping", "content_block_start"]
    assert frames[-1] == ("error", {"type": "error", "error": {"type": "api_error",
                                                               "message": frames[-1][1]["error"]["message"]}})
    assert "message_stop" not in [name for name, _ in frames]


def test_a_silent_stretch_mid_stream_is_filled_with_pings(fake_proxy):
    proxy = fake_proxy()
    body = {"model": MODEL, "max_tokens": 100, "stream": True, "messages": user("@@fake:stall:8@@ hi")}
    status, _, raw = proxy.request("POST", "/v1/messages", body)
    names = [name for name, _ in anthropic_frames(raw)]
    first_text = names.index("content_block_delta")
    # the stall after the first delta is longer than KEEP_ALIVE_SECONDS: a ping fills it
    assert names[first_text + 1] == "ping" and names.count("ping") >= 2
    assert names[-2:] == ["message_delta", "message_stop"]


@pytest.mark.parametrize("method, path, headers, body, status, kind", [
    ("POST", "/v1/messages", {"Content-Type": "text/plain"}, b"{}", 415, "invalid_request_error"),
    ("POST", "/v1/messages", {}, b"{not json", 400, "invalid_request_error"),
    ("POST", "/v1/messages", {}, b"x" * 2048, 413, "request_too_large"),
    ("GET", "/v1/messages", {}, None, 405, "invalid_request_error"),
    ("POST", "/v1/messages/batches", {}, b"{}", 404, "not_found_error"),
    ("POST", "/v1/messages", {"Origin": "http://evil.example"}, b"{}", 403, "permission_error"),
])
def test_every_error_on_the_messages_routes_is_in_anthropics_envelope(fake_proxy, method, path, headers, body,
                                                                      status, kind):
    proxy = fake_proxy(["--max-body-bytes", "1024"])
    sent = dict({"Content-Type": "application/json"}, **headers) if body is not None else headers
    got, got_headers, raw = proxy.request(method, path, body, sent)
    assert got == status
    assert got_headers["request-id"] == got_headers["x-request-id"]
    reply = json.loads(raw)
    assert reply["type"] == "error" and reply["error"]["type"] == kind and reply["error"]["message"]


def test_a_missing_key_is_an_authentication_error_and_the_rest_stays_openai(fake_proxy):
    proxy = fake_proxy(["--api-key", "k1"])
    status, _, raw = proxy.request("POST", "/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": user("hi")})
    assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error"
    assert "x-api-key" in json.loads(raw)["error"]["message"]
    status, _, raw = proxy.request("GET", "/v1/models")
    assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"  # OpenAI's envelope there


def test_image_url_is_fetched_when_the_user_allows_it(start_proxy, real_claude, e2e_env, upstream):
    """With --allow-image-fetch the URL goes to the chat path's fetcher: a closed port is its error."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = "http://127.0.0.1:%d/cat.png" % probe.getsockname()[1]  # nothing listens there once closed
    proxy = start_proxy(["--claude", real_claude, "--allow-image-fetch"], e2e_env)
    client = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    mark = marker()
    content = [{"type": "text", "text": "what is this? " + mark}, {"type": "image", "source": {"type": "url", "url": url}}]
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": content}])
    assert "could not fetch the image" in caught.value.body["error"]["message"]
    assert upstream.messages_requests(mark) == []


def test_claude_code_itself_works_as_an_anthropic_client_of_the_proxy(e2e_proxy, upstream, tmp_path):
    """The pinned CLI pointed at the proxy (ANTHROPIC_BASE_URL) sends what today's API takes (system
    messages in `messages`, context_management, output_config, its own tools) and gets its answer."""
    import subprocess
    import real_cli
    mark = marker()
    env = real_cli.cli_env(str(tmp_path), e2e_proxy.url)
    done = subprocess.run([real_cli.ensure_real_cli(install=False), "-p", "Say hi " + mark], env=env,
                          cwd=str(tmp_path), stdin=subprocess.DEVNULL, capture_output=True, timeout=180)
    assert done.returncode == 0, done.stdout.decode()[-500:] + done.stderr.decode()[-500:]
    assert done.stdout.decode().strip() == TEXT
    sent = only_request(upstream, mark)  # one model call, made by the proxy's own CLI
    assert "Claude agent" in "\n".join(system_texts(sent))  # the client CLI's system prompt reached it
    offered = [t["name"] for t in sent["tools"] if t["name"].startswith("mcp__client__")]
    assert "mcp__client__Bash" in offered  # the client's tools, offered to run on the client's side


@pytest.mark.parametrize("waiting", [True, False])
def test_a_failed_tool_result_reaches_the_model_marked_as_an_error(client, upstream, waiting):
    mark = marker()
    messages = user(tool_prompt(mark, {"city": "Lima"}))
    if waiting:
        first = client.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER], messages=messages)
        call_id, content = first.content[-1].id, first.content
    else:
        call_id = "toolu_failed" + uuid.uuid4().hex[:6]
        content = [{"type": "tool_use", "id": call_id, "name": "get_weather", "input": {"city": "Lima"}}]
    error = "lookup failed " + uuid.uuid4().hex[:6]
    messages += [{"role": "assistant", "content": content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": error,
                                               "is_error": True}]}]
    client.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER], messages=messages)
    sent = upstream.messages_requests(mark)[-1]
    [result] = [b for m in sent["messages"] if m["role"] == "user" for b in m["content"]
                if isinstance(b, dict) and b.get("type") == "tool_result"]
    # In the shape the CLI itself gives a failed MCP call, on the waiting and the replay path alike.
    assert result["is_error"] is True and result["content"] == error
