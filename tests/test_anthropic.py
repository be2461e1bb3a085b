"""The Messages API, pure: Anthropic request -> CliCall, CLI events -> message object and SSE
events, ApiError -> Anthropic's envelope, and the README's parameter table.

No processes and no sockets. CLI event builders are the ones tests/test_translate.py uses.
"""

import json
import os

import pytest

import claude_max_proxy as cmp
from test_translate import (MODEL, block_start, block_stop, config, message_delta, message_start,
                            message_stop, message_turn, result_event, text_delta, turn)

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
WEATHER = {"name": "get_weather", "description": "weather", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}}}


def body(*messages, **params):
    out = {"model": "claude-sonnet-4", "max_tokens": 100, "messages": list(messages) or [user("hi")]}
    out.update(params)
    return out


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def text(value):
    return {"type": "text", "text": value}


def call_for(*messages, **params):
    return cmp.messages_call_for(body(*messages, **params), config())


# ------------------------------------------------------------------------------------------------
# Request translation
# ------------------------------------------------------------------------------------------------

def test_a_plain_request_becomes_a_call_with_the_neutral_system_prompt():
    call = call_for(user("hi"))
    assert (call.model, call.requested_model, call.max_output_tokens) == ("sonnet", "claude-sonnet-4", 100)
    assert call.system_prompt == cmp.NEUTRAL_SYSTEM_PROMPT
    assert (call.history, call.prompt, call.stream, call.stop, call.tools) == ([], [text("hi")], False, (), ())
    assert call.parallel_tool_calls and not call.include_reasoning


@pytest.mark.parametrize("system, expected", [
    ("Be brief.", "Be brief."),
    ([text("One."), dict(text("Two."), cache_control={"type": "ephemeral"})], "One.\n\nTwo."),
    ([], cmp.NEUTRAL_SYSTEM_PROMPT),
])
def test_system_as_string_or_blocks(system, expected):
    assert call_for(user("hi"), system=system).system_prompt == expected


def test_system_messages_in_the_conversation_join_the_system_prompt():
    call = call_for(user("hi"), {"role": "system", "content": [text("Env: linux.")]}, assistant("yo"),
                    {"role": "system", "content": "Be terse."}, user("again"), system="Top.")
    assert call.system_prompt == "Top.\n\nEnv: linux.\n\nBe terse."
    assert call.history == [{"role": "user", "content": [text("hi")]}, {"role": "assistant", "content": [text("yo")]}]
    assert call_for(user("hi"), {"role": "system", "content": "Only this."}).system_prompt == "Only this."


@pytest.mark.parametrize("model, cli_model", [
    ("claude-opus-4", "opus"), ("haiku", "haiku"), ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5-20250929"),
    ("anthropic/claude-opus-4", "opus"),
])
def test_models_resolve_through_the_same_table(model, cli_model):
    assert call_for(user("hi"), model=model).model == cli_model


def test_history_becomes_alternating_turns_and_same_roles_merge():
    call = call_for(user("a"), user([text("b")]), assistant("c"),
                    assistant([{"type": "thinking", "thinking": "hm", "signature": "s"}, text("d")]), user("e"))
    assert call.history == [{"role": "user", "content": [text("a"), text("b")]},
                            {"role": "assistant", "content": [text("c"), text("d")]}]
    assert call.prompt == [text("e")]


def test_tool_use_and_tool_result_blocks_keep_ids_and_input_under_mcp_names():
    call = call_for(user("weather?"),
                    assistant([text("Checking."), {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                   "input": {"city": "Paris", "n": [1, 2.5]}}]),
                    user([text("also this"), {"type": "tool_result", "tool_use_id": "toolu_1",
                                              "content": [text("Sunny")], "is_error": False}]),
                    tools=[WEATHER])
    assert call.history[1]["content"][1] == {"type": "tool_use", "id": "toolu_1", "name": "mcp__client__get_weather",
                                             "input": {"city": "Paris", "n": [1, 2.5]}}
    # tool results open their turn, in the shape the CLI gives an MCP result
    assert call.prompt == [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [text("Sunny")]},
                           text("also this")]
    assert cmp.tool_results_in(call.prompt) == {}  # text alongside: a new user turn, not only results
    only = call_for(user("w"), assistant([{"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}}]),
                    user([{"type": "tool_result", "tool_use_id": "toolu_2", "content": "Rain"}]), tools=[WEATHER])
    assert cmp.tool_results_in(only.prompt) == {"toolu_2": "Rain"}


def test_a_resent_answer_finds_the_process_that_gave_it():
    """The conversation key of a turn the proxy answered equals that of the client's resend of it."""
    first = call_for(user("weather? "), tools=[WEATHER])
    events = [("text", "Let me check."), ("tool_call", 0, "toolu_9", "get_weather"),
              ("tool_args", 0, '{"city": '), ("tool_args", 0, '"Oslo"}'), ("finish", "tool_calls", {})]
    renderer = cmp.MessagesRenderer(first)
    answer = renderer.whole(events, MODEL)
    parked = first.history + [{"role": "user", "content": first.prompt}, cmp.assistant_turn_from(events, first)]
    resent = call_for(user("weather? "), assistant(answer["content"]),
                      user([{"type": "tool_result", "tool_use_id": "toolu_9", "content": "Cold"}]), tools=[WEATHER])
    assert cmp.conversation_key(resent, resent.history) == cmp.conversation_key(first, parked)


def test_base64_image_becomes_an_image_block():
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    assert call_for(user([text("what?"), block])).prompt == [text("what?"), block]


def test_an_image_url_is_left_for_the_fetcher_only_when_fetching_is_allowed():
    block = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    call = cmp.messages_call_for(body(user([block])), config(), True)
    assert call.prompt == [block]
    assert cmp.remote_images_in(call) == ["https://example.com/cat.png"]  # fetched like the chat path's
    with pytest.raises(cmp.ApiError) as refused:
        cmp.messages_call_for(body(user([block])), config())
    assert (refused.value.param, refused.value.code) == ("messages[0].content[0].source.url", "unsupported_image_url")


@pytest.mark.parametrize("choice, kind", [
    (None, "auto"), ({"type": "auto"}, "auto"), ({"type": "any"}, "required"),
    ({"type": "tool", "name": "get_weather"}, "named"), ({"type": "none"}, "none"),
])
def test_tool_choice_maps_to_the_chat_paths_treatment(choice, kind):
    tools = cmp.messages_tools_of([WEATHER])
    assert cmp.messages_tool_choice_of(choice, tools)[:2] == (kind, "get_weather" if kind == "named" else None)
    call = call_for(user("hi"), tools=[WEATHER], **({"tool_choice": choice} if choice else {}))
    assert bool(call.tools) == (kind != "none")
    assert ("must call" in call.system_prompt) == (kind in ("required", "named"))


def test_disable_parallel_tool_use_allows_one_call():
    call = call_for(user("hi"), tools=[WEATHER], tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert not call.parallel_tool_calls


@pytest.mark.parametrize("params, stop, reasoning", [
    ({"stop_sequences": ["END", "\n\n"]}, ("END", "\n\n"), False),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2000}, (), True),
    ({"thinking": {"type": "adaptive"}}, (), True),
    ({"thinking": {"type": "adaptive", "display": "omitted"}}, (), False),
    ({"thinking": {"type": "disabled"}}, (), False),
    ({"metadata": {"user_id": "u1"}, "temperature": 0.2, "top_p": 1, "top_k": 5, "service_tier": "auto",
      "stream": True, "speed": "fast", "cache_control": {"type": "ephemeral"}, "diagnostics": {}}, (), False),
])
def test_options(params, stop, reasoning):
    call = call_for(user("hi"), **params)
    assert (call.stop, call.include_reasoning) == (stop, reasoning)


@pytest.mark.parametrize("output_config, effort, schema", [
    (None, None, None),
    ({}, None, None),
    ({"effort": "high"}, "high", None),
    ({"effort": "max", "format": {"type": "json_schema", "schema": {"type": "object"}}}, "max", {"type": "object"}),
    ({"format": None}, None, None),
])
def test_output_config_sets_effort_and_the_answers_schema(output_config, effort, schema):
    call = call_for(user("hi"), **({} if output_config is None else {"output_config": output_config}))
    assert (call.effort, call.json_schema) == (effort, schema)
    if schema is not None:
        assert "--json-schema" in cmp.cli_args_for(call, "claude", None, "/tmp/p")


# Every way a request can be wrong: (the change to a valid body, the param the 400 names). Fields
# not in the body at all are written as None.
INVALID = [
    ({"model": None}, "model"),
    ({"messages": None}, "messages"),
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": "100"}, "max_tokens"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"mcp_servers": []}, "mcp_servers"),
    ({"container": "c"}, "container"),
    ({"inference_geo": "us"}, "inference_geo"),
    ({"speed": 1}, "speed"),
    ({"cache_control": "yes"}, "cache_control"),
    ({"output_config": "high"}, "output_config"),
    ({"output_config": {"effort": "huge"}}, "output_config.effort"),
    ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format"),
    ({"output_config": {"format": {"type": "text", "schema": {}}}}, "output_config.format"),
    ({"temperature": 1.5}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"stream": "yes"}, "stream"),
    ({"metadata": "m"}, "metadata"),
    ({"stop_sequences": "END"}, "stop_sequences"),
    ({"stop_sequences": [""]}, "stop_sequences"),
    ({"system": [{"type": "image"}]}, "system"),
    ({"system": 5}, "system"),
    ({"thinking": {"type": "on"}}, "thinking"),
    ({"thinking": {"type": "enabled", "budget_tokens": 500}}, "thinking.budget_tokens"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "max_tokens"),
    ({"tools": {}}, "tools"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"name": "x"}]}, "tools[0].input_schema"),
    ({"tools": [{"name": "bad name", "input_schema": {}}]}, "tools[0].name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].name"),
    ({"tools": [dict(WEATHER, input_schema=[])]}, "tools[0].input_schema"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "auto", "disable_parallel_tool_use": 1}},
     "tool_choice.disable_parallel_tool_use"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [5]}, "messages[0]"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "system", "content": [{"type": "image"}]}, user("hi")]}, "messages[0].content[0].type"),
    ({"messages": [user("hi"), assistant("prefill")]}, "messages"),
    ({"messages": [user(5)]}, "messages[0].content"),
    ({"messages": [user([{"type": "document"}])]}, "messages[0].content[0].type"),
    ({"messages": [user([{"type": "tool_use", "id": "t", "name": "n", "input": {}}])]}, "messages[0].content[0].type"),
    ({"messages": [assistant([{"type": "image"}]), user("hi")]}, "messages[0].content[0].type"),
    ({"messages": [user([text(5)])]}, "messages[0].content[0].text"),
    ({"messages": [user([text("\ud800")])]}, "messages[0].content[0].text"),
    ({"messages": [user([{"type": "image", "source": {"type": "base64", "media_type": "image/bmp",
                                                      "data": PNG}}])]}, "messages[0].content[0].source.media_type"),
    ({"messages": [user([{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                      "data": "not base64!"}}])]}, "messages[0].content[0].source"),
    ({"messages": [user([{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}])]},
     "messages[0].content[0].source.url"),
    ({"messages": [user([{"type": "image", "source": {"type": "url", "url": "file:///etc/passwd"}}])]},
     "messages[0].content[0].source.url"),
    ({"messages": [user([{"type": "image", "source": {"type": "file", "file_id": "f"}}])]},
     "messages[0].content[0].source"),
    ({"messages": [user([{"type": "tool_result", "content": "x"}])]}, "messages[0].content[0].tool_use_id"),
    ({"messages": [user([{"type": "tool_result", "tool_use_id": "t", "is_error": "no"}])]},
     "messages[0].content[0].is_error"),
    ({"messages": [assistant([{"type": "tool_use", "id": "t", "name": "n", "input": "{}"}]), user("x")]},
     "messages[0].content[0].input"),
    ({"messages": [assistant([{"type": "tool_use", "id": "t!", "name": "n", "input": {}}]), user("x")]},
     "messages[0].content[0].id"),
    ({"messages": [assistant([{"type": "tool_use", "id": "t", "name": "n n", "input": {}}]), user("x")]},
     "messages[0].content[0].name"),
]


@pytest.mark.parametrize("change, param", INVALID)
def test_invalid_requests_are_400s_naming_the_parameter(change, param):
    request = body(user("hi"))
    for key, value in change.items():
        if value is None:
            request.pop(key)
        else:
            request[key] = value
    with pytest.raises(cmp.ApiError) as caught:
        cmp.messages_call_for(request, config())
    assert (caught.value.status, caught.value.param) == (400, param), caught.value.message


def test_an_unknown_model_is_a_404():
    with pytest.raises(cmp.ApiError) as caught:
        call_for(user("hi"), model="gpt-4o")
    assert cmp.messages_error_of(caught.value) == (404, {"type": "error", "error": {
        "type": "not_found_error", "message": caught.value.message}})


def test_the_body_must_be_an_object():
    with pytest.raises(cmp.ApiError):
        cmp.messages_call_for([], config())


# ------------------------------------------------------------------------------------------------
# Answers: CLI events -> message object and SSE events
# ------------------------------------------------------------------------------------------------

def rendered(call, cli_events):
    """(stream events, whole message) for a turn, each from its own renderer, as the HTTP layer runs it."""
    streaming, whole = cmp.MessagesRenderer(call), cmp.MessagesRenderer(call)
    frames, events = [], []
    for event in cli_events:
        for turn_event in streaming.translator.feed(event):
            frames += streaming.stream_events(turn_event, MODEL)
        events += whole.translator.feed(event)
    return frames, whole.whole(events, MODEL)


def message_from_frames(frames):
    """Rebuild the message from its SSE events, as an SDK does."""
    message = None
    for name, data in json.loads(json.dumps(frames)):
        assert name == data["type"]
        if name == "message_start":
            message = data["message"]
        elif name == "content_block_start":
            assert data["index"] == len(message["content"])
            message["content"].append(dict(data["content_block"], **(
                {"input": ""} if data["content_block"]["type"] == "tool_use" else {})))
        elif name == "content_block_delta":
            block, delta = message["content"][data["index"]], data["delta"]
            field = {"text_delta": ("text", "text"), "thinking_delta": ("thinking", "thinking"),
                     "signature_delta": ("signature", "signature"),
                     "input_json_delta": ("input", "partial_json")}[delta["type"]]
            block[field[0]] += delta[field[1]]
        elif name == "content_block_stop":
            block = message["content"][data["index"]]
            if block["type"] == "tool_use":
                block["input"] = json.loads(block["input"] or "{}")
        elif name == "message_delta":
            message.update(data["delta"])
            message["usage"].update(data["usage"])
    return message


def test_a_text_turn_streams_anthropics_event_order_and_ends_as_the_whole_message():
    frames, message = rendered(call_for(user("hi")), turn(["Hel", "lo"]))
    assert [name for name, _ in frames] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert message["content"] == [text("Hello")]
    assert (message["stop_reason"], message["stop_sequence"], message["model"]) == ("end_turn", None, MODEL)
    assert message["usage"] == {"input_tokens": 12, "output_tokens": 3, "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 0}
    assert message_from_frames(frames) == dict(message, id=message_from_frames(frames)["id"])
    assert frames[0][1]["message"]["usage"]["input_tokens"] == 12  # known from the start


def test_usage_keeps_the_cache_fields_apart():
    events = [message_start(input_tokens=5, cache_read=700, cache_creation=40), block_start(), text_delta("x"),
              block_stop(), message_delta("end_turn", 9), message_stop()]
    _, message = rendered(call_for(user("hi")), events)
    assert message["usage"] == {"input_tokens": 5, "output_tokens": 9, "cache_creation_input_tokens": 40,
                                "cache_read_input_tokens": 700}


def test_a_tool_call_comes_back_with_the_clients_name_and_exact_input():
    call = call_for(user("hi"), tools=[WEATHER])
    events = message_turn([("text", ["Let me check."]),
                           ("tool", "toolu_7", "mcp__client__get_weather", ['{"city": ', '"Paris", "x": [1.5]}'])])
    frames, message = rendered(call, events)
    assert message["content"] == [text("Let me check."), {"type": "tool_use", "id": "toolu_7", "name": "get_weather",
                                                           "input": {"city": "Paris", "x": [1.5]}}]
    assert message["stop_reason"] == "tool_use"
    starts = [data["content_block"] for name, data in frames if name == "content_block_start"]
    assert starts[1] == {"type": "tool_use", "id": "toolu_7", "name": "get_weather", "input": {}}
    assert message_from_frames(frames)["content"] == message["content"]


def test_a_tool_without_input_gets_an_empty_object():
    call = call_for(user("hi"), tools=[WEATHER])
    _, message = rendered(call, message_turn([("tool", "toolu_8", "mcp__client__get_weather", [])]))
    assert message["content"][0]["input"] == {}


def test_thinking_blocks_come_with_their_signature_only_when_asked():
    events = message_turn([("thinking", ["Let me ", "think."]), ("text", ["Done."])], stop_reason="end_turn")
    frames, message = rendered(call_for(user("hi"), thinking={"type": "adaptive"}), events)
    assert message["content"] == [{"type": "thinking", "thinking": "Let me think.", "signature": "c2lnbmF0dXJl"},
                                  text("Done.")]
    deltas = [data["delta"]["type"] for name, data in frames if name == "content_block_delta"]
    assert deltas == ["thinking_delta", "thinking_delta", "signature_delta", "text_delta"]
    assert rendered(call_for(user("hi")), events)[1]["content"] == [text("Done.")]


@pytest.mark.parametrize("stop_reason, expected", [
    ("end_turn", "end_turn"), ("max_tokens", "max_tokens"), ("refusal", "refusal"), ("pause_turn", "end_turn"),
])
def test_stop_reasons(stop_reason, expected):
    _, message = rendered(call_for(user("hi")), turn(["a"], stop_reason=stop_reason))
    assert message["stop_reason"] == expected


def test_a_stop_sequence_cuts_the_text_and_is_named():
    frames, message = rendered(call_for(user("hi"), stop_sequences=["lo", "Hel"]), turn(["He", "llo"]))
    assert message["content"] == [] and message["stop_sequence"] == "Hel"
    _, message = rendered(call_for(user("hi"), stop_sequences=["STOP"]), turn(["one ST", "OP two"]))
    assert (message["content"], message["stop_reason"], message["stop_sequence"]) == (
        [text("one ")], "stop_sequence", "STOP")


def test_an_answer_without_partial_messages_uses_the_results_text():
    _, message = rendered(call_for(user("hi")), [result_event("Whole answer")])
    assert message["content"] == [text("Whole answer")] and message["usage"]["input_tokens"] == 12


def test_an_error_after_output_is_an_error_event():
    renderer = cmp.MessagesRenderer(call_for(user("hi")))
    error = cmp.ApiError(529, "Overloaded", "server_error", "overloaded")
    assert renderer.stream_error(error) == [("error", {"type": "error", "error": {
        "type": "overloaded_error", "message": "Overloaded"}})]
    assert renderer.stream_end() == []


# ------------------------------------------------------------------------------------------------
# Errors and tables
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("error, status, kind", [
    (cmp.invalid("x", "bad"), 400, "invalid_request_error"),
    (cmp.ApiError(401, "key", "authentication_error", "invalid_api_key"), 401, "authentication_error"),
    (cmp.ApiError(402, "pay", "billing_error", "billing"), 402, "billing_error"),
    (cmp.ApiError(403, "origin", "permission_error"), 403, "permission_error"),
    (cmp.ApiError(404, "route", code="not_found"), 404, "not_found_error"),
    (cmp.ApiError(405, "method"), 405, "invalid_request_error"),
    (cmp.ApiError(413, "big", code="request_too_large"), 413, "request_too_large"),
    (cmp.ApiError(415, "json"), 415, "invalid_request_error"),
    (cmp.ApiError(429, "slow down", "rate_limit_error", headers={"Retry-After": "7"}), 429, "rate_limit_error"),
    (cmp.ApiError(500, "oops", "server_error"), 500, "api_error"),
    (cmp.ApiError(502, "cli", "server_error", "cli_failed"), 502, "api_error"),
    (cmp.ApiError(503, "cli missing", "server_error", "cli_unavailable"), 503, "api_error"),
    (cmp.ApiError(503, "Overloaded", "server_error", "overloaded"), 529, "overloaded_error"),
    (cmp.ApiError(504, "slow", "server_error", "timeout"), 504, "timeout_error"),
])
def test_errors_take_anthropics_envelope_and_status(error, status, kind):
    assert cmp.messages_error_of(error) == (status, {"type": "error", "error": {"type": kind, "message": error.message}})


def test_parameters_table_uses_known_support_levels():
    assert {support for support, _ in cmp.MESSAGES_PARAMETERS.values()} <= {
        "honored", "emulated", "rejected", "ignored"}
    assert {"model", "messages", "max_tokens"} <= set(cmp.MESSAGES_PARAMETERS)


def test_readme_messages_table_matches_the_code():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(path, encoding="utf-8") as handle:
        assert cmp.messages_readme_table() in handle.read()


# ------------------------------------------------------------------------------------------------
# Property: any body is a CliCall or a 400/404, never a crash
# ------------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2, 5000), st.floats(allow_nan=False),
                    st.text(max_size=8), st.sampled_from(["get_weather", "toolu_1", "image/png", PNG, "auto"]))
JSONISH = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                       max_leaves=8)


def block_strategy():
    kinds = st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking",
                             "document", None, 7])
    fields = st.fixed_dictionaries({}, optional={
        "text": st.one_of(st.text(max_size=10), JSONISH), "id": st.one_of(st.just("toolu_1"), JSONISH),
        "name": st.one_of(st.just("get_weather"), JSONISH), "input": JSONISH,
        "tool_use_id": st.one_of(st.just("toolu_1"), JSONISH), "content": JSONISH, "is_error": JSONISH,
        "source": st.one_of(st.just({"type": "base64", "media_type": "image/png", "data": PNG}), JSONISH),
        "cache_control": JSONISH})
    return st.builds(lambda kind, rest: dict(rest, type=kind), kinds, fields)


def messages_strategy(roles, contents):
    return st.lists(st.fixed_dictionaries({"role": roles, "content": contents}), min_size=1, max_size=4)


# Mostly well-formed bodies with junk inside content blocks, and bodies with junk anywhere.
GOOD_VALUES = {
    "system": st.one_of(st.text(max_size=5), st.just([text("s")])), "stop_sequences": st.just(["END"]),
    "stream": st.booleans(), "tools": st.just([WEATHER]), "thinking": st.just({"type": "adaptive"}),
    "tool_choice": st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"},
                                    {"type": "tool", "name": "get_weather"}]),
    "metadata": st.just({"user_id": "u"}), "temperature": st.just(0.5), "top_p": st.just(0.5),
    "top_k": st.just(3), "service_tier": st.just("auto")}
MOSTLY_VALID = st.fixed_dictionaries(
    {"model": st.just("claude-sonnet-4"), "max_tokens": st.just(64),
     "messages": messages_strategy(st.sampled_from(["user", "assistant"]),
                                   st.one_of(st.text(max_size=10), st.lists(block_strategy(), max_size=4)))},
    optional=GOOD_VALUES)
ANYTHING = st.fixed_dictionaries(
    {"model": st.one_of(st.just("claude-sonnet-4"), JSONISH), "max_tokens": st.one_of(st.just(64), JSONISH),
     "messages": st.one_of(messages_strategy(JSONISH, JSONISH), JSONISH)},
    optional={name: JSONISH for name in list(cmp.MESSAGES_PARAMETERS) + ["unknown"]
              if name not in ("model", "max_tokens", "messages")})
BODIES = st.one_of(MOSTLY_VALID, ANYTHING)


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(BODIES)
def test_any_body_is_a_call_or_a_clean_4xx(request):
    try:
        call = cmp.messages_call_for(request, config())
    except cmp.ApiError as exc:
        assert exc.status in (400, 404) and exc.message
        assert cmp.messages_error_of(exc)[0] == exc.status
        return
    assert call.prompt and json.loads(cmp.stdin_line_for(call.prompt))
    cmp.conversation_key(call, call.history)
    assert json.dumps(cmp.MessagesRenderer(call).whole([("text", "x"), ("finish", "stop", {})], "m"))
