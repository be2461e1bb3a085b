"""Pure translation, both ways: OpenAI request -> CliCall -> argv/env/stdin/session file, and CLI
stream-json events -> TurnEvents -> OpenAI chunks / completion; plus config_from and the tables.

No processes and no sockets: every function under test takes plain data and returns plain data.
Event shapes are those the real CLI prints (see tests/fake_claude.py).
"""

import dataclasses
import json
import os
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


def block_start():
    return stream_event({"type": "content_block_start", "index": 0,
                         "content_block": {"type": "text", "text": ""}})


def text_delta(piece):
    return stream_event({"type": "content_block_delta", "index": 0,
                         "delta": {"type": "text_delta", "text": piece}})


def assistant_event(answer):
    return {"type": "assistant", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
        "content": [text(answer)], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 3}},
        "parent_tool_use_id": None, "session_id": SESSION, "uuid": "u"}


def block_stop():
    return stream_event({"type": "content_block_stop", "index": 0})


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


def translate(events, stop=()):
    translator = cmp.TurnTranslator(tuple(stop))
    out = []
    for event in events:
        out += translator.feed(event)
    return translator, out


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
}


def test_invalid_samples_cover_every_parameter():
    assert set(INVALID_SAMPLES) == set(cmp.PARAMETERS) - {"model", "messages"}


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
    ([{"type": "image_url", "image_url": {"url": "data:,"}}], "messages[2].content[0]",
     "unsupported_content"),
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
    ([user("a"), msg("tool", "x")], "messages[1].role"),
    ([user("a"), msg("function", "x")], "messages[1].role"),
    ([{"content": "x"}], "messages[0].role"),
    ([user("a"), user(5)], "messages[1].content"),
    ([system({"x": 1}), user("a")], "messages[0].content"),
    ([user("a"), assistant([{"type": "text", "text": 1}])], "messages[1].content[0].text"),
    ([user([{"type": "image_url", "image_url": {"url": "x"}}])], "messages[0].content[0]"),
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


def test_tools_are_refused_rather_than_silently_dropped():
    # Tools are off in every CLI call; answering a tool-calling request with plain text would
    # break the client's loop silently (tool-role messages already get a 400).
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    error = error_of(call_for, user("hi"), tools=[tool])
    assert (error.status, error.param) == (400, "tools")


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
messages_strategy = st.one_of(
    st.fixed_dictionaries({
        "role": st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
                          json_scalars),
        "content": contents}),
    json_values)
plain_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                           "content": st.text(max_size=10)}),
    max_size=3).map(lambda messages: messages + [user("question")])
param_values = st.one_of(
    json_values,
    st.sampled_from([None, True, False, 0, 1, 2, 0.5, 64, "x", "opus", "claude-max/sonnet",
                     "gpt-4", "claude-x-1", {}, {"include_usage": True}, ["END"]]),
    st.lists(st.text(min_size=1, max_size=3), max_size=5))
bodies = st.builds(
    lambda messages, params: dict(params, messages=messages),
    st.one_of(plain_messages, st.lists(messages_strategy, max_size=5), json_values),
    st.dictionaries(st.sampled_from(list(cmp.PARAMETERS)), param_values, max_size=3))


@PROPERTY
@given(st.one_of(bodies, json_values))
@example({"messages": [{"role": "user", "content": "hi"}]})
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
    assert all(block["type"] == "text" and block["text"] for t in turns for block in t["content"])


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


def test_cli_env_for_keeps_the_environment_and_sets_retries():
    environ = {"PATH": "/bin", "HOME": "/home/u", "CLAUDE_CODE_MAX_RETRIES": "10"}
    before = dict(environ)
    env = cmp.cli_env_for(call_for(user("hi")), config(cli_max_retries=5), environ)
    assert environ == before
    assert env["PATH"] == "/bin" and env["HOME"] == "/home/u"
    assert env["CLAUDE_CODE_MAX_RETRIES"] == "5"
    assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert all(isinstance(v, str) for v in env.values())


def test_cli_env_for_respects_an_explicit_nonessential_traffic_setting():
    env = cmp.cli_env_for(call_for(user("hi")), config(),
                          {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "0"})
    assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "0"


def test_stdin_line_for():
    blocks = [text("héllo\nwörld"), text("two")]
    line = cmp.stdin_line_for(blocks)
    assert isinstance(line, bytes) and line.endswith(b"\n") and line.count(b"\n") == 1
    line.decode("ascii")  # escaped: no encoding can go wrong between us and the CLI
    assert json.loads(line.decode("utf-8")) == {
        "type": "user", "message": {"role": "user", "content": blocks}}


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


def test_rate_limit_without_reset_time_has_no_retry_after():
    assert cmp.error_from_result(error_result(429, "rate limited")).headers == {}


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
    translator = cmp.TurnTranslator(("STOP",))
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


def test_completion_from():
    usage = cmp.usage_from({"input_tokens": 5, "output_tokens": 2})
    completion = cmp.completion_from([("text", "a"), ("text", "b"), ("finish", "length", usage)],
                                     "chatcmpl-9", 123, "claude-opus-4")
    assert completion == {
        "id": "chatcmpl-9", "object": "chat.completion", "created": 123, "model": "claude-opus-4",
        "system_fingerprint": None,
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


def test_default_workdir_follows_the_given_environment():
    cfg = cmp.config_from(parsed(), {"XDG_CACHE_HOME": "/xdg-cache"})
    assert cfg.workdir == os.path.join("/xdg-cache", "claude-max-proxy", "cwd")


def test_unknown_default_model_is_a_config_error():
    # "Validated once": otherwise every request without `model` would get a 404 naming a model
    # the client never sent.
    with pytest.raises(cmp.ConfigError):
        cmp.config_from(parsed("--default-model", "gpt-4o"), {})
