"""End to end for the Messages API with the official `@anthropic-ai/sdk` for Node, unmodified: the
same list as tests/test_anthropic_e2e.py checks with the Python SDK, against the real CLI and the
fake upstream.

The SDK is pinned and installed with npm into <repo>/.cache/anthropic-sdk-node (never globally),
as tests/real_cli.py installs the CLI; tests/anthropic_node_client.cjs makes one SDK call per run
and prints what the SDK returned (or raised) as JSON, and the checks are made here.
"""

import json
import os
import shutil
import subprocess
import uuid

import pytest

import real_cli
from conftest import REQUIRE_E2E, marker, only_request, upstream_texts

NODE_SDK_PACKAGE = "@anthropic-ai/sdk"
NODE_SDK_VERSION = "1.14.0"
NODE_SDK_DIR = os.path.join(real_cli.REPO_DIR, ".cache", "anthropic-sdk-node")
CLIENT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "anthropic_node_client.cjs")

TEXT = "Hello from the fake upstream."
MODEL = "claude-sonnet-4"
WEATHER = {"name": "get_weather", "description": "Current weather for a city " + uuid.uuid4().hex[:6],
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def installed_version():
    try:
        with open(os.path.join(NODE_SDK_DIR, "node_modules", NODE_SDK_PACKAGE, "package.json")) as handle:
            return json.load(handle).get("version")
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="session")
def node_sdk():
    """The pinned Node SDK's node_modules; a failure (not a skip) when CLAUDE_MAX_PROXY_REQUIRE_E2E=1."""
    try:
        if shutil.which("node") is None:
            raise real_cli.RealCliUnavailable("node is not on PATH")
        if installed_version() != NODE_SDK_VERSION:
            with real_cli.install_lock(NODE_SDK_DIR):
                if installed_version() != NODE_SDK_VERSION:
                    real_cli.npm_install(NODE_SDK_PACKAGE, NODE_SDK_VERSION, NODE_SDK_DIR)
    except real_cli.RealCliUnavailable as exc:
        message = "the Node Anthropic SDK is unavailable: %s" % exc
        if REQUIRE_E2E:
            pytest.fail(message)
        pytest.skip(message)
    return os.path.join(NODE_SDK_DIR, "node_modules")


@pytest.fixture
def sdk(e2e_proxy, node_sdk):
    """sdk(action, request) -> what the Node SDK returned: {message}, {events, text, message} or {error}."""
    def call(action, request, proxy=None, api_key=None):
        argv = ["node", CLIENT_SCRIPT, (proxy or e2e_proxy).url, action, json.dumps(request)] + (
            [api_key] if api_key else [])
        done = subprocess.run(argv, env=dict(os.environ, NODE_PATH=node_sdk), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        return json.loads(done.stdout)
    return call


def request(text, **params):
    return dict({"model": MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": text}]}, **params)


def fake_input_tokens(body):
    return max(1, len(json.dumps(body.get("messages"))) // 4)


def system_texts(body):
    return [b["text"] for b in body["system"] if not b["text"].startswith("x-anthropic-billing-header")]


def test_plain(sdk, upstream):
    mark = marker()
    message = sdk("create", request("Say hi " + mark))["message"]
    sent = only_request(upstream, mark)
    assert message["id"].startswith("msg_") and message["type"] == "message" and message["role"] == "assistant"
    assert message["content"] == [{"type": "text", "text": TEXT}]
    assert (message["stop_reason"], message["stop_sequence"], message["model"]) == ("end_turn", None, sent["model"])
    assert message["usage"]["input_tokens"] == fake_input_tokens(sent) and message["usage"]["output_tokens"] > 0
    assert message["usage"]["cache_read_input_tokens"] == 3


def test_streamed_text_deltas_final_message_usage_and_event_order(sdk, upstream):
    mark = marker()
    out = sdk("stream", request("Say hi " + mark))
    names = [e["type"] for e in out["events"] if e["type"] != "ping"]
    deltas = [e["delta"]["text"] for e in out["events"] if e["type"] == "content_block_delta"]
    assert names == ["message_start", "content_block_start"] + ["content_block_delta"] * len(deltas) + [
        "content_block_stop", "message_delta", "message_stop"]
    assert len(deltas) >= 3 and out["text"] == TEXT
    message = out["message"]
    assert message["content"] == [{"type": "text", "text": TEXT}] and message["stop_reason"] == "end_turn"
    assert message["usage"]["input_tokens"] == fake_input_tokens(only_request(upstream, mark))
    assert message["usage"]["output_tokens"] > 0


@pytest.mark.parametrize("blocks", [False, True])
def test_system_prompt_as_string_and_as_blocks(sdk, upstream, blocks):
    mark, secret = marker(), uuid.uuid4().hex
    system = [{"type": "text", "text": "You are a pirate."}, {"type": "text", "text": secret}] if blocks \
        else "You are a pirate. " + secret
    sdk("create", request("Say hi " + mark, system=system))
    text = "\n".join(system_texts(only_request(upstream, mark)))
    assert "You are a pirate." in text and secret in text


def test_three_turn_history(sdk, upstream):
    mark = marker()
    messages = [{"role": "user", "content": "My name is Bob."},
                {"role": "assistant", "content": "Nice to meet you, Bob."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": [{"type": "text", "text": "4."}]},
                {"role": "user", "content": "And my name? " + mark}]
    assert sdk("create", dict(request(""), messages=messages))["message"]["content"][0]["text"] == TEXT
    assert upstream_texts(only_request(upstream, mark)) == [
        ("user", "My name is Bob."), ("assistant", "Nice to meet you, Bob."),
        ("user", "What is 2+2?"), ("assistant", "4."), ("user", "And my name? " + mark)]


@pytest.mark.parametrize("action", ["create", "stream"])
def test_tool_loop_with_the_clients_tool_name_and_exact_input(sdk, upstream, action):
    mark, args = marker(), {"city": "Paris", "units": ["c", 1, None], "deep": {"x": 1.5}}
    prompt = "weather? @@scenario:tool_use@@ @@args:%s@@ %s" % (json.dumps(args), mark)
    first = sdk(action, request(prompt, tools=[WEATHER]))
    message = first["message"]
    assert message["stop_reason"] == "tool_use"
    [call] = [b for b in message["content"] if b["type"] == "tool_use"]
    assert call["name"] == "get_weather" and call["input"] == args
    if action == "stream":
        fragments = [e["delta"]["partial_json"] for e in first["events"]
                     if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta"]
        assert json.loads("".join(fragments)) == args
    follow = request(prompt, tools=[WEATHER])
    follow["messages"] += [{"role": "assistant", "content": message["content"]},
                           {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"],
                                                         "content": "Sunny"}]}]
    second = sdk(action, follow)["message"]
    assert second["content"] == [{"type": "text", "text": "tool said: Sunny"}]
    assert len(upstream.messages_requests(mark)) == 2


def test_base64_image(sdk, upstream):
    mark = marker()
    content = [{"type": "text", "text": "what is this? " + mark},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1PX}}]
    sdk("create", dict(request(""), messages=[{"role": "user", "content": content}]))
    blocks = [b for m in only_request(upstream, mark)["messages"] if m["role"] == "user"
              for b in m["content"] if isinstance(b, dict) and b.get("type") == "image"]
    assert [b["source"] for b in blocks] == [{"type": "base64", "media_type": "image/png", "data": PNG_1PX}]


@pytest.mark.parametrize("action", ["create", "stream"])
def test_stop_sequences_give_stop_reason_stop_sequence(sdk, action):
    message = sdk(action, request("hi " + marker(), stop_sequences=["fake"]))["message"]
    assert message["content"] == [{"type": "text", "text": "Hello from the "}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "fake")


@pytest.mark.parametrize("action", ["create", "stream"])
def test_max_tokens_cut_gives_stop_reason_max_tokens(sdk, action):
    message = sdk(action, request("@@scenario:max_tokens@@ " + marker(), max_tokens=5))["message"]
    assert message["stop_reason"] == "max_tokens" and message["content"][0]["text"] == "This answer is cut"


@pytest.mark.parametrize("action", ["create", "stream"])
@pytest.mark.parametrize("change, error_class, status, kind", [
    ({"model": "gpt-4o"}, "NotFoundError", 404, "not_found_error"),
    ({"messages": [{"role": "user", "content": "@@scenario:429@@ hi"}]}, "RateLimitError", 429, "rate_limit_error"),
    ({"max_tokens": 0}, "BadRequestError", 400, "invalid_request_error"),
    ({"frequency_penalty": 1}, "BadRequestError", 400, "invalid_request_error"),
])
def test_errors_raise_the_sdks_classes_with_anthropics_envelope(sdk, action, change, error_class, status, kind):
    error = sdk(action, dict(request("hi " + marker()), **change))["error"]
    assert (error["class"], error["status"]) == (error_class, status)
    assert error["body"]["type"] == "error" and error["body"]["error"]["type"] == kind
    assert error["body"]["error"]["message"]


def test_count_tokens_is_an_honest_error(sdk, upstream):
    mark = marker()
    error = sdk("count_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "hi " + mark}]})["error"]
    assert (error["class"], error["status"]) == ("InternalServerError", 501)
    assert not [r for r in upstream.requests if mark in json.dumps(r["body"])]
