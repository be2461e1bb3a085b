"""Pure translation, both ways: OpenAI request -> CliCall -> argv/env/stdin/session file, and CLI
stream-json events -> TurnEvents -> OpenAI chunks / completion; plus config_from and the tables.
Function calling (tool names, tool_use/tool_result turns, the MCP server's replies, the key that
finds a parked process), images, structured output and reasoning are covered both ways too.

No processes and no sockets: every function under test takes plain data and returns plain data.
Event shapes are those the real CLI prints (see tests/fake_claude.py).
"""

import base64
import dataclasses
import json
import os
import re
import stat
import string
import tempfile
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import claude_max_proxy as cmp

PROPERTY = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
MAX_ARG_BYTES = 128 * 1024 - 1  # Linux MAX_ARG_STRLEN, counting the terminating NUL


# ------------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------------

def config(**fields):
    fields.setdefault("workdir", "/nonexistent/claude-max-proxy/cwd")
    return cmp.Config(**fields)


def msg(role, content):
    return {"role": role, "content": content}


def user(content):
    return msg("user", content)


def assistant(content):
    return msg("assistant", content)


def system(content):
    return msg("system", content)


def body_with(*messages, **params):
    body = {"model": "claude-sonnet-4", "messages": list(messages) or [user("hi")]}
    body.update(params)
    return body


def call_for(*messages, **params):
    return cmp.cli_call_for(body_with(*messages, **params), config())


def error_of(function, *args, **kwargs):
    with pytest.raises(cmp.ApiError) as info:
        function(*args, **kwargs)
    return info.value


def text(value):
    return {"type": "text", "text": value}


# -- tools, shaped like OpenAI's -------------------------------------------------------------------

def function_tool(name, parameters=None, description=None):
    function = {"name": name}
    if description is not None:
        function["description"] = description
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = function_tool("get_weather", WEATHER_SCHEMA, "Current weather in a city")
CLOCK = function_tool("get_time", {"type": "object", "properties": {}}, "Current time")
LONG_NAME = "lookup_" + "x" * 57            # 64 characters: too long to carry the MCP prefix
LONG = function_tool(LONG_NAME, {"type": "object", "properties": {"q": {"type": "string"}}})
TOOLS = [WEATHER, CLOCK, LONG]
ROOM = 64 - len(cmp.MCP_PREFIX)             # longest client name the model can see unchanged


def upstream(name):
    """The name the model sees (and calls) for a client tool."""
    return cmp.MCP_PREFIX + cmp.mcp_name_for(name)


def tool_call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def assistant_calls(content, *calls):
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


def tool_message(call_id, content):
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def tool_use(call_id, name, arguments):
    return {"type": "tool_use", "id": call_id, "name": upstream(name), "input": arguments}


def tool_result(call_id, result):
    return {"type": "tool_result", "tool_use_id": call_id, "content": [text(result)]}


def image_part(url, kind="image_url"):
    return {"type": kind, "image_url": {"url": url}}


PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(40))).decode("ascii")


def png_url(data=PNG, media_type="image/png"):
    return "data:%s;base64,%s" % (media_type, data)


def image_block(data=PNG, media_type="image/png"):
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


# -- CLI events, shaped like the CLI's stream-json output ----------------------------------------

MODEL = "claude-sonnet-5-5"
SESSION = "5f0c3c1e-0000-4000-8000-000000000000"


def stream_event(event):
    return {"type": "stream_event", "event": event, "session_id": SESSION,
            "parent_tool_use_id": None, "uuid": "u"}


def init_event():
    return {"type": "system", "subtype": "init", "cwd": "/tmp/x", "session_id": SESSION,
            "tools": [], "mcp_servers": [], "model": MODEL, "permissionMode": "default",
            "claude_code_version": "2.1.332", "uuid": "u"}


def message_start(input_tokens=12, cache_read=0, cache_creation=0):
    return stream_event({"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": MODEL, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 1,
                  "cache_creation_input_tokens": cache_creation,
                  "cache_read_input_tokens": cache_read}}})


def block_start(index=0):
    return stream_event({"type": "content_block_start", "index": index,
                         "content_block": {"type": "text", "text": ""}})


def text_delta(piece, index=0):
    return stream_event({"type": "content_block_delta", "index": index,
                         "delta": {"type": "text_delta", "text": piece}})


def tool_start(index, tool_id, name):
    return stream_event({"type": "content_block_start", "index": index, "content_block": {
        "type": "tool_use", "id": tool_id, "name": name, "input": {}}})


def json_delta(index, fragment):
    return stream_event({"type": "content_block_delta", "index": index,
                         "delta": {"type": "input_json_delta", "partial_json": fragment}})


def thinking_start(index):
    return stream_event({"type": "content_block_start", "index": index,
                         "content_block": {"type": "thinking", "thinking": "", "signature": ""}})


def thinking_delta(piece, index):
    return stream_event({"type": "content_block_delta", "index": index,
                         "delta": {"type": "thinking_delta", "thinking": piece}})


def signature_delta(index):
    return stream_event({"type": "content_block_delta", "index": index,
                         "delta": {"type": "signature_delta", "signature": "c2lnbmF0dXJl"}})


def assistant_event(answer):
    return {"type": "assistant", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
        "content": [text(answer)], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 3}},
        "parent_tool_use_id": None, "session_id": SESSION, "uuid": "u"}


def block_stop(index=0):
    return stream_event({"type": "content_block_stop", "index": index})


def message_delta(stop_reason, output_tokens=3):
    return stream_event({"type": "message_delta",
                         "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                         "usage": {"output_tokens": output_tokens}})


def message_stop():
    return stream_event({"type": "message_stop"})


def result_event(answer, stop_reason="end_turn", api_error_status=None, usage=None):
    return {"type": "result", "subtype": "success", "is_error": api_error_status is not None,
            "api_error_status": api_error_status, "duration_ms": 5, "num_turns": 1,
            "result": answer, "stop_reason": stop_reason, "session_id": SESSION,
            "total_cost_usd": 0.0,
            "usage": usage or {"input_tokens": 12, "cache_creation_input_tokens": 0,
                               "cache_read_input_tokens": 0, "output_tokens": 3},
            "uuid": "u"}


def turn(pieces, stop_reason="end_turn", output_tokens=3):
    """A whole successful streamed turn, in the order the CLI prints it."""
    answer = "".join(pieces)
    return ([init_event(), message_start(), block_start()]
            + [text_delta(p) for p in pieces]
            + [assistant_event(answer), block_stop(), message_delta(stop_reason, output_tokens),
               message_stop(), result_event(answer, stop_reason)])


def message_turn(blocks, stop_reason="tool_use"):
    """One upstream message as the CLI streams it. Blocks: ("text", [pieces]),
    ("tool", id, name, [fragments]) or ("thinking", [pieces]). Like the Messages API, every tool
    input opens with an empty fragment."""
    events = [init_event(), message_start()]
    for index, block in enumerate(blocks):
        if block[0] == "text":
            events += [block_start(index)] + [text_delta(p, index) for p in block[1]]
        elif block[0] == "tool":
            _, tool_id, name, fragments = block
            events += [tool_start(index, tool_id, name), json_delta(index, "")]
            events += [json_delta(index, f) for f in fragments]
        else:
            events += [thinking_start(index)] + [thinking_delta(p, index) for p in block[1]]
            events.append(signature_delta(index))
        events.append(block_stop(index))
    return events + [message_delta(stop_reason), message_stop()]


def translate(events, stop=(), call=None):
    translator = cmp.TurnTranslator(call, tuple(stop) if stop else None)
    out = []
    for event in events:
        out += translator.feed(event)
    return translator, out


def tools_call(*messages, **params):
    """A CliCall offering TOOLS, for the TurnTranslator."""
    params.setdefault("tools", TOOLS)
    return call_for(*(messages or [user("Weather in Paris, and the time?")]), **params)


def kinds(turn_events):
    """Turn events without the usage dict, which tests compare separately."""
    return [e[:2] if e[0] == "finish" else e for e in turn_events]


def text_of(turn_events):
    return "".join(e[1] for e in turn_events if e[0] == "text")


def finishes_of(turn_events):
    return [e for e in turn_events if e[0] == "finish"]


def split(whole, cuts):
    """`whole` cut at the given positions (empty pieces allowed)."""
    points = sorted(min(c, len(whole)) for c in cuts)
    bounds = [0] + points + [len(whole)]
    return [whole[a:b] for a, b in zip(bounds, bounds[1:])]


def expected_stop_cut(whole, stops):
    """(answer, hit) under OpenAI's rule, computed independently of the proxy.

    The API "stops generating further tokens" as soon as a stop sequence has been produced, so
    the answer ends before the first stop occurrence to be *completed* (earliest end; for equal
    ends the earliest start). For stops that cannot overlap this equals
    ``whole[:min(whole.find(s) for s in stops if s in whole)]``.
    """
    for end in range(len(whole) + 1):
        starts = [end - len(s) for s in stops if whole[:end].endswith(s)]
        if starts:
            return whole[:min(starts)], True
    return whole, False


# ================================================================================================
# Tables: MODELS and PARAMETERS
# ================================================================================================

@pytest.mark.parametrize("model_id, alias", list(cmp.MODELS.items()))
def test_every_model_table_entry_resolves_to_its_cli_alias(model_id, alias):
    assert cmp.resolve_model(model_id, "claude-sonnet-4") == (model_id, alias)
    assert alias in cmp.CLI_ALIASES


@pytest.mark.parametrize("alias", cmp.CLI_ALIASES)
def test_every_cli_alias_resolves_to_itself(alias):
    assert cmp.resolve_model(alias, "claude-sonnet-4") == (alias, alias)


def test_parameters_table_uses_known_support_levels_and_covers_model_and_messages():
    assert {support for support, _ in cmp.PARAMETERS.values()} <= {
        "honored", "emulated", "rejected", "ignored"}
    assert all(isinstance(note, str) and note for _, note in cmp.PARAMETERS.values())
    assert "model" in cmp.PARAMETERS and "messages" in cmp.PARAMETERS


# A valid value for every parameter the table calls "ignored": each must be accepted.
IGNORED_SAMPLES = {
    "temperature": 0.7, "top_p": 0.9, "seed": 42, "presence_penalty": -1.5,
    "frequency_penalty": 2, "logit_bias": {"50256": -100}, "user": "someone",
    "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
}


def test_ignored_samples_cover_exactly_the_ignored_parameters():
    ignored = {name for name, (support, _) in cmp.PARAMETERS.items() if support == "ignored"}
    assert set(IGNORED_SAMPLES) == ignored


@pytest.mark.parametrize("name, value", sorted(IGNORED_SAMPLES.items()))
def test_ignored_parameters_are_accepted(name, value):
    call = call_for(user("hi"), **{name: value})
    assert call.prompt == [text("hi")]


# A value of every parameter (besides model/messages) that must be refused with param == name.
INVALID_SAMPLES = {
    "stream": "yes", "stream_options": "x", "max_completion_tokens": 0, "max_tokens": 0,
    "stop": 5, "n": 2, "logprobs": True, "top_logprobs": 1, "temperature": 3, "top_p": 2,
    "seed": "x", "presence_penalty": 3, "frequency_penalty": -3, "logit_bias": [], "user": 1,
    "metadata": [], "store": "x", "service_tier": 1,
    "tools": "x", "functions": "x", "tool_choice": "sometimes", "function_call": "sometimes",
    "parallel_tool_calls": "yes", "response_format": "json", "reasoning_effort": "extreme",
    "include_reasoning": "yes",
}


def test_invalid_samples_cover_every_parameter():
    assert set(INVALID_SAMPLES) == set(cmp.PARAMETERS) - {"model", "messages"}


# Function calling, structured output and reasoning (issue 4): how each is treated.
@pytest.mark.parametrize("name, support", [
    ("tools", "honored"), ("functions", "honored"), ("tool_choice", "emulated"),
    ("function_call", "emulated"), ("parallel_tool_calls", "emulated"),
    ("response_format", "honored"), ("reasoning_effort", "honored"),
    ("include_reasoning", "honored"),
])
def test_parameters_table_rows_for_tools_formats_and_reasoning(name, support):
    assert cmp.PARAMETERS[name][0] == support


# A valid value of every honored/emulated parameter besides model and messages: each is accepted.
ACCEPTED_SAMPLES = {
    "stream": True, "stream_options": {"include_usage": True}, "max_completion_tokens": 5,
    "max_tokens": 5, "stop": "END", "tools": [WEATHER], "functions": [WEATHER["function"]],
    "tool_choice": "required", "function_call": {"name": "get_weather"},
    "parallel_tool_calls": False, "response_format": {"type": "json_object"},
    "reasoning_effort": "high", "include_reasoning": True,
}


def test_accepted_samples_cover_the_honored_and_emulated_parameters():
    supported = {name for name, (support, _) in cmp.PARAMETERS.items()
                 if support in ("honored", "emulated")}
    assert set(ACCEPTED_SAMPLES) == supported - {"model", "messages"}


@pytest.mark.parametrize("name, value", sorted(ACCEPTED_SAMPLES.items(), key=lambda kv: kv[0]))
def test_honored_and_emulated_parameters_are_accepted(name, value):
    extra = {"stream": True} if name == "stream_options" else {}
    extra.update({"functions": [WEATHER["function"]]} if name == "function_call" else {})
    extra.update({"tools": [WEATHER]} if name == "tool_choice" else {})
    assert isinstance(call_for(user("hi"), **dict(extra, **{name: value})), cmp.CliCall)


@pytest.mark.parametrize("name, value", sorted(INVALID_SAMPLES.items(), key=lambda kv: kv[0]))
def test_every_parameter_is_validated_with_its_name_as_param(name, value):
    extra = {"stream": True} if name == "stream_options" else {}
    error = error_of(call_for, user("hi"), **dict(extra, **{name: value}))
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", name)


@pytest.mark.parametrize("name", [n for n, (s, _) in cmp.PARAMETERS.items() if s == "rejected"])
def test_rejected_parameters_say_why(name):
    error = error_of(call_for, user("hi"), **{name: INVALID_SAMPLES[name]})
    assert error.status == 400 and error.param == name and error.message


# ================================================================================================
# resolve_model
# ================================================================================================

@pytest.mark.parametrize("name, expected", [
    ("claude-opus-4", ("claude-opus-4", "opus")),
    ("claude-sonnet-4", ("claude-sonnet-4", "sonnet")),
    ("claude-haiku-4", ("claude-haiku-4", "haiku")),
    ("Claude-Opus-4", ("claude-opus-4", "opus")),
    ("opus", ("opus", "opus")),
    ("sonnet", ("sonnet", "sonnet")),
    (" haiku ", ("haiku", "haiku")),
    ("claude-opus-4-1-20250805", ("claude-opus-4-1-20250805", "claude-opus-4-1-20250805")),
    ("claude-3-5-haiku-20241022", ("claude-3-5-haiku-20241022", "claude-3-5-haiku-20241022")),
    ("claude-sonnet-4.5", ("claude-sonnet-4.5", "claude-sonnet-4.5")),
    ("openai/claude-opus-4", ("claude-opus-4", "opus")),
    ("claude-max/opus", ("opus", "opus")),
    ("anthropic/claude-3-5-haiku-20241022", ("claude-3-5-haiku-20241022", "claude-3-5-haiku-20241022")),
    ("litellm/claude-max/sonnet", ("sonnet", "sonnet")),
])
def test_resolve_model(name, expected):
    assert cmp.resolve_model(name, "claude-sonnet-4") == expected


@pytest.mark.parametrize("name", [
    "gpt-4o", "claude", "claude-", "opus-4", "claude-opus_4", "claude-opus-4 --help",
    "--help", "openai/", "claude-max/gpt-4", "claude-opus-4;rm", "-claude-opus-4",
])
def test_unknown_model_is_404_model_not_found(name):
    error = error_of(cmp.resolve_model, name, "claude-sonnet-4")
    assert (error.status, error.type, error.code, error.param) == (
        404, "invalid_request_error", "model_not_found", "model")
    assert error.body()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("name", [4, 4.5, True, [], {}, ["opus"], "", "   "])
def test_model_that_is_not_a_non_empty_string_is_400(name):
    error = error_of(cmp.resolve_model, name, "claude-sonnet-4")
    assert (error.status, error.param) == (400, "model")


def test_default_model_is_used_when_none_is_given():
    assert cmp.resolve_model(None, "claude-opus-4") == ("claude-opus-4", "opus")
    body = {"messages": [user("hi")]}
    call = cmp.cli_call_for(body, config(default_model="claude-haiku-4"))
    assert (call.requested_model, call.model) == ("claude-haiku-4", "haiku")


def test_unknown_model_is_reported_before_other_problems():
    error = error_of(call_for, user("hi"), model="gpt-4o", n=3)
    assert error.status == 404


# ================================================================================================
# text_blocks_of
# ================================================================================================

@pytest.mark.parametrize("content, expected", [
    (None, []),
    ("", []),
    ("hi", [text("hi")]),
    ([], []),
    ([{"type": "text", "text": "a"}, {"type": "input_text", "text": "b"},
      {"type": "output_text", "text": "c"}], [text("a"), text("b"), text("c")]),
    ([{"type": "text", "text": ""}, {"type": "text", "text": "x"}], [text("x")]),
    ([{"type": "refusal", "refusal": "no"}], [text("no")]),
    ([{"type": "text", "text": "line1\nline2"}], [text("line1\nline2")]),
])
def test_text_blocks_of(content, expected):
    assert cmp.text_blocks_of(content, "messages[0].content") == expected


@pytest.mark.parametrize("content, param, code", [
    (5, "messages[2].content", "invalid_type"),
    ({"type": "text", "text": "a"}, "messages[2].content", "invalid_type"),
    (["a"], "messages[2].content[0]", "invalid_type"),
    ([{"type": "text", "text": "a"}, 7], "messages[2].content[1]", "invalid_type"),
    ([{"type": "text"}], "messages[2].content[0].text", "invalid_type"),
    ([{"type": "text", "text": 5}], "messages[2].content[0].text", "invalid_type"),
    ([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
     "messages[2].content[0].image_url", "unsupported_image_url"),
    ([{"type": "image_url", "image_url": {"url": "data:,"}}], "messages[2].content[0].image_url",
     "invalid_image_url"),
    ([{"type": "input_audio"}], "messages[2].content[0]", "unsupported_content"),
    ([{"type": "file"}], "messages[2].content[0]", "unsupported_content"),
    ([{"type": "video"}], "messages[2].content[0].type", "invalid_type"),
    ([{}], "messages[2].content[0].type", "invalid_type"),
])
def test_text_blocks_of_errors_name_the_exact_param(content, param, code):
    error = error_of(cmp.text_blocks_of, content, "messages[2].content")
    assert (error.status, error.type, error.param, error.code) == (
        400, "invalid_request_error", param, code)


# ================================================================================================
# Images: data: URLs -> base64 image blocks (image_block_of through text_blocks_of)
# ================================================================================================

@pytest.mark.parametrize("part, expected", [
    (image_part(png_url()), image_block()),
    (image_part(png_url(media_type="image/jpeg")), image_block(media_type="image/jpeg")),
    (image_part(png_url(media_type="image/jpg")), image_block(media_type="image/jpeg")),
    (image_part(png_url(media_type="IMAGE/PNG")), image_block()),
    (image_part(png_url(media_type="image/gif")), image_block(media_type="image/gif")),
    (image_part(png_url(media_type="image/webp")), image_block(media_type="image/webp")),
    (image_part(png_url(PNG[:20] + "\n" + PNG[20:40] + " \r\n" + PNG[40:])), image_block()),
    ({"type": "image_url", "image_url": {"url": png_url(), "detail": "high"}}, image_block()),
    ({"type": "image_url", "image_url": png_url()}, image_block()),
    ({"type": "input_image", "image_url": png_url()}, image_block()),   # Responses-API shape
    (image_part(png_url(), "input_image"), image_block()),
])
def test_data_url_images_become_base64_image_blocks(part, expected):
    assert cmp.text_blocks_of([part], "messages[0].content") == [expected]


def test_images_keep_their_place_among_text_parts():
    content = [{"type": "text", "text": "What is this?"}, image_part(png_url()),
               {"type": "text", "text": "And this?"}, image_part(png_url(media_type="image/gif"))]
    call = call_for(user(content))
    assert call.prompt == [text("What is this?"), image_block(), text("And this?"),
                           image_block(media_type="image/gif")]
    json.loads(cmp.stdin_line_for(call.prompt).decode("ascii"))


@pytest.mark.parametrize("part, code", [
    (image_part("https://example.com/cat.png"), "unsupported_image_url"),
    (image_part("http://127.0.0.1/cat.png"), "unsupported_image_url"),
    (image_part("HTTPS://EXAMPLE.COM/CAT.PNG"), "unsupported_image_url"),
    ({"type": "input_image", "image_url": "https://example.com/cat.png"}, "unsupported_image_url"),
    (image_part("file:///etc/passwd"), "invalid_image_url"),
    (image_part("cat.png"), "invalid_image_url"),
    (image_part("data:image/png," + PNG), "invalid_image_url"),                 # not base64
    (image_part(png_url("@@@@" + PNG)), "invalid_image_url"),                   # bad characters
    (image_part(png_url(PNG[:-1] if PNG.endswith("=") else PNG + "A")), "invalid_image_url"),
    (image_part(png_url(media_type="image/bmp")), "unsupported_image_type"),
    (image_part(png_url(media_type="image/svg+xml")), "unsupported_image_type"),
    (image_part(png_url(media_type="text/plain")), "unsupported_image_type"),
    ({"type": "image_url", "image_url": {}}, "invalid_type"),
    ({"type": "image_url", "image_url": {"url": 5}}, "invalid_type"),
    ({"type": "image_url"}, "invalid_type"),
])
def test_bad_images_are_400_naming_the_part(part, code):
    error = error_of(call_for, user([{"type": "text", "text": "look"}, part]))
    assert (error.status, error.type, error.param, error.code) == (
        400, "invalid_request_error", "messages[0].content[1].image_url", code)
    assert error.message


def test_an_image_over_5_mb_is_400():
    data = base64.b64encode(bytes(cmp.MAX_IMAGE_BYTES + 1)).decode("ascii")
    error = error_of(call_for, user([image_part(png_url(data))]))
    assert (error.status, error.param, error.code) == (
        400, "messages[0].content[0].image_url", "image_too_large")


def test_the_5_mb_limit_counts_the_base64_data_as_anthropic_does():
    # The Messages API refuses "image exceeds 5 MB maximum: N bytes > 5242880 bytes" where N is
    # the length of the base64 text, not of the decoded image: an image of 3.75 MB or more
    # decoded is refused upstream. Catch it here with a clear 400 instead.
    at_limit = base64.b64encode(bytes(cmp.MAX_IMAGE_BYTES * 3 // 4)).decode("ascii")
    assert len(at_limit) == cmp.MAX_IMAGE_BYTES
    assert call_for(user([image_part(png_url(at_limit))])).prompt[0]["type"] == "image"
    over = base64.b64encode(bytes(cmp.MAX_IMAGE_BYTES * 3 // 4 + 3)).decode("ascii")
    assert len(over) > cmp.MAX_IMAGE_BYTES
    error = error_of(call_for, user([image_part(png_url(over))]))
    assert (error.status, error.code) == (400, "image_too_large")


def test_images_in_assistant_messages_are_not_replayed_as_images():
    # Only user turns may carry images in the Messages API.
    _, turns = cmp.turns_from_messages(
        [user("a"), assistant([{"type": "text", "text": "b"}, image_part(png_url())]), user("c")], 100)
    assert turns[1] == {"role": "assistant", "content": [text("b")]}


# ================================================================================================
# check_parameters (and the option helpers it works with)
# ================================================================================================

@pytest.mark.parametrize("params", [
    {}, {"temperature": 0}, {"temperature": 2}, {"temperature": 1.5}, {"top_p": 0}, {"top_p": 1},
    {"presence_penalty": -2}, {"frequency_penalty": 2}, {"n": 1}, {"n": None},
    {"logprobs": False}, {"stream": False}, {"stream": True},
    {"stream": True, "stream_options": {"include_usage": True}},
    {"stream_options": None}, {"seed": -1}, {"temperature": None},
])
def test_check_parameters_accepts(params):
    assert cmp.check_parameters(params) is None


@pytest.mark.parametrize("params, param", [
    ({"n": 2}, "n"), ({"n": 0}, "n"), ({"n": True}, "n"), ({"n": 1.5}, "n"), ({"n": "1"}, "n"),
    ({"logprobs": True}, "logprobs"), ({"top_logprobs": 0}, "top_logprobs"),
    ({"temperature": -0.01}, "temperature"), ({"temperature": 2.01}, "temperature"),
    ({"temperature": "1"}, "temperature"), ({"temperature": True}, "temperature"),
    ({"top_p": 1.01}, "top_p"), ({"top_p": -0.1}, "top_p"),
    ({"presence_penalty": -2.5}, "presence_penalty"), ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"seed": 1.5}, "seed"), ({"seed": True}, "seed"), ({"user": 5}, "user"),
    ({"metadata": "x"}, "metadata"), ({"logit_bias": [1]}, "logit_bias"), ({"store": 1}, "store"),
    ({"stream": 1}, "stream"), ({"stream": True, "stream_options": []}, "stream_options"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
])
def test_check_parameters_rejects(params, param):
    error = error_of(cmp.check_parameters, params)
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", param)


def test_n_above_one_and_logprobs_are_unsupported_values():
    assert error_of(cmp.check_parameters, {"n": 3}).code == "unsupported_value"
    assert error_of(cmp.check_parameters, {"logprobs": True}).code == "unsupported_value"


@pytest.mark.parametrize("params, expected", [
    ({}, None),
    ({"max_tokens": 100}, 100),
    ({"max_completion_tokens": 7}, 7),
    ({"max_completion_tokens": 7, "max_tokens": 100}, 7),
    ({"max_tokens": None}, None),
])
def test_max_tokens_become_max_output_tokens(params, expected):
    assert call_for(user("hi"), **params).max_output_tokens == expected


@pytest.mark.parametrize("params, param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -5}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_completion_tokens": [3]}, "max_completion_tokens"),
])
def test_bad_max_tokens_are_400(params, param):
    error = error_of(call_for, user("hi"), **params)
    assert (error.status, error.param) == (400, param)


def test_bad_max_tokens_is_400_even_when_max_completion_tokens_is_valid():
    # OpenAI type-checks every parameter it is sent; a wrong-typed one is never silently dropped.
    error = error_of(call_for, user("hi"), max_completion_tokens=5, max_tokens="lots")
    assert (error.status, error.param) == (400, "max_tokens")


@pytest.mark.parametrize("stop, expected", [
    (None, ()),
    ("END", ("END",)),
    (["a"], ("a",)),
    (["a", "b", "c", "d"], ("a", "b", "c", "d")),
    ([], ()),
    (["\n\n", "###"], ("\n\n", "###")),
])
def test_stop_becomes_a_tuple(stop, expected):
    assert call_for(user("hi"), stop=stop).stop == expected


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], "", [""], [1], 5, {"s": 1}, ["a", None]])
def test_bad_stop_is_400(stop):
    error = error_of(call_for, user("hi"), stop=stop)
    assert (error.status, error.param) == (400, "stop")


# ================================================================================================
# Client tools: mcp_name_for, tools_of, CliCall.client_name
# ================================================================================================

@pytest.mark.parametrize("name", ["f", "get_weather", "A-b_9", "x" * (ROOM - 1), "y" * ROOM])
def test_names_that_fit_beside_the_prefix_are_kept(name):
    assert cmp.mcp_name_for(name) == name


@pytest.mark.parametrize("name", ["x" * (ROOM + 1), "y" * 64, LONG_NAME, "a-" * 32])
def test_longer_names_are_shortened_to_64_characters_in_all(name):
    visible = cmp.MCP_PREFIX + cmp.mcp_name_for(name)
    assert len(visible) == 64 and cmp.TOOL_NAME.match(visible)
    assert cmp.mcp_name_for(name) == cmp.mcp_name_for(name)  # stable across requests


NAME_CHARS = string.ascii_letters + string.digits + "_-"
tool_names = st.builds(lambda prefix, tail: (prefix + tail)[:64],
                       st.sampled_from(["", "get_", "x" * (ROOM - 9), "x" * ROOM, "x" * 60]),
                       st.text(NAME_CHARS, min_size=1, max_size=24))


@PROPERTY
@given(st.lists(tool_names, min_size=1, max_size=6, unique=True))
@example(["x" * 60 + "a", "x" * 60 + "b", "x" * 51, "x" * 52])
def test_client_tool_names_round_trip_through_the_model_visible_name(names):
    call = call_for(user("hi"), tools=[function_tool(n) for n in names])
    visible = [cmp.MCP_PREFIX + t.mcp_name for t in call.tools]
    assert [t.name for t in call.tools] == names
    assert all(cmp.TOOL_NAME.match(v) for v in visible)          # 64 characters at most
    assert len(set(visible)) == len(visible)
    assert [call.client_name(v) for v in visible] == names


def test_a_client_name_equal_to_another_names_short_form_does_not_collide():
    # "x" * 60 is shortened to x...x_<hash>; a client may (however unlikely) also define a tool
    # with exactly that name. The two must stay distinguishable or calls reach the wrong function.
    # Refusing the pair with a 400 that names the second tool is as safe as keeping them apart.
    names = ["x" * 60, cmp.mcp_name_for("x" * 60)]
    try:
        call = call_for(user("hi"), tools=[function_tool(n) for n in names])
    except cmp.ApiError as error:
        assert (error.status, error.param) == (400, "tools[1].function.name")
        return
    visible = [cmp.MCP_PREFIX + t.mcp_name for t in call.tools]
    assert len(set(visible)) == 2
    assert [call.client_name(v) for v in visible] == names


@pytest.mark.parametrize("name", [
    "get_weather", cmp.STRUCTURED_OUTPUT_TOOL, "Read", "mcp__other__get_weather",
    cmp.MCP_PREFIX + "unknown", cmp.MCP_PREFIX + LONG_NAME, "",
])
def test_client_name_is_none_for_anything_but_an_offered_tool(name):
    assert tools_call().client_name(name) is None


def test_tools_of_builds_client_tools():
    tools = cmp.tools_of({"tools": [WEATHER, function_tool("bare"), LONG]})
    assert tools[0] == cmp.ClientTool("get_weather", "get_weather", "Current weather in a city",
                                      json.dumps(WEATHER_SCHEMA, sort_keys=True))
    assert (tools[1].name, tools[1].mcp_name, tools[1].description) == ("bare", "bare", "")
    assert (tools[2].name, tools[2].mcp_name) == (LONG_NAME, cmp.mcp_name_for(LONG_NAME))
    assert tools[0].listing() == {"name": "get_weather", "description": "Current weather in a city",
                                  "inputSchema": WEATHER_SCHEMA}


@pytest.mark.parametrize("parameters, schema", [
    (None, {"type": "object", "properties": {}}),
    ({"type": "object"}, {"type": "object"}),
    ({"properties": {"a": {"type": "string"}}}, {"type": "object", "properties": {"a": {"type": "string"}}}),
    (WEATHER_SCHEMA, WEATHER_SCHEMA),
])
def test_tool_parameters_become_an_object_schema(parameters, schema):
    assert json.loads(cmp.tools_of({"tools": [function_tool("f", parameters)]})[0].schema) == schema


@pytest.mark.parametrize("body", [{}, {"tools": None}, {"tools": []}, {"functions": []}])
def test_no_tools(body):
    assert cmp.tools_of(body) == ()


def test_legacy_functions_are_the_same_tools():
    assert cmp.tools_of({"functions": [t["function"] for t in TOOLS]}) == cmp.tools_of({"tools": TOOLS})


@pytest.mark.parametrize("body, param, code", [
    ({"tools": "x"}, "tools", "invalid_type"),
    ({"tools": {}}, "tools", "invalid_type"),
    ({"tools": [5]}, "tools[0]", "unsupported_tool"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0]", "unsupported_tool"),
    ({"tools": [{"type": "function"}]}, "tools[0]", "unsupported_tool"),
    ({"tools": [WEATHER, {"type": "function", "function": "f"}]}, "tools[1]", "unsupported_tool"),
    ({"tools": [function_tool("get weather")]}, "tools[0].function.name", "invalid_value"),
    ({"tools": [function_tool("")]}, "tools[0].function.name", "invalid_value"),
    ({"tools": [function_tool("x" * 65)]}, "tools[0].function.name", "invalid_value"),
    ({"tools": [function_tool("wetter_\u00fc")]}, "tools[0].function.name", "invalid_value"),
    ({"tools": [function_tool(5)]}, "tools[0].function.name", "invalid_value"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name", "invalid_value"),
    ({"tools": [WEATHER, CLOCK, WEATHER]}, "tools[2].function.name", "invalid_value"),
    ({"tools": [function_tool("f", description=5)]}, "tools[0].function.description", "invalid_type"),
    ({"tools": [function_tool("f", "x")]}, "tools[0].function.parameters", "invalid_type"),
    ({"tools": [function_tool("f", [])]}, "tools[0].function.parameters", "invalid_type"),
    ({"functions": "x"}, "functions", "invalid_type"),
    ({"functions": [5]}, "functions[0]", "unsupported_tool"),
])
def test_bad_tools_are_400_naming_the_exact_param(body, param, code):
    error = error_of(cmp.tools_of, body)
    assert (error.status, error.type, error.param, error.code) == (
        400, "invalid_request_error", param, code)


@pytest.mark.parametrize("functions, param", [
    ([{"name": "get weather"}], "functions[0].name"),
    ([{"name": "f"}, {"name": "f"}], "functions[1].name"),
    ([{"name": "f", "description": 5}], "functions[0].description"),
    ([{"name": "f", "parameters": "x"}], "functions[0].parameters"),
])
def test_bad_legacy_functions_name_the_param_the_client_sent(functions, param):
    # A legacy function has no `function` wrapper: `functions[0].function.name` does not exist.
    error = error_of(cmp.tools_of, {"functions": functions})
    assert (error.status, error.param) == (400, param)


# ================================================================================================
# tool_choice_of, response_format_of, effort_of
# ================================================================================================

CHOICE_TOOLS = cmp.tools_of({"tools": [WEATHER, CLOCK]})


@pytest.mark.parametrize("body, expected", [
    ({}, ("auto", None)),
    ({"tool_choice": None}, ("auto", None)),
    ({"tool_choice": "auto"}, ("auto", None)),
    ({"tool_choice": "none"}, ("none", None)),
    ({"tool_choice": "required"}, ("required", None)),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, ("named", "get_time")),
    ({"function_call": "auto"}, ("auto", None)),
    ({"function_call": "none"}, ("none", None)),
    ({"function_call": {"name": "get_weather"}}, ("named", "get_weather")),
    ({"tool_choice": "auto", "function_call": "none"}, ("auto", None)),
])
def test_tool_choice_of(body, expected):
    assert cmp.tool_choice_of(body, CHOICE_TOOLS) == expected


@pytest.mark.parametrize("body, tools, param", [
    ({"tool_choice": "always"}, CHOICE_TOOLS, "tool_choice"),
    ({"tool_choice": 1}, CHOICE_TOOLS, "tool_choice"),
    ({"tool_choice": []}, CHOICE_TOOLS, "tool_choice"),
    ({"tool_choice": {"type": "function"}}, CHOICE_TOOLS, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, CHOICE_TOOLS, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": []}}}, CHOICE_TOOLS, "tool_choice"),
    ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, CHOICE_TOOLS, "tool_choice"),
    ({"tool_choice": "required"}, (), "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, (), "tool_choice"),
    ({"function_call": "sometimes"}, CHOICE_TOOLS, "function_call"),
    ({"function_call": {"name": "nope"}}, CHOICE_TOOLS, "function_call"),
])
def test_bad_tool_choice_is_400(body, tools, param):
    error = error_of(cmp.tool_choice_of, body, tools)
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", param)


ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}


@pytest.mark.parametrize("fmt, expected", [
    (None, None),
    ({"type": "text"}, None),
    ({"type": "json_object"}, {"type": "object"}),
    ({"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True}},
     ANSWER_SCHEMA),
])
def test_response_format_of(fmt, expected):
    assert cmp.response_format_of({"response_format": fmt}) == expected


@pytest.mark.parametrize("fmt, param", [
    ("json", "response_format"),
    ({}, "response_format"),
    ({"type": "xml"}, "response_format"),
    ({"type": ["json_object"]}, "response_format"),
    ({"type": "json_schema"}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "a"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": "{}"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"description": "x" * 100001}}},
     "response_format.json_schema.schema"),
])
def test_bad_response_format_is_400(fmt, param):
    error = error_of(cmp.response_format_of, {"response_format": fmt})
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", param)


@pytest.mark.parametrize("body, expected", [
    ({}, None),
    ({"reasoning_effort": None}, None),
    ({"reasoning_effort": "minimal"}, "low"),
    ({"reasoning_effort": "low"}, "low"),
    ({"reasoning_effort": "medium"}, "medium"),
    ({"reasoning_effort": "high"}, "high"),
    ({"reasoning_effort": "xhigh"}, "xhigh"),
    ({"reasoning_effort": "max"}, "max"),
    ({"reasoning": {"effort": "high"}}, "high"),
])
def test_effort_of(body, expected):
    assert cmp.effort_of(body) == expected


@pytest.mark.parametrize("value", ["extreme", "", "HIGH", 1, True, 0.5, [], ["high"], {}, {"effort": "high"}])
def test_bad_reasoning_effort_is_400(value):
    error = error_of(cmp.effort_of, {"reasoning_effort": value})
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", "reasoning_effort")


# ================================================================================================
# turns_from_messages and cli_call_for
# ================================================================================================

def test_string_and_array_content_become_text_blocks_in_order():
    system_prompt, turns = cmp.turns_from_messages([
        user([{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]),
        assistant("three"),
        user("four"),
    ], 100)
    assert system_prompt == ""
    assert turns == [
        {"role": "user", "content": [text("one"), text("two")]},
        {"role": "assistant", "content": [text("three")]},
        {"role": "user", "content": [text("four")]},
    ]


def test_system_and_developer_messages_join_into_the_system_prompt_in_order():
    system_prompt, turns = cmp.turns_from_messages([
        system("Be terse."),
        msg("developer", [{"type": "text", "text": "Use French."}, {"type": "text", "text": "No lists."}]),
        user("hi"),
        system("Late rule."),
    ], 100)
    assert system_prompt == "Be terse.\n\nUse French.\n\nNo lists.\n\nLate rule."
    assert turns == [{"role": "user", "content": [text("hi")]}]


def test_consecutive_same_role_messages_merge():
    _, turns = cmp.turns_from_messages([
        user("a"), user("b"), assistant("c"), assistant(""), assistant("d"),
        system("s"), user("e"), user([{"type": "text", "text": "f"}]),
    ], 100)
    assert turns == [
        {"role": "user", "content": [text("a"), text("b")]},
        {"role": "assistant", "content": [text("c"), text("d")]},
        {"role": "user", "content": [text("e"), text("f")]},
    ]


def test_empty_messages_are_skipped_so_they_do_not_break_alternation():
    _, turns = cmp.turns_from_messages([user("a"), assistant(None), user("b")], 100)
    assert turns == [{"role": "user", "content": [text("a"), text("b")]}]


@pytest.mark.parametrize("messages, param", [
    ("hi", "messages"),
    ({"role": "user", "content": "hi"}, "messages"),
    (None, "messages"),
    ([], "messages"),
    (["hi"], "messages[0]"),
    ([user("a"), 5], "messages[1]"),
    ([user("a"), msg("robot", "x")], "messages[1].role"),
    ([user("a"), msg("tool", "x")], "messages[1].tool_call_id"),
    ([user("a"), msg("function", "x")], "messages[1].name"),
    ([{"content": "x"}], "messages[0].role"),
    ([user("a"), user(5)], "messages[1].content"),
    ([system({"x": 1}), user("a")], "messages[0].content"),
    ([user("a"), assistant([{"type": "text", "text": 1}])], "messages[1].content[0].text"),
    ([user([{"type": "image_url", "image_url": {"url": "x"}}])], "messages[0].content[0].image_url"),
])
def test_bad_messages_name_the_exact_param(messages, param):
    error = error_of(cmp.turns_from_messages, messages, 100)
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", param)


def test_too_many_messages_is_400():
    error = error_of(cmp.turns_from_messages, [user("a"), assistant("b"), user("c")], 2)
    assert (error.status, error.param) == (400, "messages")
    assert cmp.turns_from_messages([user("a"), assistant("b")], 2)[1]


def test_cli_call_for_splits_history_and_prompt():
    call = call_for(system("S"), user("u1"), assistant("a1"), user("u2"), user("u3"))
    assert call.system_prompt == "S"
    assert call.history == [{"role": "user", "content": [text("u1")]},
                            {"role": "assistant", "content": [text("a1")]}]
    assert call.prompt == [text("u2"), text("u3")]
    assert (call.model, call.requested_model) == ("sonnet", "claude-sonnet-4")
    assert (call.stream, call.include_usage, call.max_output_tokens, call.stop) == (
        False, False, None, ())


@pytest.mark.parametrize("messages", [
    [user("hi"), assistant("hello")],
    [system("only a system prompt")],
    [user("hi"), assistant("x"), user(""), user([])],
    [assistant("x")],
])
def test_last_message_must_be_a_non_empty_user_message(messages):
    error = error_of(call_for, *messages)
    assert (error.status, error.param) == (400, "messages")


def test_neutral_system_prompt_when_none_is_given():
    for call in (call_for(user("hi")), call_for(system(""), user("hi")),
                 call_for(system([]), user("hi"))):
        assert call.system_prompt == cmp.NEUTRAL_SYSTEM_PROMPT
    assert cmp.NEUTRAL_SYSTEM_PROMPT.strip()
    assert "Claude Code" not in cmp.NEUTRAL_SYSTEM_PROMPT
    assert "official CLI" not in cmp.NEUTRAL_SYSTEM_PROMPT


def test_client_system_prompt_replaces_the_neutral_one():
    assert call_for(msg("developer", "Dev."), user("hi")).system_prompt == "Dev."


@pytest.mark.parametrize("body", [None, [], "x", 5, ["messages"]])
def test_body_must_be_an_object(body):
    error = error_of(cmp.cli_call_for, body, config())
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", None)


def test_messages_are_required():
    error = error_of(cmp.cli_call_for, {"model": "opus"}, config())
    assert (error.status, error.param, error.code) == (400, "messages", "missing_required_parameter")


def test_max_messages_comes_from_config():
    body = body_with(user("a"), assistant("b"), user("c"))
    error = error_of(cmp.cli_call_for, body, config(max_messages=2))
    assert (error.status, error.param) == (400, "messages")


@pytest.mark.parametrize("params, stream, include_usage", [
    ({}, False, False),
    ({"stream": False}, False, False),
    ({"stream": True}, True, False),
    ({"stream": True, "stream_options": {}}, True, False),
    ({"stream": True, "stream_options": {"include_usage": False}}, True, False),
    ({"stream": True, "stream_options": {"include_usage": True}}, True, True),
])
def test_stream_and_include_usage(params, stream, include_usage):
    call = call_for(user("hi"), **params)
    assert (call.stream, call.include_usage) == (stream, include_usage)


def test_tools_are_honored_rather_than_refused_or_dropped():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    call = call_for(user("hi"), tools=[tool])
    assert call.tools == (cmp.ClientTool("f", "f", "", json.dumps({"type": "object"})),)
    assert call.client_name(cmp.MCP_PREFIX + "f") == "f"
    assert call.system_prompt == cmp.NEUTRAL_SYSTEM_PROMPT  # `auto` adds no instruction


# ================================================================================================
# Tool calls and results in messages: tool_use_of, tool_result_of, turns_from_messages
# ================================================================================================

NAMES = {t.name: t.mcp_name for t in cmp.tools_of({"tools": TOOLS})}


@pytest.mark.parametrize("call, expected", [
    (tool_call("call_1", "get_weather", '{"city": "Paris"}'), tool_use("call_1", "get_weather", {"city": "Paris"})),
    (tool_call("call_1", "get_time", "{}"), tool_use("call_1", "get_time", {})),
    (tool_call("call_1", "get_time", ""), tool_use("call_1", "get_time", {})),
    ({"id": "call_1", "function": {"name": "get_time"}}, tool_use("call_1", "get_time", {})),
    (tool_call("toolu_01A-b_9", LONG_NAME, '{"q": "\u00fc"}'), tool_use("toolu_01A-b_9", LONG_NAME, {"q": "\u00fc"})),
    (tool_call("c", "not_offered", '{"a": [1, {"b": null}]}'), tool_use("c", "not_offered", {"a": [1, {"b": None}]})),
])
def test_tool_use_of(call, expected):
    assert cmp.tool_use_of(call, "messages[1].tool_calls[0]", NAMES) == expected


@pytest.mark.parametrize("call, suffix", [
    (5, ""),
    ({"id": "c"}, ""),
    ({"id": "c", "function": "get_time"}, ""),
    (tool_call("", "get_time", "{}"), ".id"),
    (tool_call("call 1", "get_time", "{}"), ".id"),
    (tool_call(5, "get_time", "{}"), ".id"),
    ({"function": {"name": "get_time", "arguments": "{}"}}, ".id"),
    (tool_call("c", "get time", "{}"), ".function.name"),
    (tool_call("c", None, "{}"), ".function.name"),
    (tool_call("c", "get_time", "{not json"), ".function.arguments"),
    (tool_call("c", "get_time", '{"a": 1'), ".function.arguments"),
    (tool_call("c", "get_time", "[1, 2]"), ".function.arguments"),
    (tool_call("c", "get_time", "5"), ".function.arguments"),
    (tool_call("c", "get_time", "null"), ".function.arguments"),
    (tool_call("c", "get_time", {"a": 1}), ".function.arguments"),
])
def test_bad_tool_calls_are_400_naming_the_exact_param(call, suffix):
    error = error_of(cmp.tool_use_of, call, "messages[3].tool_calls[2]", NAMES)
    assert (error.status, error.type, error.param) == (
        400, "invalid_request_error", "messages[3].tool_calls[2]" + suffix)


@pytest.mark.parametrize("content, result", [
    ("18C", "18C"),
    ("", ""),
    (None, ""),
    ([{"type": "text", "text": "12:"}, {"type": "text", "text": "00"}], "12:00"),
    ("line1\nline2", "line1\nline2"),
])
def test_tool_result_of(content, result):
    assert cmp.tool_result_of("call_1", content, "messages[2]") == tool_result("call_1", result)


@pytest.mark.parametrize("tool_call_id, content, param", [
    (None, "x", "messages[2].tool_call_id"),
    ("", "x", "messages[2].tool_call_id"),
    (5, "x", "messages[2].tool_call_id"),
    ("call_1", 5, "messages[2].content"),
    ("call_1", [{"type": "text", "text": 1}], "messages[2].content[0].text"),
])
def test_bad_tool_results_are_400(tool_call_id, content, param):
    error = error_of(cmp.tool_result_of, tool_call_id, content, "messages[2]")
    assert (error.status, error.param) == (400, param)


@pytest.mark.parametrize("cli_id, client_id", [
    ("toolu_01AbCx9", "tooluxu01AbCxx9"),
    ("toolu_fake0_17", "tooluxufake0xu17"),
    ("call-1_x", "callxd1xuxx"),
    ("ABC123", "ABC123"),
])
def test_client_tool_ids_are_alphanumeric_and_map_back_exactly(cli_id, client_id):
    assert cmp.client_tool_id(cli_id) == client_id and client_id.isalnum()
    assert cmp.cli_tool_id(client_id) == cli_id
    # OpenClaw's Responses mode: call_<id>_fc_<item id>_<hash>.
    assert cmp.cli_tool_id("call_%s_fc_0a1b2c_9f8e7d" % client_id) == cli_id


@pytest.mark.parametrize("client_id", [
    "call_1",           # the client's own id: never ours (ours have no "_")
    "call_legacy_3",
    "fox",              # a lone escape character
    "axyb",             # an escape the proxy never writes
    "toolu_01AbC",      # a CLI id sent back as it is (a client that keeps ids from elsewhere)
])
def test_ids_the_proxy_never_gave_pass_unchanged(client_id):
    assert cmp.cli_tool_id(client_id) == client_id


def test_sanitized_tool_call_ids_reach_the_cli_as_its_own():
    given = cmp.client_tool_id("toolu_01Ab")
    _, turns = cmp.turns_from_messages([
        user("Weather?"), assistant_calls(None, tool_call(given, "get_weather", "{}")),
        {"role": "tool", "tool_call_id": given, "content": "rain"}], 10)
    assert turns[1]["content"][0]["id"] == "toolu_01Ab"
    assert turns[2]["content"][0]["tool_use_id"] == "toolu_01Ab"


def test_tool_calls_and_results_become_tool_use_then_tool_result_blocks():
    system_prompt, turns = cmp.turns_from_messages([
        system("S"),
        user("Weather in Paris, and the time?"),
        assistant_calls("Checking.", tool_call("call_1", "get_weather", '{"city": "Paris"}'),
                        tool_call("call_2", "get_time", "{}")),
        tool_message("call_1", "18C"),
        tool_message("call_2", [{"type": "text", "text": "12:00"}]),
        user("Thanks. And tomorrow?"),
    ], 100, cmp.tools_of({"tools": TOOLS}))
    assert system_prompt == "S"
    assert turns == [
        {"role": "user", "content": [text("Weather in Paris, and the time?")]},
        {"role": "assistant", "content": [text("Checking."),
                                          tool_use("call_1", "get_weather", {"city": "Paris"}),
                                          tool_use("call_2", "get_time", {})]},
        {"role": "user", "content": [tool_result("call_1", "18C"), tool_result("call_2", "12:00"),
                                     text("Thanks. And tomorrow?")]},
    ]


@pytest.mark.parametrize("content", [None, "", []])
def test_an_assistant_message_of_tool_calls_only_has_no_text_block(content):
    _, turns = cmp.turns_from_messages(
        [user("q"), assistant_calls(content, tool_call("call_1", "get_time", "{}")),
         tool_message("call_1", "noon")], 100)
    assert turns[1] == {"role": "assistant", "content": [tool_use("call_1", "get_time", {})]}
    assert turns[2] == {"role": "user", "content": [tool_result("call_1", "noon")]}


def test_long_tool_names_in_history_get_the_same_short_form_as_the_offered_tool():
    call = call_for(user("q"), assistant_calls(None, tool_call("call_1", LONG_NAME, '{"q": "x"}')),
                    tool_message("call_1", "found"), tools=TOOLS)
    block = call.history[1]["content"][0]
    assert block["name"] == cmp.MCP_PREFIX + next(t.mcp_name for t in call.tools if t.name == LONG_NAME)
    assert len(block["name"]) <= 64
    assert call.client_name(block["name"]) == LONG_NAME


@PROPERTY
@given(st.lists(st.sampled_from(["tool", "user"]), min_size=1, max_size=6))
def test_tool_results_open_their_user_turn_in_order(order):
    # Messages after an assistant's calls, in any order: the results come first (the Messages API
    # requires it), each group keeping the order the client sent.
    calls = ["call_%d" % i for i, kind in enumerate(order) if kind == "tool"]
    messages = [user("q"), assistant_calls(None, *[tool_call(c, "get_time", "{}") for c in calls] or
                                           [tool_call("call_x", "get_time", "{}")])]
    for i, kind in enumerate(order):
        messages.append(tool_message("call_%d" % i, "r%d" % i) if kind == "tool" else user("u%d" % i))
    _, turns = cmp.turns_from_messages(messages, 100)
    results = [tool_result("call_%d" % i, "r%d" % i) for i, kind in enumerate(order) if kind == "tool"]
    texts = [text("u%d" % i) for i, kind in enumerate(order) if kind == "user"]
    assert turns[-1] == {"role": "user", "content": results + texts}


@pytest.mark.parametrize("messages, param", [
    ([user("a"), {"role": "assistant", "tool_calls": "x"}], "messages[1].tool_calls"),
    ([user("a"), {"role": "assistant", "tool_calls": {}}], "messages[1].tool_calls"),
    ([user("a"), assistant_calls(None, 5)], "messages[1].tool_calls[0]"),
    ([user("a"), assistant_calls(None, tool_call("c1", "get_time", "{}"), tool_call("c 2", "get_time", "{}"))],
     "messages[1].tool_calls[1].id"),
    ([user("a"), assistant_calls(None, tool_call("c1", "get time", "{}"))], "messages[1].tool_calls[0].function.name"),
    ([user("a"), assistant_calls(None, tool_call("c1", "get_time", "{}"), tool_call("c2", "get_weather", '{"city": '))],
     "messages[1].tool_calls[1].function.arguments"),
    ([user("a"), assistant("b"), user("c"), assistant_calls(None, tool_call("c1", "get_time", "nope"))],
     "messages[3].tool_calls[0].function.arguments"),
    ([user("a"), assistant_calls(None, tool_call("c1", "get_time", "{}")), {"role": "tool", "content": "x"}],
     "messages[2].tool_call_id"),
    ([user("a"), assistant_calls(None, tool_call("c1", "get_time", "{}")), tool_message("c1", 5)],
     "messages[2].content"),
    ([user("a"), {"role": "function", "name": "get_time", "content": "x"}], "messages[1].name"),
    ([user("a"), {"role": "assistant", "function_call": {"name": "f", "arguments": "{"}}],
     "messages[1].function_call.arguments"),
    ([user("a"), {"role": "assistant", "function_call": {"name": "a b", "arguments": "{}"}}],
     "messages[1].function_call.name"),
])
def test_bad_tool_messages_name_the_exact_param(messages, param):
    error = error_of(cmp.turns_from_messages, messages, 100)
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", param)


def legacy_call(name, arguments):
    return {"role": "assistant", "content": None, "function_call": {"name": name, "arguments": arguments}}


def function_message(name, content):
    return {"role": "function", "name": name, "content": content}


def test_legacy_functions_map_like_tools():
    legacy = call_for(user("Weather?"), legacy_call("get_weather", '{"city": "Paris"}'),
                      function_message("get_weather", "18C"),
                      functions=[WEATHER["function"]], function_call="auto")
    call_id = legacy.history[1]["content"][0]["id"]
    modern = call_for(user("Weather?"),
                      assistant_calls(None, tool_call(call_id, "get_weather", '{"city": "Paris"}')),
                      tool_message(call_id, "18C"), tools=[WEATHER], tool_choice="auto")
    assert dataclasses.replace(legacy, legacy_functions=False, parallel_tool_calls=True) == modern
    assert legacy.legacy_functions and legacy.prompt == [tool_result(call_id, "18C")]


def test_legacy_function_results_answer_the_earlier_calls_in_order():
    _, turns = cmp.turns_from_messages([
        user("Weather in Paris and Rome?"),
        legacy_call("get_weather", '{"city": "Paris"}'), function_message("get_weather", "18C"),
        legacy_call("get_weather", '{"city": "Rome"}'), function_message("get_weather", "25C"),
    ], 100)
    first, second = turns[1]["content"][0], turns[3]["content"][0]
    assert first["input"] == {"city": "Paris"} and second["input"] == {"city": "Rome"}
    assert first["id"] != second["id"]
    assert turns[2]["content"] == [tool_result(first["id"], "18C")]
    assert turns[4]["content"] == [tool_result(second["id"], "25C")]
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant", "user"]


def test_a_legacy_function_call_is_answered_once():
    error = error_of(cmp.turns_from_messages, [
        user("q"), legacy_call("get_time", "{}"), function_message("get_time", "noon"),
        function_message("get_time", "again")], 100)
    assert (error.status, error.param) == (400, "messages[3].name")


@pytest.mark.parametrize("turns, expected", [
    ([], False),
    ([{"role": "user", "content": [text("a")]}], False),
    ([{"role": "user", "content": [text("a"), image_block()]}], False),
    ([{"role": "assistant", "content": [tool_use("c", "f", {})]}], True),
    ([{"role": "user", "content": [text("a")]}, {"role": "user", "content": [tool_result("c", "x")]}], True),
])
def test_has_tool_blocks(turns, expected):
    assert cmp.has_tool_blocks(turns) is expected


# ================================================================================================
# cli_call_for: tools, tool_choice, formats, effort, reasoning
# ================================================================================================

TOOL_HISTORY = [user("Weather in Paris?"),
                assistant_calls(None, tool_call("call_1", "get_weather", '{"city": "Paris"}')),
                tool_message("call_1", "18C")]


def test_a_request_may_end_with_tool_results():
    call = call_for(system("S"), *TOOL_HISTORY, tools=TOOLS)
    assert call.prompt == [tool_result("call_1", "18C")]
    assert call.history[-1] == {"role": "assistant", "content": [tool_use("call_1", "get_weather", {"city": "Paris"})]}
    assert call.system_prompt == "S"
    assert [t.name for t in call.tools] == ["get_weather", "get_time", LONG_NAME]


def test_a_request_may_not_end_with_the_assistants_tool_calls():
    error = error_of(call_for, *TOOL_HISTORY[:2], tools=TOOLS)
    assert (error.status, error.param) == (400, "messages")


@pytest.mark.parametrize("params", [
    {"tool_choice": "none"}, {"function_call": "none", "functions": [WEATHER["function"]]},
])
def test_tool_choice_none_hides_the_tools(params):
    params = dict({"tools": TOOLS}, **params)
    call = call_for(system("S"), user("hi"), **params)
    assert call.tools == () and call.system_prompt == "S"


def test_tool_choice_none_keeps_the_tools_of_a_conversation_that_used_them():
    # Earlier tool_use blocks need their tools defined; the system prompt forbids new calls.
    call = call_for(system("S"), *TOOL_HISTORY, tools=TOOLS, tool_choice="none")
    assert call.tools == call_for(system("S"), *TOOL_HISTORY, tools=TOOLS).tools
    assert call.system_prompt.startswith("S") and call.system_prompt != "S"
    assert "not call" in call.system_prompt.lower()


@pytest.mark.parametrize("params, mentioned", [
    ({"tool_choice": "required"}, None),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "get_time"),
    ({"tool_choice": {"type": "function", "function": {"name": LONG_NAME}}}, LONG_NAME),
    ({"function_call": {"name": "get_weather"}}, "get_weather"),
])
def test_required_and_named_tool_choice_add_an_instruction(params, mentioned):
    call = call_for(system("S"), user("hi"), tools=TOOLS, **params)
    assert len(call.tools) == len(TOOLS)
    assert call.system_prompt.startswith("S") and "must call" in call.system_prompt
    if mentioned:
        assert upstream(mentioned) in call.system_prompt
    assert call.system_prompt == call_for(system("S"), user("hi"), tools=TOOLS, **params).system_prompt


def test_auto_tool_choice_adds_nothing():
    assert call_for(system("S"), user("hi"), tools=TOOLS, tool_choice="auto").system_prompt == "S"


@pytest.mark.parametrize("value, expected", [(None, True), (True, True), (False, False)])
def test_parallel_tool_calls(value, expected):
    assert tools_call(parallel_tool_calls=value).parallel_tool_calls is expected


@pytest.mark.parametrize("body_value, config_value, expected", [
    (None, False, False), (True, False, True), (False, False, False),
    (None, True, True), (True, True, True),
    (False, True, False),   # the server default is only a default: an explicit false wins
])
def test_include_reasoning(body_value, config_value, expected):
    body = body_with(user("hi"), include_reasoning=body_value)
    assert cmp.cli_call_for(body, config(include_reasoning=config_value)).include_reasoning is expected


@pytest.mark.parametrize("params, json_schema, effort", [
    ({}, None, None),
    ({"response_format": {"type": "json_object"}}, {"type": "object"}, None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER_SCHEMA}}},
     ANSWER_SCHEMA, None),
    ({"reasoning_effort": "minimal"}, None, "low"),
    ({"reasoning_effort": "high", "response_format": {"type": "text"}}, None, "high"),
])
def test_response_format_and_reasoning_effort_reach_the_call(params, json_schema, effort):
    call = call_for(user("hi"), **params)
    assert (call.json_schema, call.effort) == (json_schema, effort)


# -- properties over arbitrary JSON ---------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-(10 ** 6), 10 ** 6)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
content_parts = st.one_of(
    st.fixed_dictionaries({
        "type": st.sampled_from(["text", "input_text", "output_text", "refusal", "image_url", "x"]),
        "text": st.one_of(st.text(max_size=12), json_scalars)}),
    json_values)
contents = st.one_of(st.text(max_size=16), st.lists(content_parts, max_size=3), json_values)
tool_call_values = st.one_of(
    json_values,
    st.lists(st.fixed_dictionaries({
        "id": st.one_of(st.sampled_from(["call_1", "call_2", "call 3", ""]), json_scalars),
        "type": st.just("function"),
        "function": st.fixed_dictionaries({
            "name": st.one_of(st.sampled_from(["get_weather", "get_time", LONG_NAME, "bad name"]), json_scalars),
            "arguments": st.one_of(st.sampled_from(["{}", '{"city": "Paris"}', "", "[1]", "{", "null"]),
                                   json_values)})}),
        max_size=2))
messages_strategy = st.one_of(
    st.fixed_dictionaries({
        "role": st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]),
                          json_scalars),
        "content": contents},
        optional={"tool_calls": tool_call_values,
                  "tool_call_id": st.one_of(st.sampled_from(["call_1", "call_2"]), json_scalars),
                  "name": st.one_of(st.sampled_from(["get_weather", "get_time"]), json_scalars),
                  "function_call": st.one_of(json_values, st.fixed_dictionaries(
                      {"name": st.sampled_from(["get_weather", "get_time"]),
                       "arguments": st.sampled_from(["{}", "{", '{"city": "Rome"}']),}))}),
    json_values)
plain_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                           "content": st.text(max_size=10)}),
    max_size=3).map(lambda messages: messages + [user("question")])
param_values = st.one_of(
    json_values,
    st.sampled_from([None, True, False, 0, 1, 2, 0.5, 64, "x", "opus", "claude-max/sonnet",
                     "gpt-4", "claude-x-1", {}, {"include_usage": True}, ["END"], TOOLS,
                     [WEATHER["function"]], "auto", "none", "required", "high", "minimal",
                     {"name": "get_weather"}, {"type": "function", "function": {"name": "get_time"}},
                     {"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": {}}}]),
    st.lists(st.text(min_size=1, max_size=3), max_size=5))
bodies = st.builds(
    lambda messages, params: dict(params, messages=messages),
    st.one_of(plain_messages, st.lists(messages_strategy, max_size=5), json_values),
    st.dictionaries(st.sampled_from(list(cmp.PARAMETERS)), param_values, max_size=3))


@PROPERTY
@given(st.one_of(bodies, json_values))
@example({"messages": [{"role": "user", "content": "hi"}]})
@example({"messages": TOOL_HISTORY, "tools": TOOLS, "tool_choice": "none"})
@example({"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": []})
def test_cli_call_for_returns_a_call_or_a_4xx_api_error(body):
    try:
        call = cmp.cli_call_for(body, config(max_messages=4))
    except cmp.ApiError as error:
        assert 400 <= error.status < 500
        json.dumps(error.body())
        return
    assert isinstance(call, cmp.CliCall)
    assert call.model and call.system_prompt and call.prompt
    turns = call.history + [{"role": "user", "content": call.prompt}]
    assert [t["role"] for t in turns][-1] == "user"
    assert all(a["role"] != b["role"] for a, b in zip(turns, turns[1:]))
    for t in turns:
        allowed = {"user": ("text", "image", "tool_result"), "assistant": ("text", "tool_use")}[t["role"]]
        assert all(block["type"] in allowed for block in t["content"])
        assert all(block["text"] for block in t["content"] if block["type"] == "text")
        types = [block["type"] for block in t["content"]]
        assert types == sorted(types, key=lambda kind: kind != "tool_result")
        for block in t["content"]:
            if block["type"] == "tool_use":
                assert cmp.TOOL_NAME.match(block["name"]) and isinstance(block["input"], dict)
    json.loads(cmp.stdin_line_for(call.prompt).decode("ascii"))


# ================================================================================================
# cli_args_for, cli_env_for, stdin_line_for
# ================================================================================================

def value_after(args, flag):
    assert args.count(flag) == 1, "%s appears %d times in %r" % (flag, args.count(flag), args)
    return args[args.index(flag) + 1]


def test_cli_args_for_without_session():
    call = call_for(system("Be brief."), user("hi"), model="opus")
    args = cmp.cli_args_for(call, "/opt/claude", None, "/tmp/p/system.txt")
    assert args[0] == "/opt/claude" and "-p" in args
    assert value_after(args, "--input-format") == "stream-json"
    assert value_after(args, "--output-format") == "stream-json"
    assert value_after(args, "--tools") == ""
    assert value_after(args, "--setting-sources") == ""
    assert "--strict-mcp-config" in args
    assert "--no-session-persistence" in args
    # The second line of defence for verbatim client text: no commands, no file mentions.
    assert "--disable-slash-commands" in args and "--restricted" in args
    assert value_after(args, "--model") == "opus"
    # The system prompt travels in a file, never in argv.
    assert value_after(args, "--system-prompt-file") == "/tmp/p/system.txt"
    assert "--system-prompt" not in args and not any("Be brief." in a for a in args)
    assert "--resume" not in args
    assert all(isinstance(a, str) for a in args)


def test_cli_args_for_with_session_resumes_it():
    call = call_for(user("a"), assistant("b"), user("c"))
    args = cmp.cli_args_for(call, "claude", "0b7e-session", "/tmp/p/system.txt")
    assert value_after(args, "--resume") == "0b7e-session"
    assert call.system_prompt == cmp.NEUTRAL_SYSTEM_PROMPT


def test_cli_args_for_full_model_id():
    args = cmp.cli_args_for(call_for(user("x"), model="openai/claude-opus-4-1-20250805"), "claude", None, "/tmp/p/system.txt")
    assert value_after(args, "--model") == "claude-opus-4-1-20250805"


MARK = "\u2603user-text\u2603"


@PROPERTY
@given(prompt=st.text(), earlier=st.lists(st.text(min_size=1), max_size=4),
       system_text=st.text(), session=st.booleans())
def test_no_user_or_history_text_ever_reaches_argv(prompt, earlier, system_text, session):
    messages = [system(system_text)] if system_text else []
    for i, past in enumerate(earlier):
        messages.append(msg("user" if i % 2 == 0 else "assistant", MARK + past))
    messages.append(user(MARK + prompt))
    call = call_for(*messages)
    args = cmp.cli_args_for(call, "claude", "sid" if session else None, "/tmp/p/system.txt")
    assert not any(MARK in arg for arg in args)


@pytest.mark.parametrize("system_text", ["before\x00after", "\ud800 lone surrogate"])
def test_argv_is_always_valid_for_exec(system_text):
    # exec() refuses NUL bytes (ValueError) and unencodable text (UnicodeEncodeError); neither is
    # an OSError, so a system message carrying one must be refused up front with a 400.
    try:
        call = call_for(system(system_text), user("hi"))
    except cmp.ApiError as error:
        assert error.status == 400
        return
    for arg in cmp.cli_args_for(call, "claude", None, "/tmp/p/system.txt"):
        assert "\x00" not in arg
        os.fsencode(arg)


def test_argv_elements_stay_under_the_kernel_limit():
    # A 200 KB system message fits the default 10 MiB body limit but not one argv element
    # (Linux MAX_ARG_STRLEN = 128 KiB): exec fails with E2BIG. Either refuse it with a 400 or
    # keep it out of argv (e.g. --system-prompt-file).
    try:
        call = call_for(system("x" * 200000), user("hi"))
    except cmp.ApiError as error:
        assert error.status == 400
        return
    for arg in cmp.cli_args_for(call, "claude", None, "/tmp/p/system.txt"):
        assert len(os.fsencode(arg)) <= MAX_ARG_BYTES


@pytest.mark.parametrize("params, environ, expected", [
    ({"max_tokens": 64}, {}, "64"),
    ({"max_completion_tokens": 9}, {"CLAUDE_CODE_MAX_OUTPUT_TOKENS": "32000"}, "9"),
    ({}, {"CLAUDE_CODE_MAX_OUTPUT_TOKENS": "32000"}, None),
    ({}, {}, None),
])
def test_cli_env_for_max_output_tokens(params, environ, expected):
    env = cmp.cli_env_for(call_for(user("hi"), **params), config(), environ)
    assert env.get("CLAUDE_CODE_MAX_OUTPUT_TOKENS") == expected


def test_cli_env_for_keeps_the_allowed_environment_and_sets_retries():
    environ = {"PATH": "/bin", "HOME": "/home/u", "CLAUDE_CODE_MAX_RETRIES": "10", "LC_ALL": "C",
               "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-x", "TMPDIR": "/tmp/x"}
    before = dict(environ)
    env = cmp.cli_env_for(call_for(user("hi")), config(cli_max_retries=5), environ)
    assert environ == before
    assert env["PATH"] == "/bin" and env["HOME"] == "/home/u" and env["LC_ALL"] == "C"
    assert env["CLAUDE_CODE_OAUTH_TOKEN"] == "sk-ant-oat01-x" and env["TMPDIR"] == "/tmp/x"
    assert env["CLAUDE_CODE_MAX_RETRIES"] == "5"
    assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert env["ENABLE_CLAUDEAI_MCP_SERVERS"] == "false"
    assert all(isinstance(v, str) for v in env.values())


HOSTILE_ENV = {"ANTHROPIC_API_KEY": "sk-ant-api-x", "ANTHROPIC_AUTH_TOKEN": "bearer-x",
               "ANTHROPIC_CUSTOM_HEADERS": "x-evil: 1", "CLAUDE_CODE_ENTRYPOINT": "claude-vscode",
               "CLAUDE_MAX_PROXY_API_KEY": "proxy-secret", "CLAUDE_MAX_PROXY_TEST_TAG": "t",
               "AWS_SECRET_ACCESS_KEY": "aws", "NODE_OPTIONS": "--require /tmp/evil.js",
               "ENABLE_CLAUDEAI_MCP_SERVERS": "true", "CLAUDE_CODE_USE_BEDROCK": "1"}


def test_cli_env_for_is_an_allow_list():
    env = cmp.cli_env_for(call_for(user("hi")), config(), dict(HOSTILE_ENV, PATH="/bin"))
    assert env == {"PATH": "/bin", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                   "ENABLE_CLAUDEAI_MCP_SERVERS": "false", "CLAUDE_CODE_MAX_RETRIES": "0"}


def test_api_keys_reach_the_cli_only_with_use_api_key():
    env = cmp.cli_env_for(call_for(user("hi")), config(use_api_key=True), HOSTILE_ENV)
    assert env["ANTHROPIC_API_KEY"] == "sk-ant-api-x" and env["ANTHROPIC_AUTH_TOKEN"] == "bearer-x"
    assert not any(name.startswith(cmp.ENV_PREFIX) for name in env)
    assert "ANTHROPIC_CUSTOM_HEADERS" not in env and "CLAUDE_CODE_ENTRYPOINT" not in env


def test_ignored_api_keys_names_what_was_set_and_not_passed():
    assert cmp.ignored_api_keys(config(), HOSTILE_ENV) == ["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"]
    assert cmp.ignored_api_keys(config(use_api_key=True), HOSTILE_ENV) == []
    assert cmp.ignored_api_keys(config(), {"ANTHROPIC_API_KEY": ""}) == []


def test_readme_lists_the_cli_environment_the_code_passes():
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"),
              encoding="utf-8") as readme_file:
        readme = readme_file.read()
    section = readme[readme.index("### The CLI's environment"):]
    section = section[:section.index("\n#")]
    listed = set(re.findall(r"`([A-Za-z_]+\*?)`", section))
    assert set(cmp.CLI_ENV_NAMES) | {p + "*" for p in cmp.CLI_ENV_PREFIXES} | set(cmp.API_KEY_NAMES) <= listed


def test_cli_env_for_respects_an_explicit_nonessential_traffic_setting():
    env = cmp.cli_env_for(call_for(user("hi")), config(),
                          {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "0"})
    assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "0"


def test_stdin_line_for():
    blocks = [text("héllo\nwörld"), text("two")]
    line = cmp.stdin_line_for(blocks)
    assert isinstance(line, bytes) and line.endswith(b"\n") and line.count(b"\n") == 1
    line.decode("ascii")  # escaped: no encoding can go wrong between us and the CLI
    # text_not_typed: the text is the client's, not typed at the CLI's prompt, so no `@path`
    # is read and no `/command` runs (tests/test_e2e_cli.py checks the real CLI honours it).
    assert json.loads(line.decode("utf-8")) == {
        "type": "user", "text_not_typed": True, "message": {"role": "user", "content": blocks}}


def test_stdin_line_for_a_named_turn_appended_without_asking_the_model():
    # The uuid is what a rewind names; shouldQuery false appends the turn without a model call.
    line = json.loads(cmp.stdin_line_for([text("hi")], "line-1", query=False).decode("ascii"))
    assert line == {"type": "user", "text_not_typed": True, "uuid": "line-1", "shouldQuery": False,
                    "message": {"role": "user", "content": [text("hi")]}}


@pytest.mark.parametrize("given, version", [
    ("2.1.332", (2, 1, 332)), ("2.1.332 (Claude Code)", (2, 1, 332)), ("10.0.1-beta", (10, 0, 1)),
    ("", ()), ("Claude Code", ()), ("2.1", ())])
def test_cli_version_of(given, version):
    assert cmp.cli_version_of(given) == version
    assert (cmp.cli_version_of(given) >= cmp.SHOULD_QUERY_SINCE) == (version >= (2, 1, 332))


@PROPERTY
@given(st.lists(st.text(min_size=1), min_size=1, max_size=4))
def test_stdin_line_round_trips_any_text(pieces):
    blocks = [text(p) for p in pieces]
    line = cmp.stdin_line_for(blocks)
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert json.loads(line.decode("utf-8"))["message"]["content"] == blocks


def test_stdin_line_is_valid_utf8_for_any_accepted_request():
    # json.loads accepts "\ud800" in a request body; encoding it later raises UnicodeEncodeError
    # (a 500 and a CLI left waiting on stdin). Refuse it with a 400 or make it encodable.
    try:
        call = call_for(user("bad \ud800 text"))
    except cmp.ApiError as error:
        assert error.status == 400
        return
    json.loads(cmp.stdin_line_for(call.prompt).decode("utf-8"))


# ================================================================================================
# cli_args_for with tools, structured output and effort; tool_results_in; cold_turns_for
# ================================================================================================

def args_for(call, session_id=None):
    return cmp.cli_args_for(call, "claude", session_id, "/tmp/p/system.txt")


def test_tools_add_the_proxys_sdk_mcp_server_and_the_stdio_permission_prompt():
    args = args_for(tools_call())
    assert json.loads(value_after(args, "--mcp-config")) == {
        "mcpServers": {cmp.MCP_SERVER: {"type": "sdk", "name": cmp.MCP_SERVER}}}
    assert value_after(args, "--permission-prompt-tool") == "stdio"
    # Still none of Claude Code's own tools, and no MCP server from the user's settings.
    assert value_after(args, "--tools") == "" and "--strict-mcp-config" in args
    assert value_after(args, "--system-prompt-file") == "/tmp/p/system.txt"


@pytest.mark.parametrize("params", [{}, {"tools": []}, {"tools": TOOLS, "tool_choice": "none"}])
def test_no_mcp_server_without_tools(params):
    args = args_for(call_for(user("hi"), **params))
    assert "--mcp-config" not in args and "--permission-prompt-tool" not in args


def test_tool_definitions_never_reach_argv():
    # Names, descriptions and schemas reach the CLI through the MCP server's tools/list.
    marker = "\u2603tool-text\u2603"
    tool = function_tool("f_marker", {"type": "object", "properties": {"q": {"description": marker}}},
                         marker)
    args = args_for(call_for(user("hi"), tools=[tool], tool_choice={"type": "function", "function": {"name": "f_marker"}}))
    assert not any(marker in a or "f_marker" in a for a in args)


@pytest.mark.parametrize("fmt, schema", [
    (None, None),
    ({"type": "text"}, None),
    ({"type": "json_object"}, {"type": "object"}),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER_SCHEMA}}, ANSWER_SCHEMA),
])
def test_response_format_becomes_json_schema(fmt, schema):
    args = args_for(call_for(user("hi"), response_format=fmt))
    if schema is None:
        assert "--json-schema" not in args
    else:
        assert json.loads(value_after(args, "--json-schema")) == schema


def test_the_largest_accepted_schema_fits_one_argument():
    # Non-ASCII and NUL are escaped (6 ASCII bytes each), so the argument is as long as the text.
    room = 100000 - len(json.dumps({"type": "object", "description": ""}))
    schema = {"type": "object", "description": "\u00fc\x00" * (room // 12)}
    assert 100000 - 12 < len(json.dumps(schema)) <= 100000
    args = args_for(call_for(user("hi"), response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}))
    value = value_after(args, "--json-schema")
    assert json.loads(value) == schema
    assert "\x00" not in value and len(os.fsencode(value)) <= MAX_ARG_BYTES


@pytest.mark.parametrize("effort", [None, "minimal", "low", "medium", "high", "xhigh", "max"])
def test_reasoning_effort_becomes_effort(effort):
    args = args_for(call_for(user("hi"), reasoning_effort=effort))
    if effort is None:
        assert "--effort" not in args
    else:
        assert value_after(args, "--effort") == cmp.EFFORTS[effort]


def test_all_options_together():
    call = tools_call(response_format={"type": "json_object"}, reasoning_effort="medium")
    args = args_for(call, "sid-1")
    assert value_after(args, "--resume") == "sid-1"
    assert value_after(args, "--effort") == "medium"
    assert json.loads(value_after(args, "--json-schema")) == {"type": "object"}
    assert value_after(args, "--permission-prompt-tool") == "stdio"
    assert all(isinstance(a, str) for a in args)


@pytest.mark.parametrize("blocks, expected", [
    ([], {}),
    ([text("hi")], {}),
    ([tool_result("call_1", "18C")], {"call_1": "18C"}),
    ([tool_result("call_1", "18C"), tool_result("call_2", "")], {"call_1": "18C", "call_2": ""}),
    ([tool_result("call_1", "18C"), text("and?")], {}),
    ([{"type": "tool_result", "tool_use_id": "c", "content": [text("a"), text("b")]}], {"c": "ab"}),
])
def test_tool_results_in(blocks, expected):
    assert cmp.tool_results_in(blocks) == expected


def test_tool_results_in_a_real_follow_up():
    call = call_for(*TOOL_HISTORY, tools=TOOLS)
    assert cmp.tool_results_in(call.prompt) == {"call_1": "18C"}
    assert cmp.tool_results_in(call_for(*(TOOL_HISTORY + [user("more")]), tools=TOOLS).prompt) == {}


def test_cold_turns_for_a_plain_prompt():
    call = call_for(user("a"), assistant("b"), user("c"))
    assert cmp.cold_turns_for(call) == (call.history, call.prompt)


@pytest.mark.parametrize("extra", [[], [user("Thanks. And tomorrow?")]])
def test_cold_turns_for_tool_results_write_them_into_the_session(extra):
    # The CLI drops tool results sent on stdin to a resumed session: the results join the session
    # turns and stdin only starts the turn.
    call = call_for(*(TOOL_HISTORY + extra), tools=TOOLS)
    session_turns, stdin_blocks = cmp.cold_turns_for(call)
    assert session_turns == call.history + [{"role": "user", "content": call.prompt}]
    assert session_turns[-1]["content"][0] == tool_result("call_1", "18C")
    assert stdin_blocks == [text(cmp.TOOL_RESULTS_PROMPT)]
    assert call.history == cmp.cold_turns_for(call)[0][:-1]  # the call itself is left as it was
    rows = [json.loads(line) for line in cmp.session_lines_for(session_turns, "s", "/d", now=0)]
    assert [r["message"]["content"] for r in rows] == [t["content"] for t in session_turns]
    assert rows[1]["message"]["content"][0]["type"] == "tool_use"


# ================================================================================================
# project_key and session_lines_for
# ================================================================================================

@pytest.mark.parametrize("cwd, key", [
    ("/home/u/.cache/claude-max-proxy/cwd", "-home-u--cache-claude-max-proxy-cwd"),
    ("/tmp/abc123", "-tmp-abc123"),
    ("/a b/ü_x", "-a-b---x"),
    ("relative", "relative"),
])
def test_project_key(cwd, key):
    assert cmp.project_key(cwd) == key


HISTORY = [
    {"role": "user", "content": [text("u1"), text("u1b")]},
    {"role": "assistant", "content": [text("a1")]},
    {"role": "user", "content": [text("u2")]},
    {"role": "assistant", "content": [text("a2 ü\nnewline")]},
]


def test_session_lines_for():
    lines = cmp.session_lines_for(HISTORY, "sess-1", "/work/dir", now=1700000000.5)
    assert len(lines) == len(HISTORY)
    rows = [json.loads(line) for line in lines]
    assert all("\n" not in line for line in lines)
    assert [r["type"] for r in rows] == ["user", "assistant", "user", "assistant"]
    assert [r["message"]["role"] for r in rows] == ["user", "assistant", "user", "assistant"]
    assert [r["message"]["content"] for r in rows] == [t["content"] for t in HISTORY]
    assert rows[0]["parentUuid"] is None
    assert [r["parentUuid"] for r in rows[1:]] == [r["uuid"] for r in rows[:-1]]
    assert len({r["uuid"] for r in rows}) == len(rows)
    for row in rows:
        assert row["sessionId"] == "sess-1" and row["cwd"] == "/work/dir"
        assert row["timestamp"] == "2023-11-14T22:13:20.500Z"
        assert row["isSidechain"] is False
    for row in rows[1::2]:
        message = row["message"]
        assert message["id"].startswith("msg_") and message["type"] == "message"
        assert message["model"] and message["stop_reason"] == "end_turn"
    for row in rows[0::2]:
        assert set(row["message"]) == {"role", "content"}


def test_session_lines_for_empty_history_and_default_clock():
    assert cmp.session_lines_for([], "s", "/d") == []
    row = json.loads(cmp.session_lines_for(HISTORY[:1], "s", "/d")[0])
    assert row["timestamp"].endswith("Z") and row["timestamp"][:4].isdigit()


def test_session_lines_from_a_real_call():
    call = call_for(user("first"), assistant("reply"), user("now"))
    rows = [json.loads(line) for line in cmp.session_lines_for(call.history, "s", "/d", now=0)]
    assert [(r["type"], r["message"]["content"]) for r in rows] == [
        ("user", [text("first")]), ("assistant", [text("reply")])]
    assert rows[0]["timestamp"] == "1970-01-01T00:00:00.000Z"


ENVIRONMENT = {"type": "environment", "snapshot": {"workingDirectory": "/d", "isGitRepo": False, "platform": "linux"}}
MODEL_ROW = {"type": "model", "identity": {"modelId": "claude-x-1", "marketingName": "X 1", "knowledgeCutoff": None},
             "text": "You are powered by the model named X 1. The exact model ID is claude-x-1."}


@pytest.mark.parametrize("context, attachments", [
    ((), []),
    ((ENVIRONMENT,), [ENVIRONMENT, {"type": "date", "date": "2023-11-14"}]),
    ((ENVIRONMENT, MODEL_ROW), [ENVIRONMENT, MODEL_ROW, {"type": "date", "date": "2023-11-14"}]),
])
def test_session_lines_carry_the_clis_context_rows_after_the_first_user_row(monkeypatch, context, attachments):
    # As the CLI writes its own transcripts: the context once, after the first user row, dated by
    # the local date.
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        rows = [json.loads(line) for line in cmp.session_lines_for(HISTORY, "s", "/d", now=1700000000.5,
                                                                   context=context)]
    finally:
        monkeypatch.undo()
        time.tzset()
    assert [r["type"] for r in rows] == ["user"] + ["attachment"] * len(attachments) + ["assistant", "user", "assistant"]
    assert [r["attachment"] for r in rows if r["type"] == "attachment"] == attachments
    assert [r["parentUuid"] for r in rows[1:]] == [r["uuid"] for r in rows[:-1]]
    assert len({r["uuid"] for r in rows}) == len(rows)


def test_native_context_in_a_cli_transcript():
    rows = [{"type": "user", "message": {"role": "user", "content": "x"}},
            {"type": "attachment", "attachment": ENVIRONMENT},
            {"type": "attachment", "attachment": MODEL_ROW},
            {"type": "attachment", "attachment": {"type": "date", "date": "2023-11-14"}},
            {"type": "attachment", "attachment": dict(MODEL_ROW, text="a later model change")}]
    lines = [json.dumps(r) for r in rows] + ['{"type": "attachment", "attachm']
    assert cmp.native_context_in(lines) == {"environment": ENVIRONMENT, "model": MODEL_ROW}
    assert cmp.native_context_in(lines[:1]) == {}


def test_native_context_gives_the_model_row_only_for_its_model():
    context = cmp.NativeContext()
    assert context.rows_for("sonnet") == () and not context.known("sonnet")
    context.learn("sonnet", {"model": MODEL_ROW})
    assert context.rows_for("sonnet") == () and not context.known("sonnet")  # no environment yet
    context.learn("sonnet", {"environment": ENVIRONMENT})
    assert context.rows_for("sonnet") == (ENVIRONMENT, MODEL_ROW) and context.known("sonnet")
    assert context.rows_for("opus") == (ENVIRONMENT,) and not context.known("opus")


@pytest.mark.parametrize("transcript_id, expected", [
    (None, ["--no-session-persistence"]), ("sid-1", ["--session-id", "sid-1"])])
def test_only_a_learning_process_keeps_its_transcript(transcript_id, expected):
    args = cmp.cli_args_for(call_for(user("x")), "claude", None, "/tmp/p", transcript_id)
    at = args.index(expected[0])
    assert args[at:at + len(expected)] == expected
    assert ("--no-session-persistence" in args) == (transcript_id is None)


# ================================================================================================
# error_from_result and usage_from
# ================================================================================================

def error_result(status, message):
    return {"type": "result", "subtype": "success", "is_error": True, "api_error_status": status,
            "result": message, "stop_reason": "stop_sequence", "usage": {}}


@pytest.mark.parametrize("status, message, http_status, kind, login_hint", [
    (401, 'API Error: 401 {"type":"error","error":{"type":"authentication_error"}}', 401,
     "authentication_error", True),
    (403, "API Error: 403 permission", 401, "authentication_error", True),
    (429, "API Error: Request rejected (429) · rate limit", 429, "rate_limit_error", False),
    (529, "API Error: 529 Overloaded", 503, "server_error", False),
    (500, "API Error: 500 Internal server error", 502, "server_error", False),
    (400, "API Error: 400 bad", 400, "invalid_request_error", False),
    (404, "API Error: 404 not found", 404, "invalid_request_error", False),
    (413, "API Error: 413 too large", 413, "invalid_request_error", False),
    (None, "Not logged in · Please run /login", 401, "authentication_error", True),
    (None, "Invalid API key · Please run /login", 401, "authentication_error", True),
    (None, "OAuth token has expired", 401, "authentication_error", True),
    (None, "Something odd happened", 502, "server_error", False),
    ("429", "weird status type", 502, "server_error", False),
])
def test_error_from_result(status, message, http_status, kind, login_hint):
    error = cmp.error_from_result(error_result(status, message))
    assert isinstance(error, cmp.ApiError)
    assert (error.status, error.type) == (http_status, kind)
    assert (cmp.LOGIN_HINT in error.message) == login_hint
    assert error.message.startswith(message.rstrip(". ")[:20])
    assert error.param is None


def test_error_from_result_codes():
    assert cmp.error_from_result(error_result(401, "x")).code == "invalid_api_key"
    assert cmp.error_from_result(error_result(429, "x")).code == "rate_limit_exceeded"
    assert cmp.error_from_result(error_result(529, "x")).code == "overloaded"
    assert cmp.error_from_result(error_result(None, "x")).code == "upstream_error"


def test_error_from_result_without_text_uses_errors_or_a_default():
    error = cmp.error_from_result({"type": "result", "is_error": True, "errors": ["boom"]})
    assert (error.status, error.message) == (502, "boom")
    error = cmp.error_from_result({"type": "result", "is_error": True, "errors": []})
    assert error.status == 502 and error.message


def test_rate_limit_without_reset_time_gets_the_proxys_short_retry_after():
    error = cmp.error_from_result(error_result(429, "API Error: Server is temporarily limiting requests"))
    assert error.headers == {"Retry-After": str(cmp.UPSTREAM_RETRY_AFTER)}


NOW = 1795948000.0
LIMIT_INFO = {"status": "rejected", "resetsAt": 1795951600, "rateLimitType": "five_hour",
              "overageStatus": "rejected", "overageDisabledReason": "out_of_credits", "isUsingOverage": False,
              "unifiedWindows": {"five_hour": {"utilization": 1, "resetsAt": 1795951600, "status": "rejected"},
                                 "seven_day": {"utilization": 0.41, "resetsAt": 1796467080, "status": "allowed"}}}


def cli_error(status, text, **fields):
    return dict(error_result(status, text), terminal_reason="api_error", api_error_type="x", **fields)


# (what the CLI reported, rate_limit_info of the turn) -> (HTTP status, type, code, Retry-After, words)
# The rows are the CLI 2.1.332 results measured against tests/fake_upstream.py.
@pytest.mark.parametrize("result, rate_limit, expected", [
    (cli_error(429, "You've hit your 5-hour limit · resets 11am (UTC)", api_error="usage_limit_reached"),
     LIMIT_INFO, (429, "rate_limit_error", "rate_limit_exceeded", "3600", "2026-11-29T11:26:40Z")),
    (cli_error(429, "You've hit your 5-hour limit · resets 11am (UTC)", api_error="usage_limit_reached"),
     None, (429, "rate_limit_error", "rate_limit_exceeded", None, "5-hour limit")),
    (cli_error(429, "API Error: Server is temporarily limiting requests (not your usage limit)"),
     {"status": "rejected", "isUsingOverage": False},
     (429, "rate_limit_error", "rate_limit_exceeded", "5", "not your usage limit")),
    (cli_error(400, "API Error: 400 Third-party apps now draw from your extra usage, not your plan limits."),
     None, (402, "billing_error", "extra_usage_required", None, "#limits-extra-usage-and-billing")),
    (cli_error(400, "API Error: 400 You're out of extra usage. Add more at claude.ai/settings/usage."),
     None, (402, "billing_error", "extra_usage_required", None, "system prompt")),
    (dict(cli_error(400, "Prompt is too long · the request is ~210000 tokens (limit 200000)"),
          terminal_reason="prompt_too_long"),
     None, (400, "invalid_request_error", "context_length_exceeded", None, "Prompt is too long")),
    (cli_error(400, "API Error: 400 messages: text content blocks must be non-empty"),
     None, (400, "invalid_request_error", "upstream_invalid_request", None, "non-empty")),
])
def test_error_mapping_of_limits_billing_and_context(result, rate_limit, expected):
    error = cmp.error_from_result(result, rate_limit, now=NOW)
    status, kind, code, retry_after, words = expected
    assert (error.status, error.type, error.code) == (status, kind, code)
    assert error.headers.get("Retry-After") == retry_after
    assert words in error.message
    assert error.status < 500 and (error.status == 429) == (kind == "rate_limit_error")


def test_turn_translator_takes_the_reset_from_the_turns_rate_limit_event():
    translator = cmp.TurnTranslator()
    reset = int(time.time()) + 1800
    translator.feed({"type": "rate_limit_event", "rate_limit_info": dict(LIMIT_INFO, resetsAt=reset)})
    with pytest.raises(cmp.ApiError) as raised:
        translator.feed(cli_error(429, "You've hit your 5-hour limit", api_error="usage_limit_reached"))
    assert 1740 <= int(raised.value.headers["Retry-After"]) <= 1800


# ================================================================================================
# limit state: rate_limit_info -> state -> headers, /metrics gauges, the --no-overage refusal
# ================================================================================================

WARNING_INFO = {"status": "allowed_warning", "resetsAt": 1795951600, "rateLimitType": "five_hour",
                "utilization": 0.92, "overageStatus": "allowed", "isUsingOverage": False, "surpassedThreshold": 0.9,
                "unifiedWindows": {"five_hour": {"utilization": 0.92, "resetsAt": 1795951600,
                                                 "status": "allowed_warning", "surpassedThreshold": 0.9}}}
OVERAGE_INFO = {"status": "rejected", "resetsAt": 1795951600, "rateLimitType": "five_hour",
                "overageStatus": "allowed", "overageResetsAt": 1796467088, "isUsingOverage": True,
                "overageInUse": True}


def test_limit_state_without_a_reset_time_is_no_state():
    assert cmp.limit_state_from({"status": "rejected", "isUsingOverage": False}, NOW) is None
    assert cmp.limit_state_from(None, NOW) is None


def test_warning_state_becomes_anthropics_unified_headers():
    state = cmp.limit_state_from(WARNING_INFO, NOW)
    assert (state["status"], state["window"], state["utilization"]) == ("allowed_warning", "five_hour", 0.92)
    headers = cmp.ratelimit_headers_for(state)
    assert headers == {
        "anthropic-ratelimit-unified-status": "allowed_warning",
        "anthropic-ratelimit-unified-reset": "1795951600",
        "anthropic-ratelimit-unified-representative-claim": "five_hour",
        "anthropic-ratelimit-unified-overage-status": "allowed",
        "anthropic-ratelimit-unified-overage-in-use": "false",
        "anthropic-ratelimit-unified-5h-utilization": "0.92",
        "anthropic-ratelimit-unified-5h-reset": "1795951600",
        "anthropic-ratelimit-unified-5h-status": "allowed_warning",
        "anthropic-ratelimit-unified-5h-surpassed-threshold": "0.9",
    }
    assert cmp.ratelimit_headers_for(None) == {}


def test_overage_state_headers_and_gauges():
    state = cmp.limit_state_from(OVERAGE_INFO, NOW)
    headers = cmp.ratelimit_headers_for(state)
    assert headers["anthropic-ratelimit-unified-overage-in-use"] == "true"
    assert headers["anthropic-ratelimit-unified-overage-reset"] == "1796467088"
    gauges = cmp.limit_samples(state)
    assert gauges["claude_max_proxy_overage_in_use"] == [({}, 1)]
    assert gauges["claude_max_proxy_ratelimit_status"] == [({"status": "rejected", "window": "five_hour"}, 1)]


@pytest.mark.parametrize("info, now, refused", [
    (OVERAGE_INFO, NOW, True),
    (dict(OVERAGE_INFO, isUsingOverage=False, overageInUse=False), NOW, True),  # would be used next
    (OVERAGE_INFO, 1795951600, False),  # the window has reset
    (WARNING_INFO, NOW, False),
    (LIMIT_INFO, NOW, False),  # limit reached without extra usage: the upstream says 429 itself
])
def test_no_overage_refuses_only_while_extra_usage_pays(info, now, refused):
    error = cmp.overage_refusal(cmp.limit_state_from(info, NOW), now)
    assert (error is not None) == refused
    if refused:
        assert (error.status, error.type, error.code) == (402, "billing_error", "extra_usage_refused")
        assert "2026-11-29T11:26:40Z" in error.message and "extra usage" in error.message
        assert error.headers == {"Retry-After": "3600"}


def test_limits_forget_a_state_once_its_window_resets():
    limits = cmp.Limits()
    limits.record({"status": "allowed"}, NOW)
    assert limits.current(NOW) is None
    limits.record(WARNING_INFO, NOW)
    assert limits.current(NOW)["status"] == "allowed_warning"
    limits.record({"status": "rejected", "isUsingOverage": False}, NOW)  # no reset time: kept as is
    assert limits.current(NOW)["status"] == "allowed_warning"
    assert limits.current(1795951600) is None


# ================================================================================================
# /metrics text, read back by Prometheus' own parser
# ================================================================================================

def test_metrics_text_is_read_back_by_the_prometheus_parser():
    parser = pytest.importorskip("prometheus_client.parser")
    metrics = cmp.Metrics()
    for status, seconds in (("200", 0.04), ("200", 3.0), ("429", 700.0)):
        metrics.count("claude_max_proxy_requests_total", {"endpoint": "/v1/chat/completions", "status": status})
        metrics.observe("claude_max_proxy_request_duration_seconds", {"endpoint": "/v1/chat/completions"}, seconds)
    metrics.count("claude_max_proxy_requests_total", {"endpoint": 'we"ird\\path\n', "status": "404"})
    samples = metrics.samples()
    samples.update(cmp.limit_samples(cmp.limit_state_from(WARNING_INFO, NOW)))
    families = {f.name: f for f in parser.text_string_to_metric_families(cmp.metrics_text(samples))}
    assert set(families) == {name[:-len("_total")] if name.endswith("_total") else name for name in cmp.METRICS}
    counts = {(s.labels["endpoint"], s.labels["status"]): s.value for s in families["claude_max_proxy_requests"].samples}
    assert counts == {("/v1/chat/completions", "200"): 2, ("/v1/chat/completions", "429"): 1,
                      ('we"ird\\path\n', "404"): 1}
    buckets = {s.labels["le"]: s.value for s in families["claude_max_proxy_request_duration_seconds"].samples
               if s.name.endswith("_bucket")}
    assert (buckets["0.05"], buckets["5.0"], buckets["600.0"], buckets["+Inf"]) == (1, 2, 2, 3)
    total = [s.value for s in families["claude_max_proxy_request_duration_seconds"].samples if s.name.endswith("_sum")]
    assert total == [pytest.approx(703.04)]
    assert [s.value for s in families["claude_max_proxy_ratelimit_utilization"].samples] == [0.92]


def test_readme_lists_every_metric_and_has_the_section_errors_link_to():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(path, encoding="utf-8") as handle:
        readme = handle.read()
    assert [name for name in cmp.METRICS if "| `%s` |" % name not in readme] == []
    assert "\n## Limits, extra usage and billing\n" in readme
    assert "(#limits-extra-usage-and-billing)" in cmp.EXTRA_USAGE_HINT


def test_endpoint_label_bounds_the_label_values():
    routes = ["/health", "/v1/models", "/v1/chat/completions"]
    assert cmp.endpoint_label("/v1/chat/completions", routes) == "/v1/chat/completions"
    assert cmp.endpoint_label("/v1/models/claude-opus-4", routes) == "/v1/models/{id}"
    assert cmp.endpoint_label("/anything/%s" % "x" * 50, routes) == "other"


@pytest.mark.parametrize("status", [429, None])
def test_usage_limit_reset_time_becomes_retry_after(status):
    # The CLI's subscription-limit message carries the reset epoch after a "|". It is a 429 with a
    # Retry-After whether or not the CLI also fills api_error_status.
    reset = int(time.time()) + 3600
    error = cmp.error_from_result(error_result(status, "Claude AI usage limit reached|%d" % reset))
    assert (error.status, error.type) == (429, "rate_limit_error")
    assert 3500 <= int(error.headers["Retry-After"]) <= 3600


def test_usage_limit_in_the_past_retries_after_at_least_one_second():
    error = cmp.error_from_result(error_result(429, "Claude AI usage limit reached|1500000000"))
    assert error.headers["Retry-After"] == "1"


def test_api_error_body_is_openais_envelope():
    error = cmp.ApiError(404, "nope", "invalid_request_error", "model_not_found", "model")
    assert error.body() == {"error": {"message": "nope", "type": "invalid_request_error",
                                      "param": "model", "code": "model_not_found"}}


@pytest.mark.parametrize("usage, expected", [
    ({}, (0, 0, 0, 0)),
    ({"input_tokens": 10, "output_tokens": 5}, (10, 5, 15, 0)),
    ({"input_tokens": 3, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20,
      "output_tokens": 7}, (123, 7, 130, 100)),
    ({"input_tokens": None, "cache_read_input_tokens": None, "output_tokens": None}, (0, 0, 0, 0)),
])
def test_usage_from(usage, expected):
    out = cmp.usage_from(usage)
    assert (out["prompt_tokens"], out["completion_tokens"], out["total_tokens"],
            out["prompt_tokens_details"]["cached_tokens"]) == expected
    assert out["completion_tokens_details"] == {"reasoning_tokens": 0}


# ================================================================================================
# TurnTranslator
# ================================================================================================

def test_streamed_turn_becomes_text_then_one_finish():
    translator, out = translate(turn(["Hello ", "from ", "the ", "fake ", "CLI."], output_tokens=5))
    assert [e[0] for e in out] == ["text"] * 5 + ["finish"]
    assert text_of(out) == "Hello from the fake CLI."
    _, reason, usage = out[-1]
    assert reason == "stop"
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (12, 5)
    assert translator.model == MODEL and translator.finished


@pytest.mark.parametrize("stop_reason, finish", [
    ("end_turn", "stop"), ("max_tokens", "length"), ("stop_sequence", "stop"),
    ("refusal", "content_filter"), ("something_new", "stop"),
])
def test_stop_reason_maps_to_finish_reason(stop_reason, finish):
    _, out = translate(turn(["This ", "answer ", "is ", "cut"], stop_reason=stop_reason))
    assert finishes_of(out) == [("finish", finish, finishes_of(out)[0][2])]
    assert text_of(out) == "This answer is cut"


def test_turn_ends_at_message_stop_before_the_result():
    translator = cmp.TurnTranslator()
    events = turn(["a", "b"])
    out = []
    for event in events[:-1]:
        out += translator.feed(event)
    assert finishes_of(out) and translator.finished
    assert translator.feed(events[-1]) == []


def test_cache_tokens_count_as_prompt_tokens():
    events = [message_start(input_tokens=4, cache_read=90, cache_creation=6), text_delta("x"),
              message_delta("end_turn", 2), message_stop()]
    _, out = translate(events)
    usage = finishes_of(out)[0][2]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (100, 2, 102)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 90


def test_message_stop_without_stop_reason_waits_for_the_result():
    events = [message_start(), text_delta("hi"), message_stop()]
    translator, out = translate(events)
    assert out == [("text", "hi")] and not translator.finished
    out = translator.feed(result_event("hi", "max_tokens"))
    assert [e[:2] for e in out] == [("finish", "length")]


@pytest.mark.parametrize("stop_reason, finish", [
    ("end_turn", "stop"), ("max_tokens", "length"), ("stop_sequence", "stop"),
    ("refusal", "content_filter"), ("pause_turn", "stop"), ("something_new", "stop"),
    ("tool_use", "stop"),  # no client tool was called (e.g. only the CLI's StructuredOutput)
])
def test_a_turn_ended_by_the_result_maps_its_stop_reason(stop_reason, finish):
    _, out = translate([init_event(), result_event("Whole answer", stop_reason)])
    assert kinds(out) == [("text", "Whole answer"), ("finish", finish)]


@pytest.mark.parametrize("stop", [(), ("zzz",), ("!",)])
def test_result_without_stream_events_uses_the_result_text(stop):
    usage = {"input_tokens": 7, "output_tokens": 2, "cache_read_input_tokens": 1}
    _, out = translate([init_event(), assistant_event("Whole answer"),
                        result_event("Whole answer", usage=usage)], stop)
    assert out[:-1] == [("text", "Whole answer")]
    assert out[-1][:2] == ("finish", "stop")
    assert (out[-1][2]["prompt_tokens"], out[-1][2]["completion_tokens"]) == (8, 2)


def test_result_without_stream_events_honours_stop_strings():
    _, out = translate([init_event(), result_event("one. two. three")], (". t",))
    assert text_of(out) == "one"
    assert [e[:2] for e in finishes_of(out)] == [("finish", "stop")]


def test_streamed_text_held_back_for_a_stop_string_is_not_repeated_by_the_result():
    # "ab" may begin the stop "abc", so it is held back; the result then repeats the same text.
    events = [message_start(), text_delta("ab"), message_stop(), result_event("ab")]
    _, out = translate(events, ("abc",))
    assert text_of(out) == "ab"
    assert len(finishes_of(out)) == 1


def local_command_result(text):
    """The CLI's result for a command it ran itself: no model call (num_turns 0, no stream)."""
    return dict(result_event(text, None), num_turns=0, total_cost_usd=0, modelUsage={},
                usage={"input_tokens": 0, "output_tokens": 0})


@pytest.mark.parametrize("stream", [False, True])
def test_a_local_command_result_is_an_error_not_an_answer(stream):
    # e.g. `/cost` run by the CLI: its output must never look like Claude's answer.
    assistant = assistant_event("Estimated cost: $0.0000")
    assistant["message"]["model"] = "<synthetic>"
    events = [init_event(), assistant, local_command_result("Estimated cost: $0.0000")]
    translator = cmp.TurnTranslator(call_for(user("/cost"), stream=stream))
    with pytest.raises(cmp.ApiError) as caught:
        for event in events:
            translator.feed(event)
    assert caught.value.status == 502 and caught.value.code == "cli_local_command"
    assert "Estimated cost" not in caught.value.message


def test_empty_result_gives_an_empty_answer():
    _, out = translate([init_event(), result_event("")])
    assert [e[:2] for e in out] == [("finish", "stop")]


@pytest.mark.parametrize("status, http_status", [(429, 429), (401, 401), (529, 503), (500, 502)])
def test_error_result_raises_the_mapped_api_error(status, http_status):
    translator = cmp.TurnTranslator()
    translator.feed(init_event())
    with pytest.raises(cmp.ApiError) as info:
        translator.feed(result_event("API Error: %d" % status, "stop_sequence", api_error_status=status))
    assert info.value.status == http_status
    assert translator.finished
    assert translator.feed(text_delta("late")) == []
    assert translator.feed(result_event("again")) == []


def test_error_after_partial_output_raises_after_the_text():
    translator = cmp.TurnTranslator()
    out = []
    for event in [init_event(), message_start(), block_start(), text_delta("Hello "), text_delta("from ")]:
        out += translator.feed(event)
    assert text_of(out) == "Hello from "
    with pytest.raises(cmp.ApiError) as info:
        translator.feed(result_event("API Error: 500", "stop_sequence", api_error_status=500))
    assert info.value.status == 502


@pytest.mark.parametrize("pieces, stop, expected", [
    (["Hello ", "world"], ("END",), "Hello world"),
    (["Hel", "lo EN", "D world"], ("END",), "Hello "),
    (["abc", "E"], ("END",), "abcE"),
    (["E", "N", "D"], ("END",), ""),
    (["x", "E", "N", "x"], ("END",), "xENx"),
    (["one\n", "\ntwo"], ("\n\n",), "one"),
    (["aXb", "Yc"], ("Y", "X"), "a"),
    (["a", "bYcX"], ("X", "Y"), "ab"),
    (["ab", "cd"], ("bcd", "c"), "ab"),
    (["abcd"], ("abcd", "bc"), "a"),
    (["abc", "d"], ("abcd", "bc"), "a"),
])
def test_stop_strings(pieces, stop, expected):
    _, out = translate(turn(pieces), stop)
    assert text_of(out) == expected
    assert len(finishes_of(out)) == 1 and finishes_of(out)[0][1] == "stop"


def test_events_after_a_stop_hit_produce_nothing():
    translator = cmp.TurnTranslator(stop=("STOP",))
    out = translator.feed(text_delta("before STOP after"))
    assert [e[:2] for e in out] == [("text", "before "), ("finish", "stop")]
    for event in [text_delta("more"), message_delta("end_turn"), message_stop(), result_event("x")]:
        assert translator.feed(event) == []


def test_non_text_events_are_ignored():
    events = [init_event(), {"type": "rate_limit_event"}, {"type": "user"}, {},
              stream_event({"type": "content_block_delta", "index": 0,
                            "delta": {"type": "thinking_delta", "thinking": "hmm"}}),
              stream_event({"type": "content_block_delta", "index": 0,
                            "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
              stream_event({"type": "ping"}), stream_event({})]
    translator, out = translate(events)
    assert out == [] and not translator.finished


pieces_strategy = st.text(alphabet="abc", max_size=24)
stops_strategy = st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=4)


@PROPERTY
@given(whole=pieces_strategy, cuts=st.lists(st.integers(0, 24), max_size=8),
       stops=stops_strategy, stop_reason=st.sampled_from(["end_turn", "max_tokens"]))
@example(whole="abcd", cuts=[], stops=["abcd", "bc"], stop_reason="end_turn")
@example(whole="abcd", cuts=[3], stops=["abcd", "bc"], stop_reason="end_turn")
def test_any_split_and_stops_cut_at_the_first_stop_with_exactly_one_finish(
        whole, cuts, stops, stop_reason):
    _, out = translate(turn(split(whole, cuts), stop_reason), stops)
    expected, hit = expected_stop_cut(whole, stops)
    assert text_of(out) == expected
    assert all(e[1] for e in out if e[0] == "text")
    assert len(finishes_of(out)) == 1 and out[-1][0] == "finish"
    assert out[-1][1] == ("stop" if hit else cmp.FINISH_REASONS[stop_reason])


@PROPERTY
@given(whole=pieces_strategy, cuts=st.lists(st.integers(0, 24), max_size=8), stops=stops_strategy)
@example(whole="abcd", cuts=[3], stops=["abcd", "bc"])
def test_stop_handling_does_not_depend_on_how_the_text_was_split(whole, cuts, stops):
    # Whatever rule picks among overlapping stops, the CLI's delta boundaries must not change it.
    _, one_piece = translate(turn([whole]), stops)
    _, pieces = translate(turn(split(whole, cuts)), stops)
    assert text_of(pieces) == text_of(one_piece)
    assert [e[:2] for e in finishes_of(pieces)] == [e[:2] for e in finishes_of(one_piece)]


@PROPERTY
@given(whole=st.text(max_size=40), cuts=st.lists(st.integers(0, 40), max_size=10))
def test_without_stops_every_delta_comes_through_unchanged(whole, cuts):
    pieces = split(whole, cuts)
    _, out = translate(turn(pieces))
    assert [e[1] for e in out if e[0] == "text"] == [p for p in pieces if p]
    assert len(finishes_of(out)) == 1


@PROPERTY
@given(whole=pieces_strategy, stops=stops_strategy)
def test_result_only_turn_cuts_like_a_streamed_one(whole, stops):
    _, out = translate([init_event(), result_event(whole)], stops)
    assert text_of(out) == expected_stop_cut(whole, stops)[0]
    assert len(finishes_of(out)) == 1


# ================================================================================================
# ChatChunks and completion_from
# ================================================================================================

def chunks_for_events(events, include_usage):
    chunks = cmp.ChatChunks("chatcmpl-1", 1700000000, "claude-sonnet-4", include_usage)
    return [chunk for event in events for chunk in chunks.chunks_for(event)]


def finish_event(reason="stop", usage=None):
    return ("finish", reason, usage or cmp.usage_from({"input_tokens": 5, "output_tokens": 2}))


def test_chunks_without_usage():
    chunks = chunks_for_events([("text", "Hel"), ("text", "lo"), finish_event()], False)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["", "Hel", "lo", None]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert chunks[-1]["choices"][0]["delta"] == {}
    for chunk in chunks:
        assert "usage" not in chunk
        assert (chunk["id"], chunk["object"], chunk["created"], chunk["model"]) == (
            "chatcmpl-1", "chat.completion.chunk", 1700000000, "claude-sonnet-4")
        assert chunk["choices"][0]["index"] == 0
        assert "role" not in chunk["choices"][0]["delta"] or chunk is chunks[0]
        json.dumps(chunk)


def test_chunks_with_usage_end_with_a_usage_only_chunk():
    usage = cmp.usage_from({"input_tokens": 5, "output_tokens": 2})
    chunks = chunks_for_events([("text", "Hi"), finish_event("length", usage)], True)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage
    assert chunks[-1]["object"] == "chat.completion.chunk"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, "length"]


def test_chunks_for_an_empty_answer():
    chunks = chunks_for_events([finish_event()], False)
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": ""}, {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


LEGACY_CALL = [("text", "Checking."), ("tool_call", 0, "toolu_1", "get_weather"), ("tool_args", 0, '{"city"'),
               ("tool_args", 0, ': "Oslo"}'), ("finish", "tool_calls", cmp.usage_from({}))]


def test_legacy_functions_get_a_legacy_answer_whole_and_streamed():
    whole = cmp.completion_from(LEGACY_CALL, "c", 1, "m", legacy_functions=True)
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Checking.", "refusal": None,
                                              "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    assert whole["choices"][0]["finish_reason"] == "function_call"
    chunks = cmp.ChatChunks("c", 1, "m", False, legacy_functions=True)
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"])
              for event in LEGACY_CALL for c in chunks.chunks_for(event)]
    assert deltas == [({"role": "assistant", "content": ""}, None), ({"content": "Checking."}, None),
                      ({"function_call": {"name": "get_weather", "arguments": ""}}, None),
                      ({"function_call": {"arguments": '{"city"'}}, None),
                      ({"function_call": {"arguments": ': "Oslo"}'}}, None), ({}, "function_call")]


@pytest.mark.parametrize("body,legacy,parallel", [
    ({"functions": [WEATHER["function"]]}, True, False),
    ({"tools": [WEATHER]}, False, True),
    ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, False, True),
])
def test_a_functions_request_is_a_legacy_call_that_ends_at_its_first_call(body, legacy, parallel):
    call = cmp.cli_call_for(dict(body, messages=[{"role": "user", "content": "hi"}]), config())
    assert (call.legacy_functions, call.parallel_tool_calls) == (legacy, parallel)


def test_completion_from():
    usage = cmp.usage_from({"input_tokens": 5, "output_tokens": 2})
    completion = cmp.completion_from([("text", "a"), ("text", "b"), ("finish", "length", usage)],
                                     "chatcmpl-9", 123, "claude-opus-4")
    assert completion == {
        "id": "chatcmpl-9", "object": "chat.completion", "created": 123, "model": "claude-opus-4",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ab", "refusal": None},
                     "logprobs": None, "finish_reason": "length"}],
        "usage": usage}


def test_completion_from_without_a_finish_event():
    completion = cmp.completion_from([("text", "x")], "c", 1, "m")
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"]["total_tokens"] == 0


@PROPERTY
@given(whole=st.text(alphabet="ab c\n", max_size=30), cuts=st.lists(st.integers(0, 30), max_size=8),
       stops=st.lists(st.text(alphabet="ab c\n", min_size=1, max_size=3), max_size=2),
       stop_reason=st.sampled_from(["end_turn", "max_tokens"]), include_usage=st.booleans())
def test_streamed_chunks_concatenate_to_the_completion(whole, cuts, stops, stop_reason, include_usage):
    _, events = translate(turn(split(whole, cuts), stop_reason), stops)
    chunks = chunks_for_events(events, include_usage)
    completion = cmp.completion_from(events, "chatcmpl-1", 1700000000, "claude-sonnet-4")
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(c["delta"].get("content") or "" for c in choices) == \
        completion["choices"][0]["message"]["content"]
    assert choices[0]["delta"]["role"] == "assistant"
    assert all("role" not in c["delta"] for c in choices[1:])
    finish = [c["finish_reason"] for c in choices if c["finish_reason"] is not None]
    assert finish == [completion["choices"][0]["finish_reason"]]
    assert choices[-1]["finish_reason"] is not None
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == completion["usage"]
        assert all(c["usage"] is None for c in chunks[:-1])
    else:
        assert all("usage" not in c for c in chunks)
    for chunk in chunks:
        json.loads(json.dumps(chunk))


# ================================================================================================
# TurnTranslator with a CliCall: tool calls, structured output, reasoning
# ================================================================================================

def streamed_tool_calls(chunks):
    """The tool calls a client rebuilds from the deltas, the way the OpenAI SDKs do it."""
    calls = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            for delta in choice["delta"].get("tool_calls") or []:
                entry = calls.setdefault(delta["index"], {"id": None, "name": None, "arguments": ""})
                entry["id"] = delta.get("id", entry["id"])
                function = delta.get("function") or {}
                entry["name"] = function.get("name", entry["name"])
                entry["arguments"] += function.get("arguments") or ""
    assert sorted(calls) == list(range(len(calls)))
    return [calls[n] for n in sorted(calls)]


def finish_reasons(chunks):
    return [c["choices"][0]["finish_reason"] for c in chunks
            if c["choices"] and c["choices"][0]["finish_reason"] is not None]


def streamed_text(chunks, field="content"):
    return "".join(c["choices"][0]["delta"].get(field) or "" for c in chunks if c["choices"])


WEATHER_CALL = ("tool", "toolu_1", upstream("get_weather"), ['{"city": ', '"Paris"}'])


def test_a_tool_call_reaches_the_client_with_its_id_name_and_arguments():
    translator, out = translate(message_turn([("text", ["Let me ", "check."]), WEATHER_CALL]),
                                call=tools_call())
    assert kinds(out) == [("text", "Let me "), ("text", "check."),
                          ("tool_call", 0, "toolu_1", "get_weather"),
                          ("tool_args", 0, '{"city": '), ("tool_args", 0, '"Paris"}'),
                          ("finish", "tool_calls")]
    assert translator.finished
    for include_usage in (False, True):
        chunks = chunks_for_events(out, include_usage)
        assert streamed_tool_calls(chunks) == [
            {"id": "tooluxu1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]
        assert finish_reasons(chunks) == ["tool_calls"]
        assert streamed_text(chunks) == "Let me check."


def test_parallel_tool_calls_keep_their_order_and_indexes():
    events = message_turn([("text", ["Checking."]), WEATHER_CALL,
                           ("tool", "toolu_2", upstream("get_time"), ["{}"]),
                           ("tool", "toolu_3", upstream(LONG_NAME), ['{"q": ', '"t"}'])])
    _, out = translate(events, call=tools_call())
    assert [e for e in out if e[0] == "tool_call"] == [
        ("tool_call", 0, "toolu_1", "get_weather"), ("tool_call", 1, "toolu_2", "get_time"),
        ("tool_call", 2, "toolu_3", LONG_NAME)]
    chunks = chunks_for_events(out, False)
    assert streamed_tool_calls(chunks) == [
        {"id": "tooluxu1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"id": "tooluxu2", "name": "get_time", "arguments": "{}"},
        {"id": "tooluxu3", "name": LONG_NAME, "arguments": '{"q": "t"}'}]
    assert finish_reasons(chunks) == ["tool_calls"]
    message = cmp.completion_from(out, "c", 1, "m")["choices"][0]["message"]
    assert [c["id"] for c in message["tool_calls"]] == ["tooluxu1", "tooluxu2", "tooluxu3"]


ARGUMENT_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


@PROPERTY
@given(arguments=st.lists(st.dictionaries(st.text(max_size=5), ARGUMENT_VALUES, max_size=3),
                          min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 80), max_size=8), include_usage=st.booleans())
def test_streamed_arguments_concatenate_to_valid_json_however_they_are_split(arguments, cuts, include_usage):
    names = ["get_weather", "get_time", LONG_NAME]
    blocks = [("tool", "toolu_%d" % n, upstream(names[n]), split(json.dumps(a), cuts))
              for n, a in enumerate(arguments)]
    _, out = translate(message_turn(blocks), call=tools_call())
    chunks = chunks_for_events(out, include_usage)
    calls = streamed_tool_calls(chunks)
    assert [json.loads(c["arguments"]) for c in calls] == arguments
    assert [(c["id"], c["name"]) for c in calls] == [("tooluxu%d" % n, names[n]) for n in range(len(arguments))]
    assert finish_reasons(chunks) == ["tool_calls"]
    completion = cmp.completion_from(out, "c", 1, "m")
    assert completion["choices"][0]["message"]["tool_calls"] == [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls]
    assert completion["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("fragments", [[], [""], ["", ""]],
                         ids=["no fragment", "the empty opening fragment", "empty fragments"])
def test_a_tool_call_without_argument_fragments_gets_an_empty_object(fragments):
    # The Messages API opens every tool input with partial_json "", and a tool called without
    # arguments gets nothing more: the client must still receive parseable arguments.
    events = ([init_event(), message_start(), tool_start(0, "toolu_1", upstream("get_time"))]
              + [json_delta(0, f) for f in fragments]
              + [block_stop(0), message_delta("tool_use"), message_stop()])
    _, out = translate(events, call=tools_call())
    assert streamed_tool_calls(chunks_for_events(out, False)) == [
        {"id": "tooluxu1", "name": "get_time", "arguments": "{}"}]
    message = cmp.completion_from(out, "c", 1, "m")["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize("name", ["Read", "get_weather", "mcp__other__get_weather",
                                  cmp.MCP_PREFIX + "unknown", cmp.STRUCTURED_OUTPUT_TOOL])
def test_a_call_of_anything_but_a_client_tool_is_not_passed_on(name):
    events = message_turn([("text", ["Hm."]), ("tool", "toolu_9", name, ['{"a": 1}'])])
    _, out = translate(events, call=tools_call())
    assert kinds(out) == [("text", "Hm."), ("finish", "stop")]


def test_without_a_call_no_tool_is_a_client_tool():
    _, out = translate(message_turn([WEATHER_CALL]))
    assert kinds(out) == [("finish", "stop")]


def test_parallel_tool_calls_false_ends_the_turn_at_the_first_calls_end():
    events = message_turn([("text", ["Both."]), WEATHER_CALL,
                           ("tool", "toolu_2", upstream("get_time"), ["{}"])])
    translator = cmp.TurnTranslator(call=tools_call(parallel_tool_calls=False))
    out, consumed = [], 0
    while not translator.finished:
        out += translator.feed(events[consumed])
        consumed += 1
    assert events[consumed - 1] == block_stop(1)  # the first tool block's end, not message_stop
    assert kinds(out) == [("text", "Both."), ("tool_call", 0, "toolu_1", "get_weather"),
                          ("tool_args", 0, '{"city": '), ("tool_args", 0, '"Paris"}'),
                          ("finish", "tool_calls")]
    assert all(translator.feed(event) == [] for event in events[consumed:])


def json_call(fmt=None, **params):
    fmt = fmt or {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
    return call_for(user("Answer in JSON."), response_format=fmt, **params)


@pytest.mark.parametrize("fmt", [None, {"type": "json_object"}])
def test_json_mode_answer_is_the_structured_output_arguments(fmt):
    events = message_turn([("text", ["Here is ", "the answer:"]),
                           ("tool", "toolu_s", cmp.STRUCTURED_OUTPUT_TOOL, ['{"answer"', ': 42}'])])
    _, out = translate(events, call=json_call(fmt))
    assert kinds(out) == [("text", '{"answer"'), ("text", ": 42}"), ("finish", "stop")]
    completion = cmp.completion_from(out, "c", 1, "m")
    message = completion["choices"][0]["message"]
    assert json.loads(message["content"]) == {"answer": 42} and "tool_calls" not in message
    chunks = chunks_for_events(out, False)
    assert streamed_text(chunks) == '{"answer": 42}' and streamed_tool_calls(chunks) == []
    assert finish_reasons(chunks) == ["stop"]


def test_json_mode_without_a_structured_output_call_answers_with_the_held_text():
    events = message_turn([("text", ['{"answer"', ": 42}"])], stop_reason="end_turn")
    translator = cmp.TurnTranslator(call=json_call())
    held = [e for event in events[:-2] for e in translator.feed(event)]
    assert held == []  # nothing is sent before it is known not to precede a structured answer
    out = [e for event in events[-2:] for e in translator.feed(event)]
    assert kinds(out) == [("text", '{"answer": 42}'), ("finish", "stop")]


def test_json_mode_structured_output_from_the_result_alone():
    result = dict(result_event("Done."), structured_output={"answer": 42})
    _, out = translate([init_event(), result], call=json_call())
    assert json.loads(text_of(out)) == {"answer": 42}
    assert [e[:2] for e in finishes_of(out)] == [("finish", "stop")]


def test_json_mode_still_passes_client_tool_calls_on():
    events = message_turn([WEATHER_CALL])
    _, out = translate(events, call=json_call(tools=TOOLS))
    assert kinds(out) == [("tool_call", 0, "toolu_1", "get_weather"), ("tool_args", 0, '{"city": '),
                          ("tool_args", 0, '"Paris"}'), ("finish", "tool_calls")]


@pytest.mark.parametrize("include_reasoning", [True, False])
def test_thinking_reaches_the_client_only_when_asked(include_reasoning):
    events = message_turn([("thinking", ["Let me ", "think."]), ("text", ["Done."])], stop_reason="end_turn")
    _, out = translate(events, call=call_for(user("hi"), include_reasoning=include_reasoning))
    reasoning = [("reasoning", "Let me "), ("reasoning", "think."), ("signature", "c2lnbmF0dXJl")] \
        if include_reasoning else []
    assert kinds(out) == reasoning + [("text", "Done."), ("finish", "stop")]
    chunks = chunks_for_events(out, False)
    assert streamed_text(chunks, "reasoning_content") == ("Let me think." if include_reasoning else "")
    assert streamed_text(chunks) == "Done."
    message = cmp.completion_from(out, "c", 1, "m")["choices"][0]["message"]
    assert message.get("reasoning_content") == ("Let me think." if include_reasoning else None)
    assert message["content"] == "Done."


def test_a_translator_with_a_call_uses_the_calls_stop_strings():
    _, out = translate(turn(["one END two"]), call=call_for(user("hi"), stop="END"))
    assert text_of(out) == "one " and [e[:2] for e in finishes_of(out)] == [("finish", "stop")]


def test_events_of_a_subagent_are_not_the_answer():
    inner = [dict(e, parent_tool_use_id="toolu_x") for e in message_turn([WEATHER_CALL])]
    translator, out = translate(inner, call=tools_call())
    assert out == [] and not translator.finished


# ================================================================================================
# ChatChunks, tool_calls_from, completion_from and assistant_turn_from with tools and reasoning
# ================================================================================================

def test_chunks_for_tool_calls_and_reasoning():
    events = [("reasoning", "hm"), ("tool_call", 0, "toolu_1", "get_weather"),
              ("tool_args", 0, '{"city": "Paris"}'), ("tool_call", 1, "toolu_2", "get_time"),
              ("tool_args", 1, "{}"), finish_event("tool_calls")]
    chunks = chunks_for_events(events, False)
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "hm"},
        {"tool_calls": [{"index": 0, "id": "tooluxu1", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]},
        {"tool_calls": [{"index": 1, "id": "tooluxu2", "type": "function",
                         "function": {"name": "get_time", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 6 + ["tool_calls"]


def test_tool_calls_from_joins_fragments_in_call_order():
    events = [("text", "t"), ("tool_call", 0, "a", "f"), ("tool_call", 1, "b", "g"),
              ("tool_args", 1, '{"y"'), ("tool_args", 0, '{"x": 1}'), ("tool_args", 1, ": 2}"),
              ("tool_args", 7, "stray"), finish_event("tool_calls")]
    assert cmp.tool_calls_from(events) == [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": '{"y": 2}'}}]
    assert cmp.tool_calls_from([("text", "x"), finish_event()]) == []


TIME_CALL_EVENTS = [("tool_call", 0, "toolu_1", "get_time"), ("tool_args", 0, "{}")]


@pytest.mark.parametrize("events, content, reasoning", [
    ([("text", "hi")], "hi", None),
    ([], "", None),
    (TIME_CALL_EVENTS, None, None),
    ([("text", "Let me check.")] + TIME_CALL_EVENTS, "Let me check.", None),
    ([("reasoning", "h"), ("reasoning", "m"), ("text", "hi")], "hi", "hm"),
    ([("reasoning", "h")] + TIME_CALL_EVENTS, None, "h"),
])
def test_completion_from_with_tool_calls_and_reasoning(events, content, reasoning):
    calls = any(e[0] == "tool_call" for e in events)
    completion = cmp.completion_from(events + [finish_event("tool_calls" if calls else "stop")], "c", 1, "m")
    message = completion["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"] == content
    assert message.get("reasoning_content") == reasoning
    assert ("tool_calls" in message) == calls
    if calls:
        assert message["tool_calls"] == [
            {"id": "tooluxu1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
    assert completion["choices"][0]["finish_reason"] == ("tool_calls" if calls else "stop")


def test_the_openai_sdk_accepts_tool_call_chunks_and_completions():
    pytest.importorskip("openai")
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    events = message_turn([("thinking", ["Hm."]), ("text", ["Let me check."]), WEATHER_CALL,
                           ("tool", "toolu_2", upstream("get_time"), ["{}"])])
    _, out = translate(events, call=tools_call(include_reasoning=True))
    completion = cmp.completion_from(out, "chatcmpl-1", 1700000000, "claude-sonnet-4")
    parsed = ChatCompletion.model_validate(completion)
    state = ChatCompletionStreamState()
    for chunk in chunks_for_events(out, True):
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    final = state.get_final_completion()
    for choice in (parsed.choices[0], final.choices[0]):
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Let me check."
        assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
            ("tooluxu1", "get_weather", {"city": "Paris"}), ("tooluxu2", "get_time", {})]
    assert final.usage.total_tokens == completion["usage"]["total_tokens"]


def test_assistant_turn_from_a_tool_call_turn():
    call = tools_call()
    events = message_turn([("text", ["Let me check."]), WEATHER_CALL,
                           ("tool", "toolu_2", upstream(LONG_NAME), ['{"q": "t"}'])])
    _, out = translate(events, call=call)
    assert cmp.assistant_turn_from(out, call) == {"role": "assistant", "content": [
        text("Let me check."), tool_use("toolu_1", "get_weather", {"city": "Paris"}),
        tool_use("toolu_2", LONG_NAME, {"q": "t"})]}


def test_assistant_turn_from_a_text_answer():
    _, out = translate(turn(["Hello"]))
    assert cmp.assistant_turn_from(out, call_for(user("hi"))) == {"role": "assistant", "content": [text("Hello")]}


# ================================================================================================
# conversation_key: a follow-up with tool results finds the process that made the calls
# ================================================================================================

@pytest.mark.parametrize("before, resend", [
    (["Let me check."], "completion"), ([], "completion"), (["Let me check."], "stream"), ([], "stream"),
])
def test_a_follow_up_with_tool_results_matches_the_parked_conversation(before, resend):
    question = [system("S"), user("Weather in Paris, and the time?")]
    first = tools_call(*question)
    blocks = ([("text", before)] if before else []) + [
        WEATHER_CALL, ("tool", "toolu_2", upstream(LONG_NAME), ['{"q": "t"}'])]
    _, out = translate(message_turn(blocks), call=first)
    if resend == "completion":
        message = cmp.completion_from(out, "c", 1, "m")["choices"][0]["message"]
        sent = {"role": "assistant", "content": message["content"], "tool_calls": message["tool_calls"]}
    else:  # what a streaming client puts together from the chunks
        chunks = chunks_for_events(out, False)
        sent = {"role": "assistant", "content": streamed_text(chunks), "tool_calls": [
            tool_call(c["id"], c["name"], c["arguments"]) for c in streamed_tool_calls(chunks)]}
    follow_up = tools_call(*(question + [sent, tool_message("toolu_1", "18C"), tool_message("toolu_2", "found")]),
                           stream=True)
    parked = first.history + [{"role": "user", "content": first.prompt}, cmp.assistant_turn_from(out, first)]
    assert follow_up.history == parked
    assert cmp.conversation_key(follow_up, follow_up.history) == cmp.conversation_key(first, parked)
    assert cmp.tool_results_in(follow_up.prompt) == {"toolu_1": "18C", "toolu_2": "found"}


KEY_MESSAGES = [system("S"), user("q"), assistant("a"), user("q2")]


def key_of(messages=None, **params):
    call = call_for(*(messages or KEY_MESSAGES), **dict({"tools": TOOLS}, **params))
    return cmp.conversation_key(call, call.history)


def test_conversation_key_is_equal_for_equal_requests():
    assert key_of() == key_of() and isinstance(key_of(), str)


@pytest.mark.parametrize("messages, params", [
    (None, {"model": "opus"}),
    ([system("T")] + KEY_MESSAGES[1:], {}),
    (None, {"tool_choice": "required"}),
    (None, {"tools": TOOLS[:2]}),
    (None, {"tools": [CLOCK, WEATHER, LONG]}),
    (None, {"tools": [function_tool("get_weather", WEATHER_SCHEMA, "Other words"), CLOCK, LONG]}),
    (None, {"tools": [function_tool("get_weather", {"type": "object"}, "Current weather in a city"), CLOCK, LONG]}),
    (None, {"response_format": {"type": "json_object"}}),
    (None, {"reasoning_effort": "high"}),
    (None, {"max_tokens": 10}),
    (None, {"max_completion_tokens": 10}),
    ([system("S"), user("q"), assistant("b"), user("q2")], {}),
    ([system("S"), user("q0"), assistant("a"), user("q2")], {}),
    ([system("S"), user("q"), assistant_calls("a", tool_call("c1", "get_time", "{}")),
      tool_message("c1", "noon"), user("q2")], {}),
])
def test_conversation_key_differs_when_anything_the_process_fixed_differs(messages, params):
    assert key_of(messages, **params) != key_of()


@pytest.mark.parametrize("params", [
    {"stream": True}, {"stream": True, "stream_options": {"include_usage": True}},
    {"temperature": 0.2}, {"stop": "END"}, {"user": "someone"}, {"tool_choice": "auto"},
])
def test_conversation_key_ignores_what_the_process_did_not_fix(params):
    assert key_of(**params) == key_of()


def test_conversation_key_covers_the_turns_given():
    call = call_for(*KEY_MESSAGES, tools=TOOLS)
    longer = call.history + [{"role": "user", "content": call.prompt}, {"role": "assistant", "content": [text("x")]}]
    assert cmp.conversation_key(call, call.history) != cmp.conversation_key(call, longer)


# ================================================================================================
# mcp_reply_for: the proxy's MCP server
# ================================================================================================

MCP_TOOLS = cmp.tools_of({"tools": TOOLS})


def rpc(method, message_id=1, **params):
    message = {"jsonrpc": "2.0", "method": method}
    if message_id is not None:
        message["id"] = message_id
    if params:
        message["params"] = params
    return message


@pytest.mark.parametrize("message_id", [0, 1, "req-7"])
def test_mcp_initialize_echoes_the_protocol_version(message_id):
    message = rpc("initialize", message_id, protocolVersion="2025-03-26", capabilities={},
                  clientInfo={"name": "claude-code", "version": "2.1.0"})
    assert cmp.mcp_reply_for(message, MCP_TOOLS) == {"jsonrpc": "2.0", "id": message_id, "result": {
        "protocolVersion": "2025-03-26", "capabilities": {"tools": {}},
        "serverInfo": {"name": "claude-max-proxy", "version": cmp.__version__}}}


def test_mcp_initialize_without_a_version_offers_one():
    result = cmp.mcp_reply_for(rpc("initialize"), MCP_TOOLS)["result"]
    assert isinstance(result["protocolVersion"], str) and result["protocolVersion"]
    assert result["capabilities"] == {"tools": {}}


def test_mcp_tools_list_offers_the_client_tools_under_their_mcp_names():
    reply = cmp.mcp_reply_for(rpc("tools/list", 2), MCP_TOOLS)
    assert (reply["jsonrpc"], reply["id"]) == ("2.0", 2) and "error" not in reply
    listed = reply["result"]["tools"]
    assert [t["name"] for t in listed] == ["get_weather", "get_time", cmp.mcp_name_for(LONG_NAME)]
    assert listed[0] == {"name": "get_weather", "description": "Current weather in a city",
                         "inputSchema": WEATHER_SCHEMA}
    assert listed[2]["inputSchema"] == LONG["function"]["parameters"]
    assert all(len(cmp.MCP_PREFIX + t["name"]) <= 64 for t in listed)
    json.dumps(reply)
    assert cmp.mcp_reply_for(rpc("tools/list", 3), ())["result"] == {"tools": []}


def test_mcp_ping():
    assert cmp.mcp_reply_for(rpc("ping", "p"), MCP_TOOLS) == {"jsonrpc": "2.0", "id": "p", "result": {}}


@pytest.mark.parametrize("method", ["resources/list", "prompts/list", "nonsense", None])
def test_mcp_unknown_methods_are_method_not_found(method):
    reply = cmp.mcp_reply_for(rpc(method, 9), MCP_TOOLS)
    assert reply["id"] == 9 and "result" not in reply
    assert reply["error"]["code"] == -32601 and reply["error"]["message"]


@pytest.mark.parametrize("method", ["notifications/initialized", "notifications/cancelled", "tools/list"])
def test_mcp_notifications_are_acknowledged_without_an_id(method):
    reply = cmp.mcp_reply_for(rpc(method, None), MCP_TOOLS)
    assert reply == {"jsonrpc": "2.0", "result": {}}


# ================================================================================================
# config_from
# ================================================================================================

def parsed(*flags):
    return vars(cmp.parser_for().parse_args(list(flags)))


def test_config_defaults():
    cfg = cmp.config_from(parsed(), {})
    assert (cfg.host, cfg.port, cfg.default_model, cfg.api_keys) == (
        "127.0.0.1", cmp.DEFAULT_PORT, "claude-sonnet-4", ())
    assert cfg.workdir and cfg.allow_unauthenticated_remote is False


def test_every_option_has_a_matching_env_var_and_field():
    fields = {f.name for f in dataclasses.fields(cmp.Config)}
    for flag, _, _ in cmp.OPTIONS:
        snake = flag[2:].replace("-", "_")
        assert cmp.env_name(flag) == "CLAUDE_MAX_PROXY_" + snake.upper()
        assert snake in fields or snake in ("api_key", "api_key_file")


@pytest.mark.parametrize("env, field, value", [
    ({"CLAUDE_MAX_PROXY_PORT": "8080"}, "port", 8080),
    ({"CLAUDE_MAX_PROXY_MAX_CONCURRENCY": "9"}, "max_concurrency", 9),
    ({"CLAUDE_MAX_PROXY_REQUEST_TIMEOUT": "12.5"}, "request_timeout", 12.5),
    ({"CLAUDE_MAX_PROXY_DEFAULT_MODEL": "claude-opus-4"}, "default_model", "claude-opus-4"),
    ({"CLAUDE_MAX_PROXY_CLAUDE": "/opt/claude"}, "claude", "/opt/claude"),
    ({"CLAUDE_MAX_PROXY_WORKDIR": "/srv/cwd"}, "workdir", "/srv/cwd"),
    ({"CLAUDE_MAX_PROXY_ALLOWED_HOSTS": "a.lan, b.lan,"}, "allowed_hosts", ("a.lan", "b.lan")),
    ({"CLAUDE_MAX_PROXY_ALLOWED_ORIGINS": "http://x:1"}, "allowed_origins", ("http://x:1",)),
    ({"CLAUDE_MAX_PROXY_API_KEY": "k1, k2"}, "api_keys", ("k1", "k2")),
    ({"CLAUDE_MAX_PROXY_LOG_PROMPTS": "1"}, "log_prompts", True),
    ({"CLAUDE_MAX_PROXY_LOG_PROMPTS": "true"}, "log_prompts", True),
    ({"CLAUDE_MAX_PROXY_LOG_PROMPTS": "Yes"}, "log_prompts", True),
    ({"CLAUDE_MAX_PROXY_LOG_PROMPTS": "on"}, "log_prompts", True),
    ({"CLAUDE_MAX_PROXY_LOG_PROMPTS": "0"}, "log_prompts", False),
    ({"CLAUDE_MAX_PROXY_LOG_PROMPTS": "false"}, "log_prompts", False),
    ({"MAX_CONCURRENCY": "9"}, "max_concurrency", 4),
])
def test_env_vars_set_config(env, field, value):
    assert getattr(cmp.config_from(parsed(), env), field) == value


@pytest.mark.parametrize("flags, env, field, value", [
    (["--port", "1111"], {"CLAUDE_MAX_PROXY_PORT": "2222"}, "port", 1111),
    (["--default-model", "opus"], {"CLAUDE_MAX_PROXY_DEFAULT_MODEL": "haiku"}, "default_model", "opus"),
    (["--max-queue", "3"], {"CLAUDE_MAX_PROXY_MAX_QUEUE": "not-a-number"}, "max_queue", 3),
    (["--log-prompts"], {"CLAUDE_MAX_PROXY_LOG_PROMPTS": "0"}, "log_prompts", True),
    (["--api-key", "flag-key"], {"CLAUDE_MAX_PROXY_API_KEY": "env-key"}, "api_keys", ("flag-key",)),
])
def test_flags_beat_env_vars(flags, env, field, value):
    assert getattr(cmp.config_from(parsed(*flags), env), field) == value


@pytest.mark.parametrize("flags, env", [
    ([], {"CLAUDE_MAX_PROXY_PORT": "eighty"}),
    ([], {"CLAUDE_MAX_PROXY_IDLE_TIMEOUT": "soon"}),
    (["--port", "70000"], {}),
    (["--port", "-1"], {}),
    (["--request-timeout", "0"], {}),
    (["--idle-timeout", "-1"], {}),
    (["--max-concurrency", "0"], {}),
    (["--max-body-bytes", "0"], {}),
    (["--max-messages", "0"], {}),
])
def test_bad_values_are_config_errors(flags, env):
    with pytest.raises(cmp.ConfigError):
        cmp.config_from(parsed(*flags), env)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.com", ""])
def test_non_loopback_host_needs_an_api_key(host):
    with pytest.raises(cmp.ConfigError) as info:
        cmp.config_from(parsed("--host", host), {})
    assert "API key" in str(info.value)
    assert cmp.config_from(parsed("--host", host, "--api-key", "k"), {}).api_keys == ("k",)
    assert cmp.config_from(parsed("--host", host, "--allow-unauthenticated-remote"), {}).host == host
    env = {"CLAUDE_MAX_PROXY_HOST": host, "CLAUDE_MAX_PROXY_ALLOW_UNAUTHENTICATED_REMOTE": "1"}
    assert cmp.config_from(parsed(), env).allow_unauthenticated_remote is True


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "localhost", "LOCALHOST", "::1", "[::1]"])
def test_loopback_hosts_need_no_api_key(host):
    assert cmp.config_from(parsed("--host", host), {}).host == host


def test_api_key_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("  key-one \n\nkey-two\n   \n", encoding="utf-8")
    cfg = cmp.config_from(parsed("--api-key-file", str(path)), {})
    assert cfg.api_keys == ("key-one", "key-two")
    cfg = cmp.config_from(parsed("--api-key", "a,b", "--api-key-file", str(path)), {})
    assert cfg.api_keys == ("a", "b", "key-one", "key-two")
    cfg = cmp.config_from(parsed("--host", "0.0.0.0"), {"CLAUDE_MAX_PROXY_API_KEY_FILE": str(path)})
    assert cfg.api_keys == ("key-one", "key-two")


def test_unreadable_api_key_file_is_a_config_error(tmp_path):
    with pytest.raises(cmp.ConfigError):
        cmp.config_from(parsed("--api-key-file", str(tmp_path / "missing")), {})


@pytest.mark.parametrize("environ, base", [
    ({"XDG_RUNTIME_DIR": "/run/user/7", "HOME": "/home/alice"}, "/run/user/7"),
    ({"XDG_RUNTIME_DIR": "relative", "HOME": "/home/alice"}, tempfile.gettempdir()),
    ({"HOME": "/home/alice", "XDG_CACHE_HOME": "/home/alice/.cache"}, tempfile.gettempdir()),
])
def test_default_workdir_is_outside_home(environ, base):
    # The CLI tells the model its working directory in every request: no user name in it.
    cfg = cmp.config_from(parsed(), environ)
    assert cfg.workdir == os.path.join(base, "claude-max-proxy-cwd-%d" % os.getuid())
    assert "alice" not in cfg.workdir


def test_a_workdir_others_can_write_to_is_refused(tmp_path):
    cmp.make_private_dir(str(tmp_path / "mine" / "cwd"))
    assert stat.S_IMODE(os.stat(str(tmp_path / "mine" / "cwd")).st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(OSError):
        cmp.make_private_dir(str(shared / "cwd"))
    (tmp_path / "open").mkdir(mode=0o777)
    os.chmod(str(tmp_path / "open"), 0o777)
    with pytest.raises(OSError):
        cmp.make_private_dir(str(tmp_path / "open"))


def test_unknown_default_model_is_a_config_error():
    # "Validated once": otherwise every request without `model` would get a 404 naming a model
    # the client never sent.
    with pytest.raises(cmp.ConfigError):
        cmp.config_from(parsed("--default-model", "gpt-4o"), {})


def test_readme_tables_match_the_code():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(path, encoding="utf-8") as readme_file:
        readme = readme_file.read()
    assert cmp.readme_tables() in readme
    assert cmp.readme_completion_table() in readme
    assert cmp.COMPLETION_SYSTEM_PROMPT in readme and cmp.FILL_IN_THE_MIDDLE_SYSTEM_PROMPT in readme


# ---- /v1/completions -----------------------------------------------------------------------------

def completion_call(**body):
    return cmp.completion_call_for(dict({"model": "claude-haiku-4"}, **body), config())


@pytest.mark.parametrize("body,system,text", [
    ({"prompt": "Once upon"}, cmp.COMPLETION_SYSTEM_PROMPT, "Once upon"),
    ({"prompt": ["Once upon"]}, cmp.COMPLETION_SYSTEM_PROMPT, "Once upon"),
    ({"prompt": "system: Be brief.\nuser: hi\nassistant: "}, cmp.COMPLETION_SYSTEM_PROMPT,
     "system: Be brief.\nuser: hi\nassistant: "),
    ({"prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(1, 2))"}, cmp.FILL_IN_THE_MIDDLE_SYSTEM_PROMPT,
     "<prefix>def add(a, b):\n    </prefix><suffix>\n\nprint(add(1, 2))</suffix>"),
    ({"prompt": "x", "suffix": ""}, cmp.COMPLETION_SYSTEM_PROMPT, "x"),
    ({"prompt": "", "suffix": "tail"}, cmp.FILL_IN_THE_MIDDLE_SYSTEM_PROMPT, "<prefix></prefix><suffix>tail</suffix>"),
])
def test_a_completion_prompt_is_one_user_turn_under_a_completion_system_prompt(body, system, text):
    call = completion_call(**body)
    assert (call.system_prompt, call.prompt, call.history, call.tools) == (system, [{"type": "text", "text": text}], [], ())
    assert call.model == "haiku"


def test_continue_autocomplete_parameters_reach_the_call():
    call = completion_call(prompt="a", suffix="b", max_tokens=64, temperature=0.2, stop=["\n\n", "```"],
                           stream=True, stream_options={"include_usage": True}, echo=False, n=1, best_of=1)
    assert (call.max_output_tokens, call.stop, call.stream, call.include_usage) == (64, ("\n\n", "```"), True, True)


@pytest.mark.parametrize("body,param,code", [
    ({}, "prompt", "missing_required_parameter"),
    ({"prompt": [1, 2, 3]}, "prompt", "unsupported_value"),
    ({"prompt": [[1, 2]]}, "prompt", "unsupported_value"),
    ({"prompt": ["a", "b"]}, "prompt", "unsupported_value"),
    ({"prompt": 5}, "prompt", "invalid_type"),
    ({"prompt": ""}, "prompt", "invalid_value"),
    ({"prompt": "\ud800"}, "prompt", "invalid_value"),
    ({"prompt": "a", "suffix": 3}, "suffix", "invalid_type"),
    ({"prompt": "a", "echo": True}, "echo", "unsupported_value"),
    ({"prompt": "a", "best_of": 2}, "best_of", "unsupported_value"),
    ({"prompt": "a", "best_of": True}, "best_of", "unsupported_value"),
    ({"prompt": "a", "logprobs": 0}, "logprobs", "unsupported_value"),
    ({"prompt": "a", "n": 2}, "n", "unsupported_value"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"prompt": "a", "temperature": 3}, "temperature", "invalid_value"),
    ({"prompt": "a", "model": "gpt-3.5-turbo-instruct"}, "model", "model_not_found"),
])
def test_bad_completion_requests_name_their_param(body, param, code):
    with pytest.raises(cmp.ApiError) as info:
        completion_call(**body)
    assert (info.value.param, info.value.code) == (param, code)


def test_completion_objects_whole_and_streamed():
    usage = cmp.usage_from({"input_tokens": 5, "output_tokens": 2})
    events = [("text", "Hel"), ("text", "lo"), ("finish", "length", usage)]
    render = cmp.CompletionRenderer(completion_call(prompt="x", stream=True, stream_options={"include_usage": True}))
    whole = render.whole(events, "claude-haiku-4-5")
    assert whole["object"] == "text_completion" and whole["id"].startswith("cmpl-")
    assert whole["choices"] == [{"text": "Hello", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert whole["usage"] == usage and whole["model"] == "claude-haiku-4-5"
    chunks = [payload for event in events for _, payload in render.stream_events(event, "m")] + \
        [payload for _, payload in render.stream_end()]
    assert [c["choices"][0]["text"] for c in chunks[:3]] == ["Hel", "lo", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:3]] == [None, None, "length"]
    assert chunks[3]["choices"] == [] and chunks[3]["usage"] == usage and chunks[4] == "[DONE]"
    assert {c["object"] for c in chunks[:4]} == {"text_completion"} and len({c["id"] for c in chunks[:4]}) == 1


# ---- the official OpenAPI document ---------------------------------------------------------------

@pytest.fixture(scope="module")
def openapi():
    import openapi_check
    if openapi_check.spec() is None:
        pytest.skip("the OpenAI spec package is not installed (tests/run.sh installs it)")
    return openapi_check


SPEC_TURNS = [
    [("text", "Hel"), ("text", "lo"), finish_event()],
    [("reasoning", "Hmm."), ("text", "x"), finish_event("length")],
    [("text", "Checking."), ("tool_call", 0, "toolu_1", "get_weather"), ("tool_args", 0, "{}"),
     ("tool_call", 1, "toolu_2", "get_weather"), ("tool_args", 1, '{"city": "Oslo"}'), finish_event("tool_calls")],
    [finish_event("content_filter")],
]


@pytest.mark.parametrize("events", SPEC_TURNS)
@pytest.mark.parametrize("legacy_functions", [False, True])
@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_objects_and_chunks_conform_to_the_openai_spec(openapi, events, legacy_functions, include_usage):
    whole = cmp.completion_from(events, "chatcmpl-1", 1, "m", legacy_functions)
    chunks = cmp.ChatChunks("chatcmpl-1", 1, "m", include_usage, legacy_functions)
    failures = openapi.problems(whole, "CreateChatCompletionResponse", "completion")
    for event in events:
        for chunk in chunks.chunks_for(event):
            failures += openapi.problems(chunk, "CreateChatCompletionStreamResponse", "chunk")
    assert failures == []


@pytest.mark.parametrize("events", SPEC_TURNS[:2])
def test_text_completions_conform_to_the_openai_spec(openapi, events):
    render = cmp.CompletionRenderer(completion_call(prompt="x", stream=True, stream_options={"include_usage": True}))
    failures = openapi.problems(render.whole(events, "m"), "CreateCompletionResponse", "completion")
    for event in events:
        for _, chunk in render.stream_events(event, "m"):
            failures += openapi.problems(openapi.as_last_chunk(chunk), "CreateCompletionResponse", "chunk")
    assert failures == []


# ================================================================================================
# Remote images (--allow-image-fetch): which URLs are fetched, and which addresses are public
# ================================================================================================

def fetching_call(*messages, **params):
    return cmp.cli_call_for(body_with(*messages, **params), config(allow_image_fetch=True))


def test_remote_images_are_fetched_only_from_user_content_parts_after_validation():
    url = "https://example.com/cat.png"
    call = fetching_call(user([{"type": "text", "text": "a"}, image_part(url)]), assistant("b"),
                         user([image_part(url + "?2")]), metadata={"x": {"type": "image_url", "image_url": url}})
    assert cmp.remote_images_in(call) == [url, url + "?2"]
    source = {"type": "base64", "media_type": "image/png", "data": PNG}
    fetched = cmp.call_with_images(call, {url: source, url + "?2": source})
    assert cmp.remote_images_in(fetched) == [] and fetched.prompt == [{"type": "image", "source": source}]
    assert fetched.history[0]["content"][1] == {"type": "image", "source": source}
    # An invalid request is refused before anything is fetched: the error comes from validation.
    assert error_of(fetching_call, user([image_part(url)]), temperature=7).param == "temperature"
    assert error_of(fetching_call, system([image_part(url)]), user("x")).code == "unsupported_image_url"


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("1.1.1.1", True),
    ("127.0.0.1", False), ("127.8.9.10", False), ("::1", False), ("10.1.2.3", False), ("172.16.0.1", False),
    ("192.168.1.1", False), ("169.254.169.254", False), ("fe80::1", False), ("fe80::1%eth0", False),
    ("224.0.0.1", False), ("ff02::1", False), ("0.0.0.0", False), ("::", False), ("240.0.0.1", False),
    ("100.64.0.1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("fc00::1", False),
])
def test_public_address(address, public):
    assert cmp.public_address(address) is public


# ================================================================================================
# Limits and exact-match checks a hostile request runs into
# ================================================================================================

def test_a_stop_string_over_the_length_limit_is_400():
    assert call_for(user("hi"), stop=["x" * cmp.MAX_STOP_CHARS]).stop == ("x" * cmp.MAX_STOP_CHARS,)
    error = error_of(call_for, user("hi"), stop=["ok", "x" * (cmp.MAX_STOP_CHARS + 1)])
    assert (error.status, error.param, error.code) == (400, "stop", "string_above_max_length")


def test_long_self_overlapping_stop_strings_are_found_across_any_number_of_deltas():
    near = "a" * 999 + "b"
    pieces = ["a"] * 3000 + ["a" * 998, "b", "tail"]
    _, out = translate([message_start()] + [text_delta(p) for p in pieces] + [message_stop()],
                       (near, "zz" * 500))
    assert "".join(e[1] for e in out if e[0] == "text") == "a" * (3000 + 998 - 999)
    assert [e[1] for e in out if e[0] == "finish"] == ["stop"]


def test_kmp_table():
    assert cmp.kmp_table("abab") == [0, 0, 1, 2]
    assert cmp.kmp_table("aaab") == [0, 1, 2, 0]
    assert cmp.kmp_table("") == []


@pytest.mark.parametrize("arguments", ['{"a": "\\ud800"}', '{"a": "x\\udfff"}', '{"\\ud83d": 1}', '{"a": "\ud800"}'])
def test_a_lone_surrogate_in_tool_call_arguments_is_400(arguments):
    error = error_of(call_for, user("hi"), assistant_calls(None, tool_call("call_1", "get_weather", arguments)),
                     tool_message("call_1", "18C"), tools=TOOLS)
    assert (error.status, error.param) == (400, "messages[1].tool_calls[0].function.arguments")


def test_a_tool_description_over_the_limit_is_400_not_cut():
    at_limit = function_tool("t", {"type": "object"}, "d" * cmp.MAX_TOOL_DESCRIPTION_CHARS)
    call = call_for(user("hi"), tools=[at_limit])
    assert call.tools[0].description == "d" * cmp.MAX_TOOL_DESCRIPTION_CHARS
    env = cmp.cli_env_for(call, config(), {})
    assert env["CLAUDE_CODE_MAX_MCP_DESCRIPTION_LENGTH"] == str(cmp.MAX_TOOL_DESCRIPTION_CHARS)
    over = function_tool("t", {"type": "object"}, "d" * (cmp.MAX_TOOL_DESCRIPTION_CHARS + 1))
    error = error_of(call_for, user("hi"), tools=[over])
    assert (error.status, error.param, error.code) == (400, "tools[0].function.description",
                                                       "string_above_max_length")


@pytest.mark.parametrize("messages, tools, param", [
    ([user("hi")], [function_tool("get_weather\n", {"type": "object"})], "tools[0].function.name"),
    ([user("hi"), assistant_calls(None, tool_call("call_1\n", "get_weather", "{}")), tool_message("call_1\n", "x")],
     TOOLS, "messages[1].tool_calls[0].id"),
    ([user("hi"), assistant_calls(None, tool_call("call_1", "get_weather\n", "{}")), tool_message("call_1", "x")],
     TOOLS, "messages[1].tool_calls[0].function.name"),
    ([user("hi"), assistant_calls(None, tool_call("call_1", "get_weather", "{}")), tool_message("call_1\n", "x")],
     TOOLS, "messages[2].tool_call_id"),
])
def test_a_name_or_id_ending_in_a_newline_is_400(messages, tools, param):
    error = error_of(call_for, *messages, tools=tools)
    assert (error.status, error.param) == (400, param)
