"""The Responses API (/v1/responses): pure translation both ways, the event stream, the response
store, and end to end with the real `openai` client, the real CLI and tests/fake_upstream.py.
"""

import json
import os
import re
import subprocess
import uuid

import pytest

import claude_max_proxy as cmp
from conftest import marker, only_request, spec_checked_http_client, sse_payloads, upstream_texts

TEXT = "Hello from the fake upstream."
PNG_1PX = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
         "prompt_tokens_details": {"cached_tokens": 3}, "completion_tokens_details": {"reasoning_tokens": 0}}


def config(**fields):
    fields.setdefault("workdir", "/nonexistent/claude-max-proxy/cwd")
    return cmp.Config(**fields)


def call_for(body, previous=()):
    return cmp.responses_call_for(body, list(previous), config())


def error_of(body, previous=()):
    with pytest.raises(cmp.ApiError) as info:
        call_for(body, previous)
    return info.value


# ------------------------------------------------------------------------------------------------
# Request translation: Responses body -> chat body -> CliCall
# ------------------------------------------------------------------------------------------------

def test_string_input_is_one_user_message_and_instructions_the_system_message():
    chat = cmp.chat_body_from_responses({"model": "claude-opus-4", "input": "hi", "instructions": "Be brief."})
    assert chat == {"model": "claude-opus-4", "messages": [{"role": "system", "content": "Be brief."},
                                                           {"role": "user", "content": "hi"}]}


def test_message_items_become_chat_messages_part_for_part():
    image = "data:image/png;base64," + PNG_1PX
    chat = cmp.chat_body_from_responses({"input": [
        {"type": "message", "role": "developer", "content": "Rules."},
        {"role": "user", "content": [{"type": "input_text", "text": "look"},
                                     {"type": "input_image", "image_url": image, "detail": "auto"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "A pixel.", "annotations": []}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"role": "user", "content": "thanks"},
    ]})
    assert chat["messages"] == [
        {"role": "developer", "content": "Rules."},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": image}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A pixel."}]},
        {"role": "user", "content": "thanks"},
    ]


def test_function_calls_merge_into_one_assistant_message_and_outputs_become_tool_messages():
    chat = cmp.chat_body_from_responses({"input": [
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "id": "fc_2", "call_id": "call_b", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "call_a", "output": "rain"},
        {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "sun"}]},
    ]})
    assert chat["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "sun"}]},
    ]


@pytest.mark.parametrize("responses,chat", [
    ({"tools": [WEATHER]}, {"tools": [{"type": "function", "function": {
        "name": "get_weather", "description": WEATHER["description"], "parameters": WEATHER["parameters"]}}]}),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}},
     {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ({"tool_choice": "none"}, {"tool_choice": "none"}),
    ({"max_output_tokens": 99}, {"max_completion_tokens": 99}),
    ({"reasoning": {"effort": "high", "summary": "auto"}}, {"reasoning_effort": "high", "include_reasoning": True}),
    ({"reasoning": {"effort": "low"}}, {"reasoning_effort": "low"}),
    ({"reasoning": {"summary": "auto"}, "include_reasoning": False}, {"include_reasoning": False}),
    ({"tools": [{"type": "web_search"}, WEATHER, {"type": "file_search", "vector_store_ids": ["v"]}]},
     {"tools": [{"type": "function", "function": {
         "name": "get_weather", "description": WEATHER["description"], "parameters": WEATHER["parameters"]}}]}),
    ({"tools": [{"type": "namespace", "name": "agents", "description": "Sub-agents", "tools": [
        {"type": "function", "name": "spawn", "parameters": {"type": "object"}}, dict(WEATHER, strict=False)]}]},
     {"tools": [{"type": "function", "function": {"name": "agents__spawn", "parameters": {"type": "object"}}},
                {"type": "function", "function": {"name": "agents__get_weather", "description": WEATHER["description"],
                                                  "parameters": WEATHER["parameters"]}}]}),
    ({"prompt_cache_key": "k", "client_metadata": {"a": "b"}}, {}),
    ({"text": {"format": {"type": "json_schema", "name": "place", "strict": True,
                          "schema": {"type": "object"}}}},
     {"response_format": {"type": "json_schema", "json_schema": {"name": "place", "strict": True,
                                                                 "schema": {"type": "object"}}}}),
    ({"text": {"format": {"type": "json_object"}}}, {"response_format": {"type": "json_object"}}),
    ({"text": {"verbosity": "low"}}, {}),
    ({"stream": True, "temperature": 0.5, "top_p": 1, "store": False, "metadata": {"a": "b"}, "user": "u",
      "parallel_tool_calls": False},
     {"stream": True, "temperature": 0.5, "top_p": 1, "store": False, "metadata": {"a": "b"}, "user": "u",
      "parallel_tool_calls": False}),
    ({"stop": ["x"], "n": 2, "include": ["reasoning.encrypted_content"], "truncation": "auto"},
     {"include_reasoning": True}),
])
def test_parameters_map_to_their_chat_equivalents(responses, chat):
    body = dict(responses, input="hi")
    translated = cmp.chat_body_from_responses(body)
    del translated["messages"]
    assert {k: v for k, v in translated.items() if k != "tools" or "tools" in chat} == chat


def test_previous_conversation_comes_after_the_instructions_and_before_the_new_input():
    previous = [{"role": "user", "content": "My name is Bob."}, {"role": "assistant", "content": "Hi Bob."}]
    chat = cmp.chat_body_from_responses({"input": "My name?", "instructions": "Be brief."}, previous)
    assert chat["messages"] == [{"role": "system", "content": "Be brief."}] + previous + [
        {"role": "user", "content": "My name?"}]
    call, conversation = call_for({"input": "My name?", "instructions": "Be brief."}, previous)
    assert conversation == previous + [{"role": "user", "content": "My name?"}]  # no instructions
    assert call.system_prompt == "Be brief."
    assert [t["role"] for t in call.history] == ["user", "assistant"]
    assert call.prompt == [{"type": "text", "text": "My name?"}]


def test_the_cli_call_is_the_one_the_chat_body_gets():
    body = {"model": "claude-haiku-4", "input": "hi", "tools": [WEATHER], "max_output_tokens": 50,
            "reasoning": {"effort": "minimal"}, "stream": True,
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}}
    call, _ = call_for(body)
    assert call == cmp.cli_call_for(cmp.chat_body_from_responses(body), config())
    assert (call.model, call.max_output_tokens, call.effort, call.stream, call.json_schema) == \
        ("haiku", 50, "low", True, {"type": "object"})
    assert [t.name for t in call.tools] == ["get_weather"] and not call.include_usage


@pytest.mark.parametrize("body,status,param,code", [
    ([], 400, None, "invalid_type"),
    ({}, 400, "input", "missing_required_parameter"),
    ({"input": 5}, 400, "input", "invalid_type"),
    ({"input": []}, 400, "input", "invalid_value"),
    ({"input": ["hi"]}, 400, "input[0]", "invalid_type"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, 400, "input[0].type", "unsupported_input_item"),
    ({"input": [{"type": "web_search_call", "id": "x"}]}, 400, "input[0].type", "unsupported_input_item"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]}, 400,
     "input[0].content[0].text", "invalid_type"),
    ({"input": [{"role": "user", "content": "a"}, {"role": "user", "content": [
        {"type": "input_text", "text": "b"}, {"type": "input_image", "image_url": "https://example.com/x.png"}]}]},
     400, "input[1].content[1].image_url", "unsupported_image_url"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]}, 400,
     "input[0].content[0].image_url", "invalid_image_url"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]}, 400,
     "input[0].content[0]", "unsupported_content"),
    ({"input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role", "invalid_value"),
    ({"input": [{"role": "user", "content": "x"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "not json"},
                {"type": "function_call_output", "call_id": "c1", "output": "x"}]},
     400, "input[2].arguments", "invalid_value"),
    ({"input": [{"role": "user", "content": "x"},
                {"type": "function_call", "call_id": "bad id!", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "x"}]},
     400, "input[1].call_id", "invalid_value"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, 400, "input[0].call_id",
     "missing_required_parameter"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]}, 400, "input[0].output",
     "invalid_type"),
    ({"input": "x", "instructions": 5}, 400, "instructions", "invalid_type"),
    ({"input": "x", "instructions": "\ud800"}, 400, "instructions", "invalid_value"),
    ({"input": "x", "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ({"input": "x", "tools": [5]}, 400, "tools[0]", "unsupported_tool"),
    ({"input": "x", "tools": [{"name": "f"}]}, 400, "tools[0]", "unsupported_tool"),
    ({"input": "x", "tools": [{"type": "web_search"}, dict(WEATHER, name="bad name")]}, 400, "tools[1].name",
     "invalid_value"),
    ({"input": "x", "tools": [{"type": "namespace", "name": "ns", "tools": [WEATHER, dict(WEATHER, name="w2", parameters=5)]}]},
     400, "tools[0].tools[1].parameters", "invalid_type"),
    ({"input": "x", "tools": [{"type": "namespace", "name": "ns", "tools": [{"type": "custom", "name": "c"}]}]},
     400, "tools[0].tools[0]", "unsupported_tool"),
    ({"input": "x", "tools": [{"type": "namespace", "name": "ns"}]}, 400, "tools[0]", "invalid_type"),
    ({"input": "x", "tools": [dict(WEATHER, name="bad name")]}, 400, "tools[0].name", "invalid_value"),
    ({"input": "x", "tools": [dict(WEATHER, parameters=[])]}, 400, "tools[0].parameters", "invalid_type"),
    ({"input": "x", "tool_choice": {"type": "web_search_preview"}}, 400, "tool_choice", "unsupported_tool"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, 400,
     "tool_choice", "invalid_value"),
    ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens", "invalid_value"),
    ({"input": "x", "reasoning": "high"}, 400, "reasoning", "invalid_type"),
    ({"input": "x", "reasoning": {"effort": "huge"}}, 400, "reasoning.effort", "invalid_value"),
    ({"input": "x", "text": "json"}, 400, "text", "invalid_type"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, 400, "text.format", "invalid_value"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format.schema",
     "invalid_value"),
    ({"input": "x", "temperature": 3}, 400, "temperature", "invalid_value"),
    ({"input": "x", "store": "no"}, 400, "store", "invalid_type"),
    ({"input": "x", "background": True}, 400, "background", "unsupported_value"),
    ({"input": "x", "conversation": "conv_1"}, 400, "conversation", "unsupported_parameter"),
    ({"input": "x", "prompt": {"id": "pmpt_1"}}, 400, "prompt", "unsupported_parameter"),
])
def test_errors_name_the_responses_parameter(body, status, param, code):
    error = error_of(body)
    assert (error.status, error.param, error.code) == (status, param, code), error.message
    assert error.body()["error"]["type"] == "invalid_request_error"
    if param and param.startswith("input"):
        assert "messages" not in error.message and "messages" not in error.param


def test_an_input_error_message_names_the_input_item():
    error = error_of({"input": [{"role": "user", "content": [{"type": "input_text", "text": None}]}]})
    assert error.message == "`input[0].content[0].text` must be a string"


# ------------------------------------------------------------------------------------------------
# The other way: turn events -> response object / typed events
# ------------------------------------------------------------------------------------------------

def renderer(body=None, call=None):
    body = body if body is not None else {"input": "hi"}
    return cmp.ResponsesRenderer(call or call_for(body)[0], body)


def streamed(events, body=None, model="claude-sonnet-4-5"):
    render = renderer(body)
    out = [pair for event in events for pair in render.stream_events(event, model)]
    return render, out + render.stream_end()


TEXT_TURN = [("text", "Hello "), ("text", "world"), ("finish", "stop", USAGE)]
TOOL_TURN = [("text", "Let me check."), ("tool_call", 0, "toolu_1", "get_weather"),
             ("tool_args", 0, '{"city": '), ("tool_args", 0, '"Oslo"}'),
             ("tool_call", 1, "toolu_2", "get_weather"), ("tool_args", 1, "{}"),
             ("finish", "tool_calls", USAGE)]


def test_text_stream_has_the_typed_events_in_order_with_sequence_numbers():
    render, out = streamed(TEXT_TURN)
    names = [name for name, _ in out]
    assert names == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert [p["sequence_number"] for _, p in out] == list(range(len(out)))
    assert all(p["type"] == name for name, p in out)
    created = out[0][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["id"].startswith("resp_")
    item_id = out[2][1]["item"]["id"]
    assert item_id.startswith("msg_") and out[2][1]["item"]["status"] == "in_progress"
    assert [p["delta"] for _, p in out if p["type"] == "response.output_text.delta"] == ["Hello ", "world"]
    assert {p["item_id"] for _, p in out[3:8]} == {item_id}
    assert out[6][1]["text"] == "Hello world" and out[7][1]["part"]["text"] == "Hello world"
    assert out[8][1]["item"] == {"id": item_id, "type": "message", "status": "completed", "role": "assistant",
                                 "content": [{"type": "output_text", "text": "Hello world", "annotations": [],
                                              "logprobs": []}]}
    final = out[-1][1]["response"]
    assert final is render.response and final["status"] == "completed"
    assert final["output_text"] == "Hello world" and final["model"] == "claude-sonnet-4-5"
    assert final["usage"] == {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 0},
                              "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0},
                              "total_tokens": 17}
    assert "[DONE]" not in json.dumps(out)


def test_function_calls_stream_their_arguments_and_close_in_order():
    _, out = streamed(TOOL_TURN, {"input": "hi", "tools": [WEATHER]})
    names = [name for name, _ in out]
    assert names[2:] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    added = [p for _, p in out if p["type"] == "response.output_item.added"]
    assert [p["output_index"] for p in added] == [0, 1, 2]
    call = added[1]["item"]
    assert call["id"].startswith("fc_") and call["call_id"] == "tooluxu1" and call["name"] == "get_weather"
    assert call["arguments"] == "" and call["status"] == "in_progress"
    done = [p for _, p in out if p["type"] == "response.function_call_arguments.done"]
    assert [(p["output_index"], p["arguments"]) for p in done] == [(1, '{"city": "Oslo"}'), (2, "{}")]
    final = out[-1][1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call", "function_call"]
    assert final["output"][1] == {"id": call["id"], "type": "function_call", "status": "completed",
                                  "call_id": "tooluxu1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert final["output_text"] == "Let me check." and final["status"] == "completed"


def without_ids(value):
    text = json.dumps(value, sort_keys=True)
    for prefix in ("resp_", "msg_", "fc_", "rs_"):
        text = re.sub(r'"%s[0-9a-f]{32}"' % prefix, '"%sX"' % prefix, text)
    return json.loads(text)


@pytest.mark.parametrize("events", [TEXT_TURN, TOOL_TURN, [("finish", "stop", USAGE)]])
def test_the_whole_response_is_the_last_streamed_one(events):
    _, out = streamed(events, {"input": "hi", "tools": [WEATHER]})
    whole = renderer({"input": "hi", "tools": [WEATHER]}).whole(events, "claude-sonnet-4-5")
    assert without_ids(whole) == without_ids(out[-1][1]["response"])


def test_a_finished_response_is_kept_before_its_last_event_is_sent():
    kept = []
    render = cmp.ResponsesRenderer(call_for({"input": "hi"})[0], {"input": "hi"}, kept.append)
    render.stream_events(("text", "hi"), "m")
    assert kept == []
    last = render.stream_events(("finish", "stop", USAGE), "m")[-1][1]
    assert kept == [last["response"]] and kept[0]["status"] == "completed"
    failing = cmp.ResponsesRenderer(call_for({"input": "hi"})[0], {"input": "hi"}, kept.append)
    failing.stream_events(("text", "hi"), "m")
    failing.stream_error(cmp.ApiError(502, "boom", "server_error", "cli_failed"))
    assert len(kept) == 1  # a failed response cannot be continued


def test_max_tokens_finish_is_an_incomplete_response():
    render, out = streamed([("text", "cut"), ("finish", "length", USAGE)], {"input": "hi", "max_output_tokens": 3})
    assert out[-1][0] == "response.incomplete"
    final = render.response
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["max_output_tokens"] == 3 and final["output_text"] == "cut"


def test_an_error_mid_stream_ends_it_with_response_failed():
    render = renderer()
    out = render.stream_events(("text", "partial"), "m")
    error = cmp.ApiError(502, "the Claude CLI exited", "server_error", "cli_failed")
    failed = render.stream_error(error) + render.stream_end()
    assert [name for name, _ in failed] == ["response.failed"]
    payload = failed[0][1]
    assert payload["sequence_number"] == len(out)
    assert payload["response"]["status"] == "failed"
    # The spec allows a fixed list of codes: anything else is a server_error (429 a rate limit).
    assert payload["response"]["error"] == {"code": "server_error", "message": "the Claude CLI exited"}
    limited = renderer().stream_error(cmp.ApiError(429, "slow down", "rate_limit_error", "usage_limit"))
    assert limited[0][1]["response"]["error"]["code"] == "rate_limit_exceeded"
    assert payload["response"]["output"][0]["content"][0]["text"] == "partial"
    assert "error" not in payload  # a top-level `error` key makes the SDK raise instead of yield


def test_reasoning_becomes_a_reasoning_item_before_the_message():
    render, out = streamed([("reasoning", "Hmm."), ("text", "Done."), ("finish", "stop", USAGE)])
    names = [name for name, _ in out]
    assert names[2:6] == ["response.output_item.added", "response.reasoning_text.delta",
                          "response.reasoning_text.done", "response.output_item.done"]
    assert [i["type"] for i in render.response["output"]] == ["reasoning", "message"]
    assert render.response["output"][0]["content"] == [{"type": "reasoning_text", "text": "Hmm."}]
    assert render.response["output_text"] == "Done."


CODEX_REASONING = {"input": "hi", "reasoning": {"effort": "medium", "summary": "auto"},
                   "include": ["reasoning.encrypted_content"], "store": False}


@pytest.mark.parametrize("events,reasoning_texts", [
    ([("text", "Done."), ("finish", "stop", USAGE)], []),
    ([("tool_call", 0, "toolu_1", "get_weather"), ("tool_args", 0, "{}"), ("finish", "tool_calls", USAGE)], []),
    ([("finish", "stop", USAGE)], []),
    ([("reasoning", "Hmm."), ("text", "Done."), ("finish", "stop", USAGE)], [{"type": "reasoning_text", "text": "Hmm."}]),
])
def test_a_client_that_asks_for_reasoning_always_gets_a_reasoning_item_first(events, reasoning_texts):
    body = dict(CODEX_REASONING, tools=[WEATHER])
    render, out = streamed(events, body)
    output = render.response["output"]
    assert output[0]["type"] == "reasoning" and output[0]["summary"] == [] and output[0]["status"] == "completed"
    assert output[0]["content"] == reasoning_texts and [i["type"] for i in output].count("reasoning") == 1
    names = [name for name, _ in out]
    assert names[2] == "response.output_item.added" and names.count("response.output_item.done") == len(output)
    assert render.response["reasoning"] == {"effort": "medium", "summary": "auto"}
    unasked = streamed(events, dict(body, include=[], reasoning={}))[0].response["output"]
    assert ("reasoning" in [i["type"] for i in unasked]) == bool(reasoning_texts)


def test_namespaced_functions_are_called_by_namespace_and_name_and_replay_flat():
    spawn = {"type": "function", "name": "spawn_agent", "parameters": {"type": "object"}}
    body = {"input": "hi", "tools": [{"type": "namespace", "name": "multi_agent_v1", "description": "d",
                                      "tools": [spawn]}, {"type": "web_search"}, WEATHER]}
    render, out = streamed([("tool_call", 0, "toolu_1", "multi_agent_v1__spawn_agent"), ("tool_args", 0, "{}"),
                            ("tool_call", 1, "toolu_2", "get_weather"), ("tool_args", 1, "{}"),
                            ("finish", "tool_calls", USAGE)], body)
    calls = render.response["output"]
    assert (calls[0]["namespace"], calls[0]["name"]) == ("multi_agent_v1", "spawn_agent")
    assert "namespace" not in calls[1] and calls[1]["name"] == "get_weather"
    [done] = [p for name, p in out if name == "response.function_call_arguments.done" and p["item_id"] == calls[0]["id"]]
    assert done["name"] == "spawn_agent"
    replay = cmp.responses_output_messages(calls)
    assert [c["function"]["name"] for c in replay[0]["tool_calls"]] == ["multi_agent_v1__spawn_agent", "get_weather"]
    call, _ = call_for(dict(body, input=[{"role": "user", "content": "hi"}] + calls + [
        {"type": "function_call_output", "call_id": "toolu_1", "output": "ok"},
        {"type": "function_call_output", "call_id": "toolu_2", "output": "ok"}]))
    assert [t.name for t in call.tools] == ["multi_agent_v1__spawn_agent", "get_weather"]
    assert cmp.hosted_tools_of(body["tools"]) == ["web_search"]


APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files.",
               "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}
CUSTOM_TURN = [("tool_call", 0, "toolu_1", "apply_patch"), ("tool_args", 0, '{"input": "*** Begin'),
               ("tool_args", 0, ' Patch\\n"}'), ("finish", "tool_calls", USAGE)]


def test_custom_tools_are_functions_of_one_string_and_their_calls_come_back_as_custom_calls():
    chat = cmp.chat_body_from_responses({"input": "hi", "tools": [APPLY_PATCH]})
    [tool] = chat["tools"]
    assert tool["function"]["name"] == "apply_patch" and "start: /.+/" in tool["function"]["description"]
    assert tool["function"]["parameters"]["properties"] == {"input": {"type": "string"}}
    render, out = streamed(CUSTOM_TURN, {"input": "hi", "tools": [APPLY_PATCH]})
    [call] = render.response["output"]
    assert (call["type"], call["name"], call["input"], call["call_id"]) == (
        "custom_tool_call", "apply_patch", "*** Begin Patch\n", "tooluxu1")
    names = [name for name, _ in out]
    assert "response.function_call_arguments.delta" not in names
    assert names.index("response.custom_tool_call_input.done") < names.index("response.output_item.done")
    replay = cmp.responses_output_messages([call, {"type": "custom_tool_call_output", "call_id": "tooluxu1",
                                                   "output": "Done."}])
    assert replay == [{"role": "assistant", "content": None, "tool_calls": [{"id": "tooluxu1", "type": "function",
                       "function": {"name": "apply_patch", "arguments": '{"input": "*** Begin Patch\\n"}'}}]},
                      {"role": "tool", "tool_call_id": "tooluxu1", "content": "Done."}]
    assert cmp.hosted_tools_of([APPLY_PATCH, {"type": "web_search"}]) == ["web_search"]
    error = error_of({"input": [{"role": "user", "content": "x"}, dict(call, input=5),
                                {"type": "custom_tool_call_output", "call_id": "toolu_1", "output": "x"}],
                      "tools": [APPLY_PATCH]})
    assert error.param == "input[1].input"


def test_the_response_echoes_the_request_settings():
    body = {"input": "hi", "instructions": "Be brief.", "tools": [WEATHER], "tool_choice": "required",
            "temperature": 0.2, "store": False, "metadata": {"k": "v"}, "previous_response_id": "resp_1",
            "reasoning": {"effort": "low"}, "parallel_tool_calls": False}
    response = renderer(body, call_for(dict(body, previous_response_id=None))[0]).whole(TEXT_TURN, "m")
    assert response["object"] == "response" and isinstance(response["created_at"], int)
    assert (response["instructions"], response["tools"], response["tool_choice"], response["temperature"],
            response["store"], response["metadata"], response["previous_response_id"],
            response["reasoning"]["effort"], response["parallel_tool_calls"]) == (
        "Be brief.", [dict(WEATHER, strict=None)], "required", 0.2, False, {"k": "v"}, "resp_1", "low", False)
    assert response["text"] == {"format": {"type": "text"}} and response["error"] is None


def test_echoed_settings_with_lone_surrogates_still_encode():
    body = {"input": "hi", "user": "\ud800", "metadata": {"k": "a\udfff"}, "tools": [dict(WEATHER, description="\ud83d")]}
    response = renderer(body).whole(TEXT_TURN, "m")
    json.dumps(response, ensure_ascii=False).encode("utf-8")
    assert response["user"] == "?" and response["tools"][0]["description"] == "?"


def test_responses_and_events_parse_as_the_openai_sdk_types():
    types = pytest.importorskip("openai.types.responses")
    pydantic = pytest.importorskip("pydantic")
    events = pydantic.TypeAdapter(types.ResponseStreamEvent)
    for turn in (TEXT_TURN, TOOL_TURN):
        _, out = streamed(turn, {"input": "hi", "tools": [WEATHER]})
        for _, payload in out:
            assert events.validate_python(payload).type == payload["type"]
        response = types.Response.model_validate(out[-1][1]["response"])
        assert response.output_text == out[-1][1]["response"]["output_text"]
    render = renderer()
    render.stream_events(("text", "x"), "m")
    failed = render.stream_error(cmp.ApiError(502, "boom", "server_error", "server_error"))[0][1]
    assert events.validate_python(failed).response.error.message == "boom"


def test_output_items_replay_as_the_assistant_turn_the_cli_process_holds():
    """A continuation's history must equal the turns a parked process has seen (same key)."""
    first, conversation = call_for({"input": "weather?", "tools": [WEATHER], "instructions": "Be brief."})
    response = renderer({"input": "weather?", "tools": [WEATHER]}, first).whole(TOOL_TURN, "m")
    stored = conversation + cmp.responses_output_messages(response["output"])
    assert stored[1] == {"role": "assistant", "content": [{"type": "text", "text": "Let me check."}]}
    assert [c["id"] for c in stored[2]["tool_calls"]] == ["tooluxu1", "tooluxu2"]
    second, _ = call_for({"input": [{"type": "function_call_output", "call_id": "toolu_1", "output": "rain"},
                                    {"type": "function_call_output", "call_id": "toolu_2", "output": "sun"}],
                          "tools": [WEATHER], "instructions": "Be brief."}, stored)
    held = first.history + [{"role": "user", "content": first.prompt}, cmp.assistant_turn_from(TOOL_TURN, first)]
    assert cmp.conversation_key(second, second.history) == cmp.conversation_key(first, held)
    assert cmp.tool_results_in(second.prompt) == {"toolu_1": "rain", "toolu_2": "sun"}


# ------------------------------------------------------------------------------------------------
# The response store (previous_response_id)
# ------------------------------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def response(response_id, text="x"):
    return {"id": response_id, "object": "response", "output_text": text}


def test_store_keeps_the_latest_responses_up_to_its_count():
    store = cmp.ResponseStore(max_items=2, ttl=60)
    for n in range(3):
        assert store.put(response("resp_%d" % n), [{"role": "user", "content": str(n)}])
    assert store.get("resp_0") is None and len(store) == 2
    assert store.get("resp_2") == (response("resp_2"), [{"role": "user", "content": "2"}])


def test_store_entries_expire():
    clock = Clock()
    store = cmp.ResponseStore(max_items=10, ttl=60, clock=clock)
    store.put(response("resp_a"), [])
    clock.now += 30
    store.put(response("resp_b"), [])
    clock.now += 31
    assert store.get("resp_a") is None and store.get("resp_b") is not None
    clock.now += 30
    assert store.get("resp_b") is None and len(store) == 0 and store.size == 0


def test_store_is_bounded_in_bytes_and_refuses_one_entry_over_the_bound():
    store = cmp.ResponseStore(max_items=100, ttl=60, max_bytes=2000)
    big = [{"role": "user", "content": "x" * 700}]
    for n in range(4):
        store.put(response("resp_%d" % n), big)
    assert len(store) == 2 and store.size <= 2000
    assert store.get("resp_3") is not None and store.get("resp_1") is None
    assert not store.put(response("resp_huge"), [{"role": "user", "content": "x" * 5000}])
    assert store.get("resp_huge") is None and len(store) == 2


def test_store_replaces_an_entry_with_the_same_id():
    store = cmp.ResponseStore(max_items=10, ttl=60)
    store.put(response("resp_a", "one"), [])
    store.put(response("resp_a", "two"), [])
    assert len(store) == 1 and store.get("resp_a")[0]["output_text"] == "two"


def test_previous_response_id_finds_the_stored_conversation_or_is_a_404():
    store = cmp.ResponseStore(max_items=10, ttl=60)
    store.put(response("resp_a"), [{"role": "user", "content": "hi"}])
    assert cmp.previous_messages_for({"input": "x"}, store) == []
    assert cmp.previous_messages_for({"input": "x", "previous_response_id": "resp_a"}, store) == [
        {"role": "user", "content": "hi"}]
    with pytest.raises(cmp.ApiError) as info:
        cmp.previous_messages_for({"input": "x", "previous_response_id": "resp_nope"}, store)
    assert (info.value.status, info.value.type, info.value.param, info.value.code) == (
        404, "invalid_request_error", "previous_response_id", "previous_response_not_found")
    for bad in (5, "resp_\ud800"):
        with pytest.raises(cmp.ApiError) as info:
            cmp.previous_messages_for({"input": "x", "previous_response_id": bad}, store)
        assert info.value.status == 400 and info.value.param == "previous_response_id"


STORED_MESSAGE = {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
                  "content": [{"type": "output_text", "text": "Hi Bob.", "annotations": [], "logprobs": []}]}
STORED_CALL = {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_1",
               "name": "get_weather", "arguments": "{}"}


@pytest.mark.parametrize("items,resolved", [
    ([{"type": "item_reference", "id": "msg_1"}], [STORED_MESSAGE]),
    ([{"role": "user", "content": "a"}, {"type": "item_reference", "id": "fc_1"}, "kept as is"],
     [{"role": "user", "content": "a"}, STORED_CALL, "kept as is"]),
    ([{"type": "message", "role": "user", "content": "no reference"}],
     [{"type": "message", "role": "user", "content": "no reference"}]),
])
def test_item_references_are_replaced_by_the_stored_items(items, resolved):
    stored = {item["id"]: item for item in (STORED_MESSAGE, STORED_CALL)}
    assert cmp.items_with_references_resolved(items, stored.get) == resolved


@pytest.mark.parametrize("reference,status,param,code", [
    ({"type": "item_reference", "id": "msg_gone"}, 404, "input[1].id", "item_not_found"),
    ({"type": "item_reference"}, 400, "input[1].id", "invalid_type"),
    ({"type": "item_reference", "id": 7}, 400, "input[1].id", "invalid_type"),
])
def test_a_bad_item_reference_names_its_param(reference, status, param, code):
    with pytest.raises(cmp.ApiError) as info:
        cmp.items_with_references_resolved([{"role": "user", "content": "a"}, reference], {}.get)
    assert (info.value.status, info.value.param, info.value.code) == (status, param, code)


def test_the_store_finds_output_and_input_items_by_id_and_forgets_deleted_responses():
    store = cmp.ResponseStore(max_items=10, ttl=60)
    inputs = cmp.input_item_resources([{"role": "user", "content": "hi", "id": "msg_in"}])
    store.put(dict(response("resp_a"), output=[STORED_MESSAGE]), [], inputs)
    assert store.item("msg_1") == STORED_MESSAGE and store.item("msg_in")["content"][0]["text"] == "hi"
    assert store.entry("resp_a")[2] == inputs and store.item("msg_nope") is None
    store.delete("resp_a")
    assert store.item("msg_1") is None and store.entry("resp_a") is None and store.size == 0


def test_input_items_are_typed_with_ids_and_content_parts():
    items = cmp.input_item_resources([
        {"role": "user", "content": "hi"}, {"type": "message", "role": "assistant", "content": "yo", "id": "msg_a"},
        dict(STORED_CALL), {"type": "function_call_output", "call_id": "call_1", "output": "sun"}])
    assert [item["type"] for item in items] == ["message", "message", "function_call", "function_call_output"]
    assert items[0]["id"].startswith("msg_") and items[0]["content"] == [{"type": "input_text", "text": "hi"}]
    assert items[1]["id"] == "msg_a" and items[1]["content"] == [
        {"type": "output_text", "text": "yo", "annotations": [], "logprobs": []}]
    assert items[3]["id"].startswith("fco_") and all(item["status"] == "completed" for item in items)
    assert cmp.input_item_resources("just text")[0]["role"] == "user"


@pytest.mark.parametrize("query,ids,has_more", [
    ({}, ["d", "c", "b", "a"], False),
    ({"order": "asc"}, ["a", "b", "c", "d"], False),
    ({"order": "asc", "limit": "2"}, ["a", "b"], True),
    ({"order": "asc", "after": "b"}, ["c", "d"], False),
    ({"limit": "1", "after": "c"}, ["b"], True),
    ({"after": "a"}, [], False),
])
def test_input_items_pages(query, ids, has_more):
    page = cmp.input_items_page([{"id": x} for x in "abcd"], query)
    assert [item["id"] for item in page["data"]] == ids and page["has_more"] is has_more
    assert page["object"] == "list" and page["first_id"] == (ids[0] if ids else None)


@pytest.mark.parametrize("query,param", [({"order": "up"}, "order"), ({"limit": "0"}, "limit"),
                                         ({"limit": "x"}, "limit"), ({"after": "zz"}, "after")])
def test_bad_input_items_queries_are_400s(query, param):
    with pytest.raises(cmp.ApiError) as info:
        cmp.input_items_page([{"id": "a"}], query)
    assert info.value.status == 400 and info.value.param == param


# ------------------------------------------------------------------------------------------------
# End to end: the openai client -> proxy -> the real CLI -> the fake upstream
# ------------------------------------------------------------------------------------------------

def tool_prompt(mark, args):
    return "weather? @@scenario:tool_use@@ @@args:%s@@ %s" % (json.dumps(args), mark)


@pytest.fixture
def client(e2e_proxy):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=e2e_proxy.url + "/v1", api_key="unused", max_retries=0,
                         http_client=spec_checked_http_client())


def test_openai_client_gets_the_same_text_streamed_and_not(client, upstream):
    mark = marker()
    plain = client.responses.create(model="claude-sonnet-4", input="Say hi " + mark)
    assert plain.object == "response" and plain.status == "completed" and plain.id.startswith("resp_")
    assert plain.output_text == TEXT
    assert [item.type for item in plain.output] == ["message"]
    assert plain.output[0].content[0].type == "output_text"
    assert plain.usage.input_tokens > 0 and plain.usage.output_tokens > 0
    assert plain.usage.total_tokens == plain.usage.input_tokens + plain.usage.output_tokens
    assert plain.model == only_request(upstream, mark)["model"]

    events = list(client.responses.create(model="claude-sonnet-4", input="Say hi " + marker(), stream=True))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == plain.output_text and len(deltas) >= 3
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[1].type == "response.in_progress"
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == TEXT and events[-1].response.usage.output_tokens > 0


def test_openai_client_stream_helper_collects_the_final_response(client):
    with client.responses.stream(model="claude-sonnet-4", input="Say hi " + marker()) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == TEXT and final.output_text == TEXT


def test_instructions_reach_the_upstream_system_prompt(client, upstream):
    mark = marker()
    instructions = "You are a pirate. " + uuid.uuid4().hex
    client.responses.create(model="claude-sonnet-4", instructions=instructions,
                            input=[{"role": "user", "content": [{"type": "input_text", "text": "hi " + mark}]}])
    sent = only_request(upstream, mark)
    system_text = "\n".join(b["text"] for b in sent["system"])
    assert instructions in system_text and len(system_text) < 1000


def test_previous_response_id_continues_the_conversation(client, upstream):
    mark = marker()
    first = client.responses.create(model="claude-sonnet-4", input="My name is Bob. " + mark)
    second = client.responses.create(model="claude-sonnet-4", input="And my name?",
                                     previous_response_id=first.id)
    assert second.output_text == TEXT and second.previous_response_id == first.id
    bodies = upstream.messages_requests(mark)
    assert len(bodies) == 2
    assert upstream_texts(bodies[1])[-3:] == [("user", "My name is Bob. " + mark), ("assistant", TEXT),
                                              ("user", "And my name?")]
    assert client.responses.retrieve(second.id).output_text == TEXT


@pytest.mark.parametrize("stream", [False, True])
def test_a_response_can_be_continued_at_once_over_a_new_connection(e2e_proxy, stream):
    mark = marker()
    status, _, raw = e2e_proxy.request("POST", "/v1/responses", {"input": "hi " + mark, "stream": stream})
    assert status == 200, raw
    first = json.loads(sse_payloads(raw)[-1])["response"] if stream else json.loads(raw)
    status, _, raw = e2e_proxy.request("POST", "/v1/responses", {"input": "again",
                                                                 "previous_response_id": first["id"]})
    assert status == 200, raw
    assert json.loads(raw)["previous_response_id"] == first["id"]


def openclaw_call_id(call_id, item_id):
    """How OpenClaw's Responses mode rewrites a call_id it sends back."""
    return "call_%s_fc_%s_%s" % (call_id, item_id.replace("fc_", ""), uuid.uuid4().hex[:8])


@pytest.mark.parametrize("via", ["previous_response_id", "items", "stream", "openclaw"])
def test_function_call_round_trip(client, upstream, e2e_proxy, via):
    mark, args = marker(), {"city": "Paris", "units": ["c", 1, None]}
    tools = [WEATHER]
    request = [{"role": "user", "content": tool_prompt(mark, args)}]
    first = client.responses.create(model="claude-sonnet-4", input=request, tools=tools)
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == args and call.call_id
    assert first.status == "completed"
    result = "Sunny, 21C " + uuid.uuid4().hex[:6]
    output = {"type": "function_call_output", "call_id": call.call_id, "output": result}
    if via in ("items", "openclaw"):
        items = request + [item.model_dump(exclude_none=True) for item in first.output] + [output]
        if via == "openclaw":
            wrapped = openclaw_call_id(call.call_id, call.id)
            items = [dict(item, call_id=wrapped) if item.get("call_id") else item for item in items]
        second = client.responses.create(model="claude-sonnet-4", input=items, tools=tools)
        text = second.output_text
    else:
        second = client.responses.create(model="claude-sonnet-4", input=[output], tools=tools,
                                         previous_response_id=first.id, stream=via == "stream")
        if via == "stream":
            text = "".join(e.delta for e in second if e.type == "response.output_text.delta")
        else:
            text = second.output_text
    assert text == "tool said: " + result
    bodies = upstream.messages_requests(mark)
    assert len(bodies) == 2
    results = [b for m in bodies[1]["messages"] if m["role"] == "user" and isinstance(m["content"], list)
               for b in m["content"] if b.get("type") == "tool_result"]
    assert [r["tool_use_id"] for r in results] == [cmp.cli_tool_id(call.call_id)]
    # The CLI process that made the call got the result: same conversation, either way it is sent.
    first_line = e2e_proxy.wait_for_line(" POST /v1/responses ")
    second_line = e2e_proxy.wait_for_line(" POST /v1/responses ", start=e2e_proxy.lines.index(first_line) + 1)
    assert " reused=1" not in first_line and " reused=1" in second_line


def test_streamed_function_call_arguments_arrive_as_events(client):
    args = {"city": "Oslo"}
    events = list(client.responses.create(model="claude-sonnet-4", input=tool_prompt(marker(), args),
                                          tools=[WEATHER], stream=True))
    added = [e.item for e in events if e.type == "response.output_item.added" and e.item.type == "function_call"]
    assert len(added) == 1 and added[0].name == "get_weather"
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(deltas) == json.loads(done.arguments) == args
    assert events[-1].type == "response.completed"


def test_unknown_or_unstored_previous_response_is_a_404(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model="claude-sonnet-4", input="hi", previous_response_id="resp_unknown")
    assert info.value.body["param"] == "previous_response_id"
    unstored = client.responses.create(model="claude-sonnet-4", input="hi " + marker(), store=False)
    assert unstored.output_text == TEXT and unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="claude-sonnet-4", input="again", previous_response_id=unstored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_hosted_tools_are_left_out_and_the_answer_says_so(e2e_proxy, upstream):
    mark = marker()
    status, headers, raw = e2e_proxy.request("POST", "/v1/responses", {
        "model": "claude-sonnet-4", "input": "search " + mark, "tools": [{"type": "web_search"}, WEATHER,
                                                                         {"type": "file_search"}]})
    assert status == 200, raw
    assert headers["x-claude-max-proxy-dropped-tools"] == "web_search,file_search"
    offered = [t["name"] for t in only_request(upstream, mark)["tools"]]
    assert [name for name in offered if "web_search" in name or "file_search" in name] == []
    assert [name for name in offered if name.endswith("get_weather")]
    assert " dropped_tools=web_search,file_search" in e2e_proxy.wait_for_line(headers["x-request-id"])


def test_errors_use_the_chat_envelope_and_statuses(e2e_proxy):
    status, _, raw = e2e_proxy.request("POST", "/v1/responses", {"model": "claude-sonnet-4",
                                                                 "input": "@@scenario:429@@ " + marker()})
    error = json.loads(raw)["error"]
    assert status == 429 and error["type"] == "rate_limit_error" and set(error) == {"message", "type", "param", "code"}
    status, _, raw = e2e_proxy.request("POST", "/v1/responses", {"model": "claude-sonnet-4",
                                                                 "input": "@@scenario:429@@ " + marker(),
                                                                 "stream": True})
    assert status == 429 and json.loads(raw)["error"]["type"] == "rate_limit_error"
    status, _, raw = e2e_proxy.request("POST", "/v1/responses", {"input": [{"role": "user", "content": 5}]})
    assert status == 400 and json.loads(raw)["error"]["param"] == "input[0].content"
    status, headers, _ = e2e_proxy.request("PUT", "/v1/responses/resp_x")
    assert status == 405 and headers["allow"] == "GET, DELETE, HEAD"


def test_max_output_tokens_finish_is_incomplete_streamed_and_not(e2e_proxy, upstream):
    mark = marker()
    body = {"model": "claude-sonnet-4", "input": "@@scenario:max_tokens@@ " + mark, "max_output_tokens": 77}
    status, _, raw = e2e_proxy.request("POST", "/v1/responses", body)
    assert status == 200, raw
    response = json.loads(raw)
    assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output_text"] == "This answer is cut"
    assert only_request(upstream, mark)["max_tokens"] == 77
    status, _, raw = e2e_proxy.request("POST", "/v1/responses", dict(body, input="@@scenario:max_tokens@@ " + marker(),
                                                                     stream=True))
    events = [json.loads(p) for p in sse_payloads(raw)]
    assert events[-1]["type"] == "response.incomplete"
    assert "[DONE]" not in raw.decode()


def test_a_dropped_upstream_mid_stream_ends_with_response_failed(e2e_proxy):
    status, _, raw = e2e_proxy.request("POST", "/v1/responses", {"model": "claude-sonnet-4", "stream": True,
                                                                 "input": "@@scenario:drop@@ " + marker()})
    if status != 200:  # the CLI reported the failure before any text: a plain HTTP error
        assert status == 502 and json.loads(raw)["error"]["type"] == "server_error"
        return
    events = [json.loads(p) for p in sse_payloads(raw)]
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "failed" and events[-1]["response"]["error"]["message"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_readme_states_the_store_bounds_the_code_uses():
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    section = readme[readme.index("## Responses API"):readme.index("## How it works")]
    assert "latest %d" % cmp.RESPONSE_STORE_ITEMS in section
    assert "%d MiB" % (cmp.RESPONSE_STORE_BYTES // 2 ** 20) in section
    assert cmp.RESPONSE_STORE_TTL == 3600 and "for an hour" in section


def json_values():
    from hypothesis import strategies as st
    scalars = st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(
        ["", "hi", "user", "assistant", "system", "developer", "function", "message", "function_call",
         "function_call_output", "input_text", "output_text", "input_image", "reasoning", "web_search",
         "json_schema", "json_object", "auto", "required", "none", "get_weather", "call_1", "{}", "\ud800",
         "data:image/png;base64," + PNG_1PX, "https://x.example/a.png"])
    keys = st.sampled_from(["type", "role", "content", "text", "image_url", "call_id", "name", "arguments",
                            "output", "format", "schema", "effort", "parameters", "description", "id"])
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                        max_leaves=20)


def test_any_responses_body_is_a_call_or_an_api_error():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st
    fields = st.fixed_dictionaries({}, optional={
        "input": json_values(), "instructions": json_values(), "tools": json_values(),
        "tool_choice": json_values(), "text": json_values(), "reasoning": json_values(),
        "max_output_tokens": json_values(), "stream": json_values()})

    @hypothesis.settings(max_examples=400, deadline=None, database=None)
    @hypothesis.given(fields)
    def check(body):
        try:
            call, conversation = call_for(body)
        except cmp.ApiError as exc:
            assert 400 <= exc.status < 500
            assert "messages" not in (exc.param or "")
            return
        assert call.prompt and isinstance(conversation, list)
        renderer(body, call).whole(TEXT_TURN, "m")

    check()


def ai_sdk_user(text):
    return {"role": "user", "content": [{"type": "input_text", "text": text}]}


def test_an_ai_sdk_second_turn_resolves_its_item_reference(e2e_proxy, upstream):
    # The Vercel AI SDK's openai provider (store on) sends its earlier answer back by reference.
    mark = marker()
    status, _, raw = e2e_proxy.request("POST", "/v1/responses", {"model": "claude-sonnet-4",
                                                                 "input": [ai_sdk_user("I am Bob. " + mark)]})
    assert status == 200, raw
    first = json.loads(raw)
    second_input = [ai_sdk_user("I am Bob. " + mark), {"type": "item_reference", "id": first["output"][0]["id"]},
                    ai_sdk_user("Who am I?")]
    status, _, raw = e2e_proxy.request("POST", "/v1/responses", {"model": "claude-sonnet-4", "input": second_input})
    assert status == 200, raw
    assert json.loads(raw)["output_text"] == TEXT
    bodies = upstream.messages_requests(mark)
    assert len(bodies) == 2 and upstream_texts(bodies[1])[-3:] == [
        ("user", "I am Bob. " + mark), ("assistant", TEXT), ("user", "Who am I?")]
    status, _, raw = e2e_proxy.request("POST", "/v1/responses", {"input": [
        ai_sdk_user("hi"), {"type": "item_reference", "id": "msg_unknown"}]})
    error = json.loads(raw)["error"]
    assert status == 404 and error["param"] == "input[1].id" and error["code"] == "item_not_found"


def test_a_stored_response_lists_its_input_items_can_be_deleted_and_is_not_cancellable(e2e_proxy):
    status, _, raw = e2e_proxy.request("POST", "/v1/responses", {"input": [
        {"role": "developer", "content": "Be brief."}, ai_sdk_user("hi " + marker())]})
    assert status == 200, raw
    response_id = json.loads(raw)["id"]
    status, _, raw = e2e_proxy.request("GET", "/v1/responses/%s/input_items?order=asc" % response_id)
    page = json.loads(raw)
    assert status == 200 and [item["role"] for item in page["data"]] == ["developer", "user"]
    assert page["first_id"] == page["data"][0]["id"] and page["has_more"] is False
    status, headers, raw = e2e_proxy.request("HEAD", "/v1/responses/" + response_id)
    assert status == 200 and raw == b"" and int(headers["content-length"]) > 0
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=e2e_proxy.url + "/v1", api_key="unused", max_retries=0,
                           http_client=spec_checked_http_client())
    assert [item.id for item in client.responses.input_items.list(response_id)] == [
        item["id"] for item in reversed(page["data"])]
    status, _, raw = e2e_proxy.request("POST", "/v1/responses/%s/cancel" % response_id)
    assert status == 400 and json.loads(raw)["error"]["code"] == "response_not_cancellable"
    status, _, raw = e2e_proxy.request("DELETE", "/v1/responses/" + response_id)
    assert status == 200 and json.loads(raw) == {"id": response_id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response_id)
    for method, path in (("GET", ""), ("GET", "/input_items"), ("DELETE", ""), ("POST", "/cancel")):
        assert e2e_proxy.request(method, "/v1/responses/" + response_id + path)[0] == 404


@pytest.fixture
def codex(real_claude):
    import real_cli
    import real_codex
    try:
        return real_codex.ensure_codex()
    except real_cli.RealCliUnavailable as exc:
        if os.environ.get("CLAUDE_MAX_PROXY_REQUIRE_E2E") == "1":
            pytest.fail("Codex CLI unavailable: %s" % exc)
        pytest.skip("Codex CLI unavailable: %s" % exc)


def codex_exec(codex, proxy, prompt, tmp_path):
    """`codex exec` (read-only sandbox, no approvals) against the proxy; (exit code, stdout)."""
    import real_codex
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    (home / "config.toml").write_text(real_codex.codex_config(proxy.url + "/v1", "claude-sonnet-4"))
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CODEX_HOME": str(home)}
    done = subprocess.run([codex, "exec", "--skip-git-repo-check", "--sandbox", "read-only", "-C", str(work), prompt],
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    return done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")


def test_codex_exec_answers_a_prompt_and_runs_a_shell_tool_loop(codex, e2e_proxy, upstream, tmp_path):
    mark = marker()
    code, out, err = codex_exec(codex, e2e_proxy, "Say hi " + mark, tmp_path)
    assert code == 0, err[-3000:]
    assert out.strip() == TEXT
    first = only_request(upstream, mark)
    offered = [t["name"] for t in first["tools"]]
    assert any(name.endswith("exec_command") for name in offered)
    assert any("multi_agent_v1__" in name for name in offered)  # its namespace tool, flattened
    mark = marker()
    code, out, err = codex_exec(codex, e2e_proxy, 'Run it. @@scenario:tool_use@@ @@tool:exec_command@@ '
                                '@@args:{"cmd":"echo hi-%s"}@@ %s' % (mark[-8:-2], mark), tmp_path)
    assert code == 0, err[-3000:]
    bodies = upstream.messages_requests(mark)
    assert len(bodies) == 2
    results = [b for m in bodies[1]["messages"] if m["role"] == "user" and isinstance(m["content"], list)
               for b in m["content"] if b.get("type") == "tool_result"]
    assert len(results) == 1 and "hi-%s" % mark[-8:-2] in json.dumps(results[0])
    assert out.strip().startswith("tool said:") and "hi-%s" % mark[-8:-2] in out
    assert e2e_proxy.wait_for_line(" dropped_tools=web_search") is not None  # Codex's hosted tool


# ------------------------------------------------------------------------------------------------
# The official OpenAPI document: every renderer shape, checked without a server
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def openapi():
    import openapi_check
    if openapi_check.spec() is None:
        pytest.skip("the OpenAI spec package is not installed (tests/run.sh installs it)")
    return openapi_check


@pytest.mark.parametrize("events,body", [
    (TEXT_TURN, None),
    (TOOL_TURN, {"input": "hi", "tools": [WEATHER]}),
    ([("reasoning", "Hmm."), ("text", "Done."), ("finish", "stop", USAGE)], None),
    ([("text", "Done."), ("finish", "stop", USAGE)], CODEX_REASONING),
    ([("text", "cut"), ("finish", "length", USAGE)], None),
    (CUSTOM_TURN, {"input": "hi", "tools": [APPLY_PATCH]}),
    ([("tool_call", 0, "toolu_1", "ns__spawn"), ("tool_args", 0, "{}"), ("finish", "tool_calls", USAGE)],
     {"input": "hi", "tools": [{"type": "namespace", "name": "ns", "description": "d", "tools": [
         {"type": "function", "name": "spawn", "parameters": {"type": "object"}, "strict": False}]},
         {"type": "web_search"}], "user": "u", "reasoning": {"summary": "auto"}}),
])
def test_every_response_and_event_conforms_to_the_openai_spec(openapi, events, body):
    render, out = streamed(events, body)
    failures = [f for _, payload in out for f in openapi.event_problems(payload)]
    failures += openapi.problems(render.response, "Response", "response")
    assert failures == []


def test_a_failed_response_and_the_stored_items_conform_to_the_openai_spec(openapi):
    render = renderer()
    out = render.stream_events(("text", "partial"), "m") + render.stream_error(
        cmp.ApiError(502, "the Claude CLI exited", "server_error", "cli_failed"))
    assert [f for _, payload in out for f in openapi.event_problems(payload)] == []
    inputs = cmp.input_item_resources([{"role": "developer", "content": "d"}, {"role": "user", "content": [
        {"type": "input_text", "text": "hi"}]}, STORED_MESSAGE, STORED_CALL,
        {"type": "custom_tool_call", "call_id": "call_2", "name": "apply_patch", "input": "x"},
        {"type": "custom_tool_call_output", "call_id": "call_2", "output": "ok"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sun"}])
    assert openapi.problems(cmp.input_items_page(inputs, {}), "ResponseItemList", "input_items") == []
