"""The process pool and the turn against a scripted fake run: no CLI process, milliseconds each.

A FakeRun stands in for CliRun: it answers each turn with the CLI events its script gives and
records what the pool asked of it (started warm or not, next turns, closes). The pool's counts
must come back to no busy slot on every path, which a slot released twice (or never) would break.
"""

import dataclasses
import threading
import time

import pytest

import claude_max_proxy as cmp
from conftest import wait_until

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def text_answer(text):
    """The CLI events of an answer with `text` that ends its turn."""
    return [stream({"type": "message_start", "message": {"model": "claude-sonnet-4-5", "usage": {}}}),
            stream({"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}),
            stream({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
            stream({"type": "content_block_stop", "index": 0}),
            stream({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {}}),
            stream({"type": "message_stop"})]


def tool_call_answer(tool_use_id):
    return [stream({"type": "message_start", "message": {"model": "claude-sonnet-4-5", "usage": {}}}),
            stream({"type": "content_block_start", "index": 0, "content_block": {
                "type": "tool_use", "id": tool_use_id, "name": cmp.MCP_PREFIX + "get_weather"}}),
            stream({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": '{"city": "Oslo"}'}}),
            stream({"type": "content_block_stop", "index": 0}),
            stream({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {}}),
            stream({"type": "message_stop"})]


def stream(event):
    return {"type": "stream_event", "event": event}


ERROR_RESULT = [{"type": "result", "subtype": "success", "is_error": True, "api_error_status": 500,
                 "result": "API Error: 500 upstream broke"}]


class FakeRun:
    """A scripted CliRun: `script` gives each turn's CLI events (a list), in order."""

    def __init__(self, call, config, claude_path, observe=None):
        self.call, self.script = call, list(SCRIPTS.pop(0)) if SCRIPTS else []
        self.warm = None
        self.turns = []      # (call, tool results) of each turn after the first
        self.closed = 0
        self.alive = True
        self.result_seen = False
        self.keeps_transcript = False
        self.control_requests = []
        self.replies = list(REPLIES)  # the CLI's answer to the turn: reseat needs one
        self.reseated = []   # (blocks, replies) of each reseat
        self.first_prompt_id = "first-line" if BEGAN_HERE else ""  # recyclable when set
        self.rewound = []    # the lines it was rewound to
        MADE.append(self)

    def start(self, send_prompt=True):
        if FAIL_START:
            raise cmp.ApiError(503, "cannot start the Claude CLI", "server_error", "cli_unavailable")
        self.warm = not send_prompt
        return self

    def initialize(self, timeout):
        return True

    def next_turn(self, call, results):
        self.call = call
        self.turns.append((call, results))

    def events(self, deadline, idle_timeout, client_gone=lambda: False):
        for event in self.script.pop(0) if self.script else []:
            if client_gone():
                raise cmp.ClientGone()
            yield event

    def on_control_request(self, event):
        self.control_requests.append(event)

    def rewind(self, line_id, timeout):
        self.rewound.append(line_id)
        return REWIND_WORKS

    def reseat(self, blocks, replies, timeout):
        self.reseated.append((blocks, replies))
        return RESEAT_WORKS

    def wait_for_result(self, timeout):
        self.result_seen = True
        return True

    def running(self):
        return self.alive and not self.closed

    def failure(self):
        return cmp.ApiError(502, "the Claude CLI exited without an answer", "server_error", "cli_failed")

    def close(self):
        self.closed += 1


SCRIPTS = []    # per FakeRun made, in order: its turns' CLI events
MADE = []       # every FakeRun made, in order
FAIL_START = False
REPLIES = []    # what each FakeRun holds as its CLI's answer (none: it cannot be reseated)
RESEAT_WORKS = True
BEGAN_HERE = False  # each FakeRun's conversation began on its stdin (so it can be rewound to nothing)
REWIND_WORKS = True


class FakeClaude:
    version = "2.1.332 (Claude Code)"

    def resolve(self):
        return "claude"


@pytest.fixture(autouse=True)
def fresh_script():
    global FAIL_START, RESEAT_WORKS, BEGAN_HERE, REWIND_WORKS
    SCRIPTS.clear()
    MADE.clear()
    REPLIES.clear()
    FAIL_START, RESEAT_WORKS, BEGAN_HERE, REWIND_WORKS = False, True, False, True
    yield
    SCRIPTS.clear()
    MADE.clear()


def pool_with(**settings):
    config = dataclasses.replace(cmp.Config(), **dict({"warm": 0}, **settings))
    return cmp.ProcessPool(config, FakeClaude(), lambda event: None, run_class=FakeRun)


def chat(messages, tools=None, **extra):
    body = dict({"model": "claude-sonnet-4", "messages": messages}, **extra)
    if tools:
        body["tools"] = tools
    return cmp.cli_call_for(body, cmp.Config())


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def run_turn(pool, call, client_gone=lambda: False):
    """One turn through the pool: (its TurnEvents, whether it reused a process, its run)."""
    with pool.turn(call, client_gone) as turn:
        events = list(turn)
        return events, turn.reused, turn.run


def assert_no_slot_held(pool, kept=0):
    counts = pool.counts()
    assert counts["busy"] == 0, counts
    assert counts["loading"] + counts["warm"] + counts["parked"] + counts["predicted"] == kept, counts
    assert pool.waiting == 0


# ---- reuse ----------------------------------------------------------------------------------------

def test_the_next_turn_of_a_conversation_continues_in_the_parked_process():
    SCRIPTS.append([text_answer("one"), text_answer("two")])
    pool = pool_with()
    events, reused, first = run_turn(pool, chat([user("hi")]))
    assert events[0] == ("text", "one") and events[-1][:2] == ("finish", "stop") and not reused
    assert pool.counts()["parked"] == 1 and first.closed == 0

    second_call = chat([user("hi"), assistant("one"), user("and?")])
    events, reused, second = run_turn(pool, second_call)
    assert reused and second is first and events[0] == ("text", "two")
    assert first.turns == [(second_call, {})]
    assert pool.counts()["hits"] == 1 and pool.counts()["misses"] == 1
    assert_no_slot_held(pool, kept=1)


@pytest.mark.parametrize("history", [
    [user("hi"), assistant("something else"), user("and?")],   # the client edited the answer
    [user("hello"), assistant("one"), user("and?")],           # another conversation
])
def test_a_conversation_that_differs_starts_a_new_process(history):
    SCRIPTS.extend([[text_answer("one")], [text_answer("fresh")]])
    pool = pool_with()
    _, _, first = run_turn(pool, chat([user("hi")]))
    events, reused, second = run_turn(pool, chat(history))
    assert not reused and second is not first and events[0] == ("text", "fresh")
    assert first.turns == [] and first.closed == 0  # still parked for its own conversation
    assert pool.counts()["misses"] == 2
    assert_no_slot_held(pool, kept=2)


def test_a_settings_change_is_another_conversation():
    SCRIPTS.extend([[text_answer("one")], [text_answer("two")]])
    pool = pool_with()
    run_turn(pool, chat([user("hi")]))
    _, reused, _ = run_turn(pool, chat([user("hi"), assistant("one"), user("and?")], max_tokens=5))
    assert not reused


def test_a_parked_process_that_died_is_ended_and_the_turn_starts_cold():
    SCRIPTS.extend([[text_answer("one")], [text_answer("cold")]])
    pool = pool_with()
    _, _, first = run_turn(pool, chat([user("hi")]))
    first.alive = False
    events, reused, second = run_turn(pool, chat([user("hi"), assistant("one"), user("and?")]))
    assert not reused and second is not first and first.closed == 1
    assert events[0] == ("text", "cold")
    assert_no_slot_held(pool, kept=1)


PNG_1PX = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def test_a_process_keeping_its_transcript_gets_no_turn_with_an_image():
    # Such a CLI saves a sent image to disk and tells the model its path: not the client's turn.
    SCRIPTS.extend([[text_answer("one")], [text_answer("cold")]])
    pool = pool_with()
    _, _, first = run_turn(pool, chat([user("hi")]))
    first.keeps_transcript = True
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_1PX}}
    events, reused, second = run_turn(pool, chat([user("hi"), assistant("one"),
                                                  user([{"type": "text", "text": "and this?"}, image])]))
    assert not reused and second is not first and first.closed == 1
    assert events[0] == ("text", "cold")
    assert_no_slot_held(pool, kept=1)


def test_with_parking_off_every_process_ends_after_its_turn():
    SCRIPTS.append([text_answer("one")])
    pool = pool_with(max_parked=0)
    _, _, run = run_turn(pool, chat([user("hi")]))
    assert run.closed == 1
    assert_no_slot_held(pool)


def test_an_answer_cut_by_a_stop_string_is_not_parked():
    SCRIPTS.append([text_answer("one STOP two")])
    pool = pool_with()
    events, _, run = run_turn(pool, chat([user("hi")], stop=["STOP"]))
    assert events[0] == ("text", "one ") and run.closed == 1
    assert_no_slot_held(pool)


# ---- tool calls ------------------------------------------------------------------------------------

def tool_history():
    return [user("weather?"), {"role": "assistant", "content": None, "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]


def test_a_tool_call_is_parked_and_resumed_with_the_clients_results():
    SCRIPTS.append([tool_call_answer("toolu_1"), text_answer("sunny")])
    pool = pool_with()
    events, _, first = run_turn(pool, chat([user("weather?")], tools=TOOLS))
    assert [e[0] for e in events] == ["tool_call", "tool_args", "finish"] and events[-1][1] == "tool_calls"
    assert pool.counts()["parked"] == 1

    call = chat(tool_history() + [{"role": "tool", "tool_call_id": "toolu_1", "content": "12 C"}], tools=TOOLS)
    events, reused, second = run_turn(pool, call)
    assert reused and second is first and events[0] == ("text", "sunny")
    assert first.turns == [(call, {"toolu_1": "12 C"})]
    assert_no_slot_held(pool, kept=1)


def test_text_for_a_process_waiting_on_a_tool_call_starts_afresh():
    SCRIPTS.extend([[tool_call_answer("toolu_1")], [text_answer("fresh")]])
    pool = pool_with()
    _, _, first = run_turn(pool, chat([user("weather?")], tools=TOOLS))
    first_key_history = tool_history()
    # Same earlier turns as the parked process, but the new turn is text, not the tool's result.
    events, reused, second = run_turn(pool, chat(first_key_history + [user("skip it")], tools=TOOLS))
    assert not reused and second is not first and first.closed == 1
    assert events[0] == ("text", "fresh")
    assert_no_slot_held(pool, kept=1)


def test_control_requests_go_to_the_runner():
    question = {"type": "control_request", "request_id": "r1", "request": {"subtype": "can_use_tool"}}
    SCRIPTS.append([[question] + text_answer("one")])
    pool = pool_with()
    _, _, run = run_turn(pool, chat([user("hi")]))
    assert run.control_requests == [question]


# ---- slots: released exactly once on every path --------------------------------------------------

def test_an_error_result_ends_the_process_and_frees_its_slot():
    SCRIPTS.append([ERROR_RESULT])
    pool = pool_with()
    with pytest.raises(cmp.ApiError) as caught:
        run_turn(pool, chat([user("hi")]))
    assert caught.value.status == 502 and "upstream broke" in caught.value.message and MADE[0].closed == 1
    assert_no_slot_held(pool)


def test_a_cli_that_ends_without_an_answer_is_a_502_and_frees_its_slot():
    SCRIPTS.append([text_answer("cut")[:3]])
    pool = pool_with()
    with pytest.raises(cmp.ApiError) as caught:
        run_turn(pool, chat([user("hi")]))
    assert caught.value.status == 502 and MADE[0].closed == 1
    assert_no_slot_held(pool)


def test_a_process_that_fails_to_start_frees_its_slot():
    global FAIL_START
    FAIL_START = True
    pool = pool_with()
    with pytest.raises(cmp.ApiError):
        run_turn(pool, chat([user("hi")]))
    assert_no_slot_held(pool)


def test_a_client_that_goes_away_mid_turn_ends_the_process():
    SCRIPTS.append([text_answer("one")])
    pool = pool_with()
    seen = []
    with pytest.raises(cmp.ClientGone):
        run_turn(pool, chat([user("hi")]), client_gone=lambda: seen.append(1) or len(seen) > 2)
    assert MADE[0].closed == 1
    assert_no_slot_held(pool)


def test_a_client_that_stops_reading_after_the_first_event_ends_the_process():
    SCRIPTS.append([text_answer("one")])
    pool = pool_with()
    with pytest.raises(BrokenPipeError):
        with pool.turn(chat([user("hi")]), lambda: False) as turn:
            for _ in turn:
                raise BrokenPipeError()  # the handler's write failed
    assert MADE[0].closed == 1
    assert_no_slot_held(pool)


def test_a_kept_process_takes_no_answering_slot():
    SCRIPTS.extend([[text_answer("one")], [text_answer("two")]])
    pool = pool_with(max_concurrency=1, max_parked=4)
    _, _, first = run_turn(pool, chat([user("hi")]))
    assert pool.counts()["parked"] == 1
    assert pool.try_acquire()  # the one answering slot is free although a process is kept
    pool._end(None)
    _, reused, second = run_turn(pool, chat([user("another")]))
    assert not reused and first.closed == 0 and second.closed == 0
    assert_no_slot_held(pool, kept=2)


def test_the_kept_cap_is_its_own_and_ends_the_oldest_past_it():
    SCRIPTS.extend([[text_answer("one")], [text_answer("two")], [text_answer("three")]])
    pool = pool_with(max_concurrency=1, max_parked=2)
    runs = [run_turn(pool, chat([user(text)]))[2] for text in ("a", "b", "c")]
    assert [run.closed for run in runs] == [1, 0, 0]
    assert_no_slot_held(pool, kept=2)


@pytest.mark.parametrize("total, available, kept", [
    (None, None, cmp.FALLBACK_MAX_KEPT),           # the machine does not say
    (24683656 * 1024, 24137428 * 1024, 19),        # this 23.5 GB VM: a quarter of RAM / 320 MB
    (24683656 * 1024, 2 * 10 ** 9, 3),             # most of it in use: half of what is available
    (4 * 10 ** 9, None, 3),                        # a small machine (macOS gives no "available")
    (1 * 10 ** 9, 10 ** 8, 1),                     # never below one
    (1024 * 10 ** 9, 1000 * 10 ** 9, cmp.MAX_KEPT_DEFAULT),  # nor above the sane maximum
])
def test_the_kept_cap_defaults_from_memory(total, available, kept):
    assert cmp.default_max_parked(total, available) == kept


def test_the_machines_memory_is_read():
    total, available = cmp.machine_memory()
    assert total is None or total > 0 and (available is None or 0 < available <= total)
    assert cmp.Config().max_parked == cmp.default_max_parked(total, available)


def test_parking_past_the_limit_ends_the_oldest():
    SCRIPTS.extend([[text_answer("one")], [text_answer("two")]])
    pool = pool_with(max_parked=1)
    _, _, first = run_turn(pool, chat([user("hi")]))
    _, _, second = run_turn(pool, chat([user("another")]))
    assert first.closed == 1 and second.closed == 0
    assert_no_slot_held(pool, kept=1)


def test_expired_processes_are_ended():
    SCRIPTS.append([text_answer("one")])
    pool = pool_with(parked_ttl=0.0)
    _, _, run = run_turn(pool, chat([user("hi")]))
    pool.expire()
    assert run.closed == 1
    assert_no_slot_held(pool)


def test_a_busy_pool_with_a_full_queue_answers_429():
    SCRIPTS.append([text_answer("one")])
    pool = pool_with(max_concurrency=1, max_queue=0)
    with pool.turn(chat([user("hi")]), lambda: False):
        with pytest.raises(cmp.ApiError) as caught:
            pool.acquire(1.0, lambda: False)
    assert caught.value.status == 429 and caught.value.headers["Retry-After"] == "1"
    assert_no_slot_held(pool)


def test_a_waiting_request_gets_the_slot_a_finished_turn_frees():
    SCRIPTS.extend([[text_answer("one")], [text_answer("two")]])
    pool = pool_with(max_concurrency=1, max_parked=0)
    got = []
    with pool.turn(chat([user("hi")]), lambda: False) as turn:
        list(turn)
        waiter = threading.Thread(target=lambda: got.append(run_turn(pool, chat([user("next")]))))
        waiter.start()
        wait_until(lambda: pool.waiting == 1, 5, "the second request to queue")
    waiter.join(5)
    assert got and got[0][0][0] == ("text", "two")
    assert_no_slot_held(pool)


def test_a_client_that_leaves_the_queue_takes_no_slot():
    SCRIPTS.append([text_answer("one")])
    pool = pool_with(max_concurrency=1, max_parked=0)
    with pool.turn(chat([user("hi")]), lambda: False):
        with pytest.raises(cmp.ClientGone):
            pool.acquire(5.0, lambda: True)
        assert pool.waiting == 0
    assert_no_slot_held(pool)


# ---- warm processes --------------------------------------------------------------------------------

def test_a_first_turn_leaves_a_warm_process_for_the_next_first_turn():
    SCRIPTS.extend([[text_answer("one")], [text_answer("from warm")]])
    pool = pool_with(warm=1)
    _, reused, first = run_turn(pool, chat([user("hi")]))
    assert not reused
    wait_until(lambda: pool.counts()["warm"] == 1, 5, "a warm process")
    warm = MADE[1]
    assert warm.warm is True

    events, reused, run = run_turn(pool, chat([user("a new conversation")]))
    assert reused and run is warm and events[0] == ("text", "from warm")
    assert warm.turns[0][1] == {}  # its first prompt went in as the next turn


def test_a_first_turn_with_tools_leaves_a_warm_process_with_those_tools():
    SCRIPTS.extend([[tool_call_answer("toolu_1")], [tool_call_answer("toolu_2")]])
    pool = pool_with(warm=1)
    run_turn(pool, chat([user("weather?")], tools=TOOLS))
    wait_until(lambda: pool.counts()["warm"] == 1, 5, "a warm process")
    assert MADE[1].warm is True and MADE[1].call.tools == chat([user("x")], tools=TOOLS).tools
    events, reused, run = run_turn(pool, chat([user("weather in Rome?")], tools=TOOLS))
    assert reused and run is MADE[1] and events[0][0] == "tool_call"


def test_no_warm_process_when_parking_or_warm_is_off():
    SCRIPTS.extend([[text_answer("one")], [text_answer("two")]])
    off = pool_with(warm=1, max_parked=0)
    run_turn(off, chat([user("hi")]))
    none = pool_with(warm=0)
    run_turn(none, chat([user("hi")]))
    assert len(MADE) == 2  # no third run was started for either pool
    assert_no_slot_held(off)


class Gate:
    """FakeRun.initialize held until `event` is set: a kept process still loading."""

    def __init__(self):
        self.event = threading.Event()
        self.entered = threading.Event()

    def initialize(self, run, timeout):
        self.entered.set()
        return self.event.wait(timeout)


@pytest.fixture
def gate(monkeypatch):
    """Every FakeRun's initialize held by one Gate."""
    held = Gate()
    monkeypatch.setattr(FakeRun, "initialize", lambda self, timeout: held.initialize(self, timeout))
    return held


def test_a_first_turn_takes_a_warm_process_still_loading_instead_of_starting_another(gate):
    SCRIPTS.extend([[text_answer("one")], [text_answer("from the loading one")]])
    pool = pool_with(warm=1)
    run_turn(pool, chat([user("hi")]))
    wait_until(gate.entered.is_set, 5, "the warm process to start loading")
    assert pool.counts()["loading"] == 1 and pool.counts()["warm"] == 0
    got = []
    taker = threading.Thread(target=lambda: got.append(run_turn(pool, chat([user("a new conversation")]))))
    taker.start()
    wait_until(lambda: pool.counts()["busy"] == 1 and pool.counts()["loading"] == 0, 5, "the request to take it")
    assert len(MADE) == 2  # it waits for the loading process rather than starting its own
    gate.event.set()
    taker.join(5)
    events, reused, run = got[0]
    assert reused and run is MADE[1] and events[0] == ("text", "from the loading one")


def test_a_first_turn_whose_loading_process_fails_starts_cold(monkeypatch):
    SCRIPTS.extend([[text_answer("one")], [], [text_answer("cold")]])
    gate = Gate()
    monkeypatch.setattr(FakeRun, "initialize", lambda self, timeout: gate.initialize(self, timeout) and False)
    pool = pool_with(warm=1)
    run_turn(pool, chat([user("hi")]))
    wait_until(gate.entered.is_set, 5, "the warm process to start loading")
    got = []
    taker = threading.Thread(target=lambda: got.append(run_turn(pool, chat([user("a new conversation")]))))
    taker.start()
    wait_until(lambda: pool.counts()["loading"] == 0, 5, "the request to take it")
    gate.event.set()
    taker.join(5)
    events, reused, run = got[0]
    assert not reused and run is MADE[2] and events[0] == ("text", "cold") and MADE[1].closed == 1


def test_warm_processes_follow_recent_demand_for_their_shape():
    SCRIPTS.extend([[text_answer(n)] for n in ("one", "two", "three", "four")])
    pool = pool_with(warm=3, max_parked=10)
    for n in range(3):
        _, reused, _ = run_turn(pool, chat([user("conversation %d" % n)]))
        assert reused == (n > 0)
        wait_until(lambda: pool.counts()["warm"] == n + 1, 5, "%d warm processes" % (n + 1))
    run_turn(pool, chat([user("conversation 4")]))
    wait_until(lambda: pool.counts()["warm"] == 3, 5, "3 warm processes")
    assert len(MADE) == 7  # the first cold one, then 1, 2, 2 and 1 started as the demand grew: never past --warm
    assert pool.counts()["parked"] == 4


def test_prestart_at_start_up_keeps_the_number_asked_for():
    pool = pool_with(warm=3)
    assert pool.prestart(chat([user(".")]), 2) == 2
    wait_until(lambda: pool.counts()["warm"] == 2, 5, "2 warm processes")
    assert pool.prestart(chat([user(".")]), 2) == 0 and len(MADE) == 2
    assert all(run.warm for run in MADE)


def test_warm_loads_take_turns(monkeypatch, gate):
    monkeypatch.setattr(cmp, "LOADS_AT_ONCE", 1)
    pool = pool_with(warm=2)
    assert pool.prestart(chat([user(".")]), 2) == 2
    wait_until(gate.entered.is_set, 5, "a load to begin")
    assert sum(run.warm is True for run in MADE) == 1  # the other waits for its turn
    assert pool.counts()["loading"] == 2
    gate.event.set()
    wait_until(lambda: pool.counts()["warm"] == 2, 5, "both loaded")
    assert all(run.warm for run in MADE)


def test_loads_leave_the_cores_of_answering_processes_to_them(monkeypatch, gate):
    monkeypatch.setattr(cmp, "LOADS_AT_ONCE", 2)
    pool = pool_with(warm=2)
    assert pool.try_acquire()  # one process answering: one core left for loads
    assert pool.prestart(chat([user(".")]), 2) == 2
    wait_until(gate.entered.is_set, 5, "a load to begin")
    assert sum(run.warm is True for run in MADE) == 1  # the other waits for a core
    pool._end(None)  # the answer is over: its core goes to the waiting load
    wait_until(lambda: sum(run.warm is True for run in MADE) == 2, 5, "the second load to begin")
    gate.event.set()
    wait_until(lambda: pool.counts()["warm"] == 2, 5, "both loaded")


def test_shapes_are_remembered_least_recently_seen_first_forgotten(monkeypatch):
    monkeypatch.setattr(cmp, "WARM_SHAPES", 2)
    SCRIPTS.extend([[text_answer(n)] for n in "abc"])
    pool = pool_with(warm=1, max_parked=0)
    calls = [chat([{"role": "system", "content": name}, user("hi")]) for name in "abc"]
    for call in calls:
        run_turn(pool, call)
    assert list(pool.demand.times) == [cmp.conversation_key(c, []) for c in calls[1:]]


def test_a_full_pool_ends_a_warm_spare_before_a_parked_conversation():
    SCRIPTS.extend([[text_answer("one")], [], [text_answer("two")]])
    pool = pool_with(warm=1, max_parked=2)
    _, _, conversation = run_turn(pool, chat([user("hi")]))
    wait_until(lambda: pool.counts()["warm"] == 1, 5, "a warm process")
    spare = MADE[1]
    _, _, other = run_turn(pool, chat([{"role": "system", "content": "another shape"}, user("hi")]))
    assert spare.closed == 1 and conversation.closed == 0 and other.closed == 0
    assert len(MADE) == 3  # no warm process for the second shape: it would end a conversation
    assert_no_slot_held(pool, kept=2)


def test_past_the_cap_a_loading_spare_is_cancelled_before_a_parked_conversation_ends(gate):
    SCRIPTS.extend([[text_answer("one")], [], [text_answer("two")]])
    pool = pool_with(warm=1, max_parked=2)
    _, _, conversation = run_turn(pool, chat([user("hi")]))
    wait_until(gate.entered.is_set, 5, "the warm process to start loading")
    _, _, other = run_turn(pool, chat([{"role": "system", "content": "another shape"}, user("hi")]))
    assert conversation.closed == 0 and other.closed == 0 and pool.counts()["parked"] == 2
    gate.event.set()
    wait_until(lambda: MADE[1].closed, 5, "the cancelled load to be ended by its loader")
    assert len(MADE) == 3
    assert_no_slot_held(pool, kept=2)


def test_closing_the_pool_ends_kept_and_loading_processes(gate):
    SCRIPTS.append([text_answer("one")])
    pool = pool_with(warm=1)
    _, _, parked = run_turn(pool, chat([user("hi")]))
    wait_until(gate.entered.is_set, 5, "the warm process to start loading")
    closer = threading.Thread(target=pool.close)
    closer.start()
    wait_until(lambda: MADE[1].closed, 5, "the loading process to be ended")
    gate.event.set()  # what a killed CLI does to its initialize: it ends
    closer.join(5)
    assert parked.closed == 1 and MADE[1].closed >= 1
    assert pool.prestart(chat([user("hi")]), 1) == 0
    assert_no_slot_held(pool)


def test_a_warm_process_that_fails_to_load_frees_its_slot(monkeypatch):
    SCRIPTS.append([text_answer("one")])
    monkeypatch.setattr(FakeRun, "initialize", lambda self, timeout: False)
    pool = pool_with(warm=1)
    run_turn(pool, chat([user("hi")]))
    wait_until(lambda: len(MADE) == 2 and MADE[1].closed == 1, 5, "the warm start to fail")
    wait_until(lambda: pool.counts()["busy"] == 0, 5, "its slot back")
    assert_no_slot_held(pool, kept=1)


# ---- first turns that find no warm process: a parked conversation rewound to nothing ---------------

@pytest.fixture
def began_here():
    global BEGAN_HERE
    BEGAN_HERE = True


def test_a_first_turn_without_a_warm_process_takes_a_parked_conversation_rewound(began_here):
    SCRIPTS.extend([[text_answer("a"), text_answer("b")], [text_answer("more")]])
    pool = pool_with()
    _, _, a = run_turn(pool, chat([user("A")]))
    assert pool.counts()["parked"] == 1
    call = chat([user("B")])
    events, reused, run = run_turn(pool, call)
    assert reused and run is a and a.rewound == ["first-line"]
    assert events[0] == ("text", "b") and a.turns == [(call, {})] and len(MADE) == 1
    assert_no_slot_held(pool, kept=1)  # parked again, now for B's conversation
    _, reused, _ = run_turn(pool, chat([user("A"), assistant("a"), user("more")]))
    assert not reused  # A's conversation goes on in a new process


def test_a_conversation_that_has_waited_less_than_conversations_lately_did_is_not_rewound(began_here, monkeypatch):
    real, later = time.monotonic, [0.0]
    monkeypatch.setattr(cmp.time, "monotonic", lambda: real() + later[0])  # a clock that can skip ahead
    SCRIPTS.extend([[text_answer("a1"), text_answer("a2"), text_answer("c")], [text_answer("b")]])
    pool = pool_with()
    _, _, a = run_turn(pool, chat([user("A")]))
    later[0] += 30  # A's next turn comes 30 s after its answer
    _, reused, _ = run_turn(pool, chat([user("A"), assistant("a1"), user("A2")]))
    assert reused
    _, reused, b = run_turn(pool, chat([user("B")]))  # A has waited less than 30 s this time
    assert not reused and b is MADE[1] and a.rewound == []
    later[0] += 31
    _, reused, run = run_turn(pool, chat([user("C")]))
    assert reused and run is a and a.rewound == ["first-line"]


def test_only_a_conversation_of_the_same_shape_is_rewound(began_here):
    SCRIPTS.extend([[text_answer("a")], [text_answer("other")]])
    pool = pool_with()
    _, _, a = run_turn(pool, chat([user("A")]))
    _, reused, run = run_turn(pool, chat([{"role": "system", "content": "another agent"}, user("B")]))
    assert not reused and run is MADE[1] and a.rewound == []


def test_a_ready_warm_process_goes_before_a_parked_conversation(began_here):
    SCRIPTS.extend([[text_answer("a")], [text_answer("b")]])
    pool = pool_with(warm=1)
    _, _, a = run_turn(pool, chat([user("A")]))
    wait_until(lambda: pool.counts()["warm"] == 1, 5, "a warm process")
    _, reused, run = run_turn(pool, chat([user("B")]))
    assert reused and run is MADE[1] and a.rewound == []


def test_a_conversation_that_fails_to_rewind_is_ended_and_the_turn_starts_cold(began_here):
    global REWIND_WORKS
    REWIND_WORKS = False
    SCRIPTS.extend([[text_answer("a")], [text_answer("b")]])
    pool = pool_with()
    _, _, a = run_turn(pool, chat([user("A")]))
    events, reused, run = run_turn(pool, chat([user("B")]))
    assert not reused and run is MADE[1] and events[0] == ("text", "b")
    assert a.rewound == ["first-line"] and a.closed == 1
    assert_no_slot_held(pool, kept=1)


# ---- clients that rewrite their history -----------------------------------------------------------
# Such a client (OpenClaw) sends history + [a fresh context message] and leaves that message out of
# the history it sends next: the process that answered has seen a message the client no longer sends.

def rewriting(n, answers, context="ctx"):
    """Request n of a rewriting client: questions and answers so far, the question, a context."""
    messages = []
    for i, answer in enumerate(answers[:n - 1]):
        messages += [user("Q%d" % (i + 1)), assistant(answer)]
    return messages + [user("Q%d" % n), user("[%s %d]" % (context, n))]


def test_a_client_that_drops_its_context_message_gets_its_next_turn_from_a_predicted_process():
    SCRIPTS.extend([[text_answer("a1")], [text_answer("a2")], [text_answer("a3")]])
    pool = pool_with()
    _, _, first = run_turn(pool, chat(rewriting(1, [])))
    assert pool.counts()["parked"] == 1 and pool.dropped_blocks(chat(rewriting(1, []))) == 0

    # Turn 2 misses the parked process, which is ended: it has seen "[ctx 1]", which the client dropped.
    _, reused, second = run_turn(pool, chat(rewriting(2, ["a1"])))
    assert not reused and first.closed == 1 and first.turns == []
    assert pool.dropped_blocks(chat(rewriting(2, ["a1"]))) == 1
    wait_until(lambda: pool.counts()["predicted"] == 1, 5, "a predicted process")
    predicted = MADE[2]
    assert second.closed == 1  # it has seen "[ctx 2]": not kept
    third_call = chat(rewriting(3, ["a1", "a2"]))
    assert predicted.warm is True and predicted.call.prompt == []
    assert predicted.call.history == third_call.history  # no context message in it

    events, reused, run = run_turn(pool, third_call)
    assert reused and run is predicted and events[0] == ("text", "a3")
    assert predicted.turns == [(third_call, {})]  # only the new prompt goes in, on stdin
    assert pool.counts()["hits"] == 1
    wait_until(lambda: pool.counts()["predicted"] == 1 and pool.counts()["busy"] == 0, 5, "the next one")
    assert predicted.closed == 1 and MADE[3].call.history == chat(rewriting(4, ["a1", "a2", "a3"])).history
    assert_no_slot_held(pool, kept=1)


ANSWER = {"role": "assistant", "content": [{"type": "text", "text": "as the CLI gave it"}]}


def test_a_rewriting_clients_process_is_reseated_at_the_history_it_will_send_next():
    REPLIES.append(ANSWER)
    SCRIPTS.extend([[text_answer("a1")], [text_answer("a2")]])
    pool = pool_with()
    run_turn(pool, chat(rewriting(1, [])))
    _, reused, second = run_turn(pool, chat(rewriting(2, ["a1"])))
    assert not reused
    wait_until(lambda: pool.counts()["predicted"] == 1, 5, "the reseated process")
    # Its turn again, less the context message; the answer as its CLI wrote it.
    assert second.reseated == [([{"type": "text", "text": "Q2"}], [ANSWER])] and second.closed == 0
    second.script.append(text_answer("a3"))
    third_call = chat(rewriting(3, ["a1", "a2"]))
    events, reused, run = run_turn(pool, third_call)
    assert reused and run is second and events[0] == ("text", "a3") and second.turns == [(third_call, {})]
    assert len(MADE) == 2  # no process loaded for it
    wait_until(lambda: len(second.reseated) == 2, 5, "turn 4's reseat")
    assert_no_slot_held(pool, kept=1)


def test_a_process_that_cannot_be_reseated_is_replaced_by_a_loaded_one():
    global RESEAT_WORKS
    REPLIES.append(ANSWER)
    RESEAT_WORKS = False
    SCRIPTS.extend([[text_answer("a1")], [text_answer("a2")], [text_answer("a3")]])
    pool = pool_with()
    run_turn(pool, chat(rewriting(1, [])))
    _, _, second = run_turn(pool, chat(rewriting(2, ["a1"])))
    wait_until(lambda: pool.counts()["predicted"] == 1 and second.closed == 1, 5, "a loaded prediction")
    assert len(second.reseated) == 1 and MADE[2].warm and MADE[2].call.history == chat(rewriting(3, ["a1", "a2"])).history
    events, reused, run = run_turn(pool, chat(rewriting(3, ["a1", "a2"])))
    assert reused and run is MADE[2] and events[0] == ("text", "a3")


def test_an_older_cli_is_not_reseated(monkeypatch):
    # One that ignored `shouldQuery: false` would ask the model for the turn given back.
    monkeypatch.setattr(FakeClaude, "version", "2.1.300 (Claude Code)")
    REPLIES.append(ANSWER)
    SCRIPTS.extend([[text_answer("a1")], [text_answer("a2")], []])
    pool = pool_with()
    run_turn(pool, chat(rewriting(1, [])))
    _, _, second = run_turn(pool, chat(rewriting(2, ["a1"])))
    wait_until(lambda: pool.counts()["predicted"] == 1, 5, "a loaded prediction")
    assert second.reseated == [] and second.closed == 1 and MADE[2].warm


def test_a_first_turn_is_never_reseated():
    # The CLI dates a conversation at its first asked turn: after a rewind to nothing, that
    # would be the next turn, so a first turn's prediction is loaded.
    REPLIES.append(ANSWER)
    SCRIPTS.extend([[text_answer("a1")], [text_answer("a2")], [text_answer("b1")], []])
    pool = pool_with()
    run_turn(pool, chat(rewriting(1, [])))
    run_turn(pool, chat(rewriting(2, ["a1"])))
    _, _, first = run_turn(pool, chat(rewriting(1, [], context="other")))
    wait_until(lambda: pool.counts()["predicted"] == 2 and first.closed == 1, 5, "a loaded prediction")
    assert first.reseated == [] and MADE[3].warm


def test_a_new_conversation_of_a_known_rewriting_client_is_predicted_from_its_first_turn():
    SCRIPTS.extend([[text_answer("a1")], [text_answer("a2")], [], [text_answer("b1")], [text_answer("b2")]])
    pool = pool_with()
    run_turn(pool, chat(rewriting(1, [])))
    run_turn(pool, chat(rewriting(2, ["a1"])))
    wait_until(lambda: pool.counts()["predicted"] == 1, 5, "a predicted process")
    run_turn(pool, chat(rewriting(1, [], context="other")))
    wait_until(lambda: pool.counts()["predicted"] == 2, 5, "a second conversation's prediction")
    events, reused, run = run_turn(pool, chat(rewriting(2, ["b1"], context="other")))
    assert reused and run is MADE[4] and events[0] == ("text", "b2")


def test_once_learned_the_same_clients_other_parked_conversations_are_predicted_too():
    # Sessions taking turns: the first one's second turn shows the pattern; the others' parked
    # processes, which have seen their first context message, are resumed without it.
    SCRIPTS.extend([[text_answer("a1")], [text_answer("b1")], [text_answer("c1")],
                    [text_answer("second")], [text_answer("second")], []])  # the last two in either order
    pool = pool_with()
    _, _, a = run_turn(pool, chat(rewriting(1, [])))
    _, _, b = run_turn(pool, chat(rewriting(1, [], context="b")))
    _, _, c = run_turn(pool, chat([{"role": "system", "content": "another client"}] + rewriting(1, [], context="c")))
    _, reused, _ = run_turn(pool, chat(rewriting(2, ["a1"])))
    assert not reused and a.closed == 1 and b.closed == 1 and c.closed == 0
    wait_until(lambda: pool.counts()["predicted"] == 2, 5, "a's and b's predictions")
    call = chat(rewriting(2, ["b1"], context="b"))
    events, reused, run = run_turn(pool, call)
    assert reused and run.warm and run.turns == [(call, {})] and events[0] == ("text", "second")
    wait_until(lambda: pool.counts()["busy"] == 0, 5, "no busy slot")
    assert pool.counts()["parked"] == 1  # another kind of client's process: untouched
    assert_no_slot_held(pool, kept=3)  # a's and b's predictions, c parked


def test_a_request_waits_for_its_predicted_process_still_loading(monkeypatch):
    SCRIPTS.extend([[text_answer("a1")], [text_answer("a2")], [text_answer("a3")]])
    gate, waiting = threading.Event(), threading.Event()
    monkeypatch.setattr(FakeRun, "initialize", lambda self, timeout: gate.wait(timeout))
    pool = pool_with()
    run_turn(pool, chat(rewriting(1, [])))
    run_turn(pool, chat(rewriting(2, ["a1"])))
    take = pool._take
    monkeypatch.setattr(pool, "_take", lambda key, **how: waiting.set() or take(key, **how))
    done = []
    request = threading.Thread(target=lambda: done.append(run_turn(pool, chat(rewriting(3, ["a1", "a2"])))))
    request.start()
    wait_until(waiting.is_set, 5, "the request to reach the pool")
    gate.set()
    request.join(10)
    events, reused, run = done[0]
    assert reused and run is MADE[2] and events[0] == ("text", "a3")
    assert len(MADE) == 4  # no cold start besides: the fourth is turn 4's prediction


def test_one_predicted_process_per_conversation():
    SCRIPTS.extend([[text_answer("a1")], [text_answer("a2")], [], [text_answer("a3")], []])
    pool = pool_with()
    run_turn(pool, chat(rewriting(1, [])))
    run_turn(pool, chat(rewriting(2, ["a1"])))
    wait_until(lambda: pool.counts()["predicted"] == 1, 5, "a predicted process")
    # The client edits the last answer: the prediction misses, and the next one replaces it.
    _, reused, _ = run_turn(pool, chat(rewriting(3, ["a1", "a2 edited"])))
    assert not reused
    wait_until(lambda: MADE[2].closed == 1 and len(MADE) == 5, 5, "the old prediction ended")
    wait_until(lambda: pool.counts()["busy"] == 0 and pool.counts()["predicted"] == 1, 5, "the new one loaded")
    assert_no_slot_held(pool, kept=1)


def test_a_client_that_keeps_its_context_after_all_is_no_longer_predicted():
    SCRIPTS.extend([[text_answer("a1")], [text_answer("a2")], [], [text_answer("a3")]])
    pool = pool_with()
    run_turn(pool, chat(rewriting(1, [])))
    run_turn(pool, chat(rewriting(2, ["a1"])))
    wait_until(lambda: pool.counts()["predicted"] == 1, 5, "a predicted process")
    kept_context = [user("Q1"), assistant("a1"), user("Q2"), user("[ctx 2]"), assistant("a2"),
                    user("Q3"), user("[ctx 3]")]
    _, reused, third = run_turn(pool, chat(kept_context))
    assert not reused and MADE[2].closed == 1  # the prediction was wrong: ended
    assert pool.dropped_blocks(chat(kept_context)) == 0
    assert third.closed == 0 and pool.counts()["parked"] == 1  # parked as for any client
    assert_no_slot_held(pool, kept=1)


def test_predicted_processes_expire_and_give_way_like_any_kept_process():
    SCRIPTS.extend([[text_answer("a1")], [text_answer("a2")], [], [text_answer("other")]])
    pool = pool_with(max_parked=1, warm=0)
    run_turn(pool, chat(rewriting(1, [])))
    run_turn(pool, chat(rewriting(2, ["a1"])))
    wait_until(lambda: pool.counts()["predicted"] == 1, 5, "a predicted process")
    _, reused, _ = run_turn(pool, chat([user("unrelated")]))
    # Past the kept cap the oldest kept process gives way to the newly parked one.
    assert not reused and MADE[2].closed == 1 and pool.counts()["parked"] == 1
    expiring = pool_with(parked_ttl=0.0)
    SCRIPTS.extend([[text_answer("a1")], [text_answer("a2")], []])
    run_turn(expiring, chat(rewriting(1, [])))
    run_turn(expiring, chat(rewriting(2, ["a1"])))
    wait_until(lambda: expiring.counts()["predicted"] == 1, 5, "a predicted process")
    expiring.expire()
    assert MADE[-1].closed == 1
    assert_no_slot_held(expiring)


def test_a_prediction_needs_a_whole_answer_and_a_prompt_left_after_the_drop():
    SCRIPTS.extend([[text_answer("a1")], [text_answer("a2 STOP more")], [text_answer("a2")]])
    pool = pool_with()
    run_turn(pool, chat(rewriting(1, [])))
    _, _, cut = run_turn(pool, chat(rewriting(2, ["a1"]), stop=["STOP"]))
    assert cut.closed == 1 and len(MADE) == 2  # an answer cut by a stop string: nothing predicted
    # A prompt of one block: nothing to drop; the process is parked as for any client.
    _, _, single = run_turn(pool, chat(rewriting(2, ["a1"])[:-1]))
    assert single.closed == 0 and pool.counts()["parked"] == 1 and len(MADE) == 3


def test_a_tool_call_of_a_rewriting_client_is_not_predicted():
    # A CLI resumed at an unanswered tool call records it as interrupted and drops tool results
    # sent on stdin: the client's results (with its next context message) take the replay path.
    SCRIPTS.extend([[text_answer("a1")], [tool_call_answer("toolu_1")], [text_answer("after")]])
    pool = pool_with()
    run_turn(pool, chat(rewriting(1, []), tools=TOOLS))
    _, _, asked = run_turn(pool, chat(rewriting(2, ["a1"]), tools=TOOLS))
    assert len(MADE) == 2 and asked.closed == 0 and pool.counts()["parked"] == 1  # kept, at its tool call
    asking = tool_history()[1]  # the assistant's call of get_weather, as the client resends it
    results = [user("Q1"), assistant("a1"), user("Q2"), asking,
               {"role": "tool", "tool_call_id": "toolu_1", "content": "12 C"}, user("[ctx 3]")]
    events, reused, replay = run_turn(pool, chat(results, tools=TOOLS))
    assert not reused and asked.closed == 1 and asked.turns == [] and events[0] == ("text", "after")
    wait_until(lambda: pool.counts()["predicted"] == 1, 5, "the prediction after the replayed turn")
    assert MADE[3].call.history == chat(results[:-1] + [assistant("after"), user("Q4")], tools=TOOLS).history


def test_rewrites_are_the_history_without_trailing_prompt_blocks():
    call = chat(rewriting(2, ["a1"]))
    turns = call.history + [{"role": "user", "content": call.prompt}, {"role": "assistant", "content": [
        {"type": "text", "text": "a2"}]}]
    next_history = chat(rewriting(3, ["a1", "a2"])).history
    assert cmp.rewrites_of(call, turns) == (cmp.Rewrite(cmp.conversation_key(call, next_history), 1, next_history),)
    assert cmp.predicted_turns(turns, 1) == next_history
    assert cmp.conversation_of(call) == cmp.conversation_of(chat(rewriting(3, ["a1", "a2"])))
    assert cmp.conversation_of(call) != cmp.conversation_of(chat(rewriting(2, ["b1"])))
