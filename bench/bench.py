#!/usr/bin/env python3
"""Benchmark of claude-max-proxy against the bars of its performance issue, in one run.

    python3 bench/bench.py            the full run (a few minutes), a Markdown table on stdout
    python3 bench/bench.py --quick    fewer repetitions: a smoke test of the benchmark itself
    python3 bench/bench.py --json     the same numbers as one JSON object

What is measured (the section functions below, in this order):
  1. ttft_*            time to the first content token through the proxy / the cold CLI run
                       directly (the real pinned CLI against tests/fake_upstream.py on loopback):
                       first turns and turns 2-5 of conversations, warm processes on and off
  2. upstream_bytes    bytes of the model call the CLI sends for "Say hi": via the proxy, and bare
  3. relay_throughput  SSE chunks/s the proxy forwards from tests/fake_claude.py (words:100000)
  4. concurrent_streams  32 streams at once on the fake CLI: successes, added latency, proxy RSS
  5. cold_start        proxy process spawn -> first TCP connect and first /health answer

Sections 3-5 run the proxy as it ships, the zipapp (`python3 claude_max_proxy.pyz`, built here by
packaging/build_pyz.py); section 5 also times `python3 claude_max_proxy.py` and a bare interpreter.

Everything stays on loopback. Every process started here carries an environment tag inherited by
its children (the CLIs a proxy starts): at the end any tagged process still alive is counted as a
leftover and killed, whatever path the run took (SIGINT and SIGTERM included). Every wait is
bounded, and past the run's time limit (--time-limit) it stops with exit status 1.
Progress goes to stderr; stdout carries only the report.
"""

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
sys.path.insert(0, ROOT)
sys.path.insert(0, TESTS)
sys.path.insert(0, os.path.join(ROOT, "packaging"))

import build_pyz  # noqa: E402
import claude_max_proxy as cmp  # noqa: E402
import fake_upstream  # noqa: E402
import launch  # noqa: E402
from launch import MODULE, http_request, tagged_processes  # noqa: E402
import real_cli  # noqa: E402

FAKE_CLAUDE = os.path.join(TESTS, "fake_claude.py")
TAG_VAR = "CLAUDE_MAX_PROXY_BENCH_TAG"
MODEL = "claude-sonnet-4"
FIRST_TURN = "Say hi"
RELAY_DELTAS = 100000
CONCURRENT_STREAMS = 32
SLOW_DELAY = 0.05
FAKE_TEXT = "Hello from the fake CLI."
MAX_CHUNKS = 10 ** 6  # bound of any loop over a stream's chunks

# The bars of the issue: JSON metric -> (comparison, bound, the bar as the table shows it).
BARS = {
    "ttft_ratio_first_turn_warm": ("<=", 0.25, "≤ 0.25"),
    "ttft_ratio_first_turn_warm_loaded": ("<=", 0.25, "≤ 0.25"),
    "ttft_ratio_later_turns_warm": ("<=", 0.25, "≤ 0.25"),
    "cold_path_uncached_bytes_ratio": ("<=", 1.5, "≤ 1.5"),
    "ttft_ratio_agent_first_turns": ("<=", 0.35, "≤ 0.35"),
    "ttft_ratio_burst": ("<=", 0.35, "≤ 0.35"),
    "ttft_ratio_history_rewriting_turns_3_5": ("<=", 0.35, "≤ 0.35"),
    "ttft_ratio_rewriting_sessions_rounds_2_3": ("<=", 0.35, "≤ 0.35"),
    "relay_chunks_per_s": (">=", 20000, "≥ 20,000 chunks/s"),
    "concurrent_successes": (">=", CONCURRENT_STREAMS, "%d/%d" % (CONCURRENT_STREAMS, CONCURRENT_STREAMS)),
    "proxy_peak_rss_mb": ("<=", 40.0, "≤ 40 MB"),
    "cold_start_health_s": ("<=", 0.15, "≤ 0.15 s"),
}

# Six history-rewriting sessions taking turns, each at the single session's pace (2 s between its
# own turns): one request every 2/6 s.
SESSIONS_GAP = 2.0 / 6

# Repetitions: (full run, --quick).
REPEATS = {
    "ttft": (9, 3),            # each first-turn series, and the cold CLI baseline
    "conversations": (3, 1),   # 4 timed turns (2-5) each: 12 samples in the full run
    "relay": (3, 1),
    "fake_direct": (9, 3),     # direct runs of the fake CLI, the baseline of "added latency"
    "cold_start": (9, 3),
}


class BenchTimeout(Exception):
    """The run's time limit, or one wait's own bound, was reached."""


class Budget:
    """The run's deadline; every wait asks it how long it may last."""

    def __init__(self, seconds):
        self.deadline = time.monotonic() + seconds

    def cap(self, seconds):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise BenchTimeout("the benchmark's time limit was reached")
        return min(seconds, left)


def progress(message):
    sys.stderr.write("bench: %s\n" % message)
    sys.stderr.flush()


def median(values):
    return statistics.median(values) if values else None


def percentile(values, p):
    """Nearest-rank percentile (p in 0-100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


# ================================================================================================
# Processes: every one tagged, every one ended
# ================================================================================================

class Processes:
    """Starts processes with the run's tag; `end_all` ends them and any tagged descendant.

    An interrupt (SIGINT/SIGTERM, raised in the main thread) never lands between a process's
    start and its registration: it is held until then (see `interrupt`)."""

    def __init__(self):
        self.tag = uuid.uuid4().hex
        # The proxy passes its CLIs only allow-listed variables: a TMPDIR of the run's own tags those.
        self.tmp = tempfile.mkdtemp(prefix="bench-tmp-")
        self.started = []
        self.leftovers = 0  # tagged processes found alive after their parent was stopped
        self.lock = threading.Condition()
        self.spawning = 0     # Popen calls in progress, in any thread
        self.main_spawning = False
        self.closed = False   # end_all has begun: nothing new starts
        self.held = None      # an interrupt that arrived while the main thread was spawning

    def env(self, base):
        env = dict(base)
        env[TAG_VAR] = self.tag
        env.setdefault("TMPDIR", self.tmp)
        return env

    def interrupt(self, signum, frame):
        """The SIGINT/SIGTERM handler: KeyboardInterrupt now, or once the main thread's spawn
        is registered."""
        if self.main_spawning and self.held is None:
            self.held = signum
            return
        raise KeyboardInterrupt("signal %d" % signum)

    def popen(self, argv, env, **kwargs):
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)  # its own group: one killpg ends its children
        main = threading.current_thread() is threading.main_thread()
        with self.lock:
            if self.closed:
                raise RuntimeError("the benchmark is stopping")
            self.spawning += 1
        proc = None
        self.main_spawning = self.main_spawning or main
        try:
            proc = subprocess.Popen(argv, env=self.env(env), close_fds=True, **kwargs)
        finally:
            with self.lock:
                if proc is not None:
                    self.started.append(proc)
                self.spawning -= 1
                self.lock.notify_all()
            if main:
                self.main_spawning = False
        if main and self.held is not None:
            held, self.held = self.held, None
            raise KeyboardInterrupt("signal %d" % held)
        return proc

    def end(self, proc, term_wait=0.0):
        """SIGTERM (if `term_wait`) then SIGKILL to the process group; reap; close pipes."""
        if term_wait > 0:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)  # (Popen does not signal a reaped process)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(term_wait)
        if proc.returncode is None:
            # Not reaped yet, so its pid, which is its group's id, cannot belong to anyone else.
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError, ValueError):
                    pipe.close()
        with self.lock:
            if proc in self.started:
                self.started.remove(proc)

    def tagged(self):
        """PIDs of live (or unreaped) processes carrying this run's tag (Linux /proc)."""
        return sorted(set(tagged_processes(TAG_VAR, self.tag)) | set(tagged_processes("TMPDIR", self.tmp)))

    def sweep(self, wait=5.0, count=True):
        """After a stop: wait (bounded) until two scans 0.2 s apart find no tagged process other
        than the ones still running on purpose, then kill and count the rest.

        Two scans, because a process forked just before its parent died shows the tag only once
        it has exec'd."""
        deadline = time.monotonic() + wait
        with self.lock:
            own = {p.pid for p in self.started}
        empty_scans = 0
        while time.monotonic() < deadline:
            rest = [pid for pid in self.tagged() if pid not in own]
            empty_scans = 0 if rest else empty_scans + 1
            if empty_scans >= 2:
                return 0
            time.sleep(0.2 if not rest else 0.05)
        rest = [pid for pid in self.tagged() if pid not in own]
        for pid in rest:
            if pid in self.tagged():  # still ours right now (pids are reused)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        if count:
            self.leftovers += len(rest)
        return len(rest)

    def end_all(self):
        """End everything: no new process starts, spawns in flight finish, all are killed."""
        with self.lock:
            self.closed = True
            deadline = time.monotonic() + 10
            while self.spawning and time.monotonic() < deadline:
                self.lock.wait(0.1)
            started = list(self.started)
        for proc in started:
            self.end(proc)
        self.sweep(wait=2.0, count=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


def descendants_cpu_ticks(root_pid):
    """utime+stime (clock ticks) of all live descendants of a process, and how many there are."""
    parents, ticks = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(name)] = int(fields[1])
        ticks[int(name)] = int(fields[11]) + int(fields[12])
    family, frontier = set(), {root_pid}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - family
        family |= frontier
    return sum(ticks[pid] for pid in family), len(family)


def status_kb(pid, field):
    """A VmXXX field of /proc/PID/status in kB, or None."""
    try:
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# ================================================================================================
# The machine
# ================================================================================================

def machine_description(cli_path, cli_version):
    model = "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    ram_kb = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    ram_kb = int(line.split()[1])
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "ram_gb": round(ram_kb / 1024 / 1024, 1) if ram_kb else None,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "os": platform.platform(),
        "cli_version": cli_version,
        "cli_path": cli_path,
        "proxy_version": cmp.__version__,
        "load_average_start": list(os.getloadavg()),
    }


# ================================================================================================
# Proxies as processes
# ================================================================================================

class ProxyProcess(launch.ProxyProcess):
    """The shared launcher (tests/launch.py) spawning through the run's `Processes`, each wait
    within the run's `Budget`; `stop` also counts the CLIs its proxy left behind."""

    def __init__(self, procs, args, env, budget, program=MODULE):
        self.procs = procs
        super().__init__(args, env, tmp=procs.tmp, start_timeout=budget.cap(30), program=program)

    def spawn(self, argv, env, cwd):
        return self.procs.popen(argv, env, stderr=subprocess.PIPE, cwd=cwd)

    def stop(self):
        """SIGTERM, bounded wait, SIGKILL; then every CLI it started must be gone."""
        self.procs.end(self.proc, term_wait=15)
        return self.procs.sweep()


def wait_until(check, timeout, interval, budget):
    """Poll `check()` until it is truthy, at most `timeout` seconds; its last value."""
    deadline = time.monotonic() + budget.cap(timeout)
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# ================================================================================================
# Clients: one streamed chat completion, timed
# ================================================================================================

class Streamed:
    """One streamed answer as the client saw it (seconds from sending the request)."""

    def __init__(self, ttft, total, text, chunks):
        self.ttft, self.total, self.text, self.chunks = ttft, total, text, chunks


class OpenAIChat:
    """The real `openai` client (connection pooling and all), streaming."""

    def __init__(self, base_url):
        import openai
        self.name = "openai %s" % openai.__version__
        http_client = None
        with contextlib.suppress(Exception):  # keep loopback off any HTTP(S)_PROXY
            http_client = openai.DefaultHttpxClient(trust_env=False)
        self.client = openai.OpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0,
                                    timeout=120.0, http_client=http_client)

    def stream(self, messages, tools=None):
        started = time.perf_counter()
        first, parts, chunks = None, [], 0
        stream = self.client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                     **({"tools": tools} if tools else {}))
        with contextlib.closing(stream):
            for chunk in stream:
                chunks += 1
                if chunks > MAX_CHUNKS:
                    raise RuntimeError("the stream did not end after %d chunks" % MAX_CHUNKS)
                content = chunk.choices[0].delta.content if chunk.choices else None
                if content:
                    if first is None:
                        first = time.perf_counter()
                    parts.append(content)
        if first is None:
            raise RuntimeError("the stream had no content")
        return Streamed(first - started, time.perf_counter() - started, "".join(parts), chunks)

    def close(self):
        self.client.close()


class HttpChat:
    """http.client over one kept-alive connection, streaming (when `openai` is not installed)."""

    name = "http.client"

    def __init__(self, base_url):
        self.port = int(base_url.rsplit(":", 1)[1])
        self.conn = None

    def stream(self, messages, tools=None):
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        body = json.dumps(dict({"model": MODEL, "messages": messages, "stream": True},
                               **({"tools": tools} if tools else {}))).encode("utf-8")
        started = time.perf_counter()
        first, parts, chunks = None, [], 0
        try:
            self.conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = self.conn.getresponse()
            if response.status != 200:
                raise RuntimeError("HTTP %d: %r" % (response.status, response.read()[:300]))
            for _ in range(MAX_CHUNKS * 2):
                line = response.readline()
                if not line:
                    break
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunks += 1
                choices = json.loads(line[6:]).get("choices") or [{}]
                content = (choices[0].get("delta") or {}).get("content")
                if content:
                    if first is None:
                        first = time.perf_counter()
                    parts.append(content)
        except BaseException:
            self.close()
            raise
        if first is None:
            raise RuntimeError("the stream had no content")
        return Streamed(first - started, time.perf_counter() - started, "".join(parts), chunks)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def chat_client(base_url):
    try:
        return OpenAIChat(base_url)
    except ImportError:
        return HttpChat(base_url)


# ================================================================================================
# Reading a CLI's stream-json output, bounded
# ================================================================================================

def json_events(proc, deadline):
    """The JSON lines a CLI prints, until EOF; BenchTimeout past `deadline` (monotonic)."""
    fd = proc.stdout.fileno()
    buffer = b""
    while True:
        newline = buffer.find(b"\n")
        if newline >= 0:
            line, buffer = buffer[:newline], buffer[newline + 1:]
            if line.strip():
                with contextlib.suppress(ValueError):
                    yield json.loads(line)
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchTimeout("the CLI did not finish in time")
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            data = os.read(fd, 1 << 16)
            if not data:
                return
            buffer += data


def is_text_delta(event):
    inner = event.get("event") or {}
    return (event.get("type") == "stream_event" and inner.get("type") == "content_block_delta"
            and (inner.get("delta") or {}).get("type") == "text_delta")


class DirectCli:
    """Runs one turn of a CLI directly with the proxy's argv and environment for a call."""

    def __init__(self, procs, claude_path, call, environ, workdir):
        self.procs, self.call, self.workdir = procs, call, workdir
        self.config = cmp.Config(workdir=workdir)
        self.private = tempfile.mkdtemp(prefix="cli-", dir=os.path.dirname(workdir))
        prompt_file = os.path.join(self.private, "system-prompt.txt")
        with open(prompt_file, "w", encoding="utf-8") as handle:
            handle.write(call.system_prompt)
        # The very argv and environment the proxy would use for this call (cold, no session).
        self.argv = cmp.cli_args_for(call, claude_path, None, prompt_file)
        self.env = cmp.cli_env_for(call, self.config, environ)

    def run(self, budget, until_result=False):
        """(seconds from spawn to the first text delta, seconds from spawn to `result` or None)."""
        stderr = tempfile.TemporaryFile()
        started = time.perf_counter()
        proc = self.procs.popen(self.argv, self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr, cwd=self.workdir)
        first = done = None
        try:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(cmp.stdin_line_for(self.call.prompt))
                proc.stdin.close()
            for event in json_events(proc, time.monotonic() + budget.cap(120)):
                if first is None and is_text_delta(event):
                    first = time.perf_counter() - started
                    if not until_result:
                        break
                if event.get("type") == "result":
                    done = time.perf_counter() - started
                    break
        finally:
            self.procs.end(proc)
            stderr.seek(0)
            why = stderr.read()[-500:].decode("utf-8", "replace")
            stderr.close()
        if first is None:
            raise RuntimeError("the CLI gave no text (exit %s): %s" % (proc.returncode, why))
        return first, done


def first_turn_call(content, stream=True):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "stream": stream}
    return cmp.cli_call_for(body, cmp.Config())


# ================================================================================================
# 1. Time to first token
# ================================================================================================

def ttft_cold_cli(procs, cli, env, workdir, repeats, budget):
    """The baseline: the CLI started cold, as the proxy would start it, spawn -> first text delta."""
    direct = DirectCli(procs, cli, first_turn_call(FIRST_TURN), env, workdir)
    samples = []
    for i in range(repeats):
        samples.append(direct.run(budget)[0])
        progress("cold CLI first turn %d/%d: %.3f s" % (i + 1, repeats, samples[-1]))
    return samples


def wait_for_warm(proxy, budget):
    """Bounded polling of /health until a warm process is listed; the seconds it took."""
    started = time.monotonic()
    ok = wait_until(lambda: proxy.health()["processes"]["warm"] >= 1, 30, 0.02, budget)
    if not ok:
        raise RuntimeError("no warm process appeared in /health within 30 s")
    return time.monotonic() - started


def wait_for_quiet(proxy, budget, quiet=1.0, timeout=20.0):
    """Bounded wait until the proxy's child processes use (almost) no CPU for `quiet` seconds:
    a warm CLI has then finished loading (it prints nothing before its first turn)."""
    started = time.monotonic()
    history = []
    deadline = time.monotonic() + budget.cap(timeout)
    while time.monotonic() < deadline:
        ticks, _ = descendants_cpu_ticks(proxy.proc.pid)
        now = time.monotonic()
        history.append((now, ticks))
        old = [t for at, t in history if at <= now - quiet]
        if old and ticks - old[-1] <= 1:
            return now - started
        time.sleep(0.1)
    return None


def ttft_first_turns(procs, cli, env, repeats, budget, warm, wait):
    """A first turn through the proxy, the same request each time; `wait` before each timed one:
    "health" (until /health lists a warm process), "loaded" (that, then CPU-quiet), or None."""
    args = ["--claude", cli] + ([] if warm else ["--max-parked", "0", "--warm", "0"])
    proxy = ProxyProcess(procs, args, env, budget)
    client = chat_client(proxy.url)
    messages = [{"role": "user", "content": FIRST_TURN}]
    try:
        client.stream(messages)  # the kind of first turn is known from here: warm processes start
        before = proxy.health()["processes"]
        samples, waited = [], []
        for i in range(repeats):
            if wait:
                waited.append(wait_for_warm(proxy, budget))
            if wait == "loaded":
                waited[-1] += wait_for_quiet(proxy, budget) or 0.0
            samples.append(client.stream(messages).ttft)
            progress("proxy first turn (warm %s, wait %s) %d/%d: %.3f s" % (
                "on" if warm else "off", wait, i + 1, repeats, samples[-1]))
        after = proxy.health()["processes"]
        log = proxy.wait_for_log(repeats + 1, 10)[1:]
    finally:
        client.close()
        leftovers = proxy.stop()
    return {"samples_s": samples, "hits": after["hits"] - before["hits"],
            "misses": after["misses"] - before["misses"], "requests": repeats,
            "reused_in_access_log": sum(1 for e in log if e["reused"]),
            "proxy_logged_ttft_s": [e["ttft"] for e in log],
            "wait_before_request_s": median(waited), "leftover_processes": leftovers,
            "client": client.name}


def ttft_conversations(procs, cli, env, conversations, budget, warm):
    """Conversations of 5 turns, each resending the whole history; TTFT of turns 2-5."""
    args = ["--claude", cli] + ([] if warm else ["--max-parked", "0", "--warm", "0"])
    proxy = ProxyProcess(procs, args, env, budget)
    client = chat_client(proxy.url)
    samples, per_turn, sent = [], {n: [] for n in range(2, 6)}, 0
    try:
        before = proxy.health()["processes"]
        for c in range(conversations):
            messages = [{"role": "user", "content": "Say hi (conversation %s)" % uuid.uuid4().hex[:8]}]
            for turn in range(1, 6):
                budget.cap(1)
                answer = client.stream(messages)
                sent += 1
                messages.append({"role": "assistant", "content": answer.text})
                if turn > 1:
                    samples.append(answer.ttft)
                    per_turn[turn].append(answer.ttft)
                messages.append({"role": "user", "content": "Tell me more (%d)." % (turn + 1)})
            progress("conversation %d/%d (warm %s): turns 2-5 %s" % (
                c + 1, conversations, "on" if warm else "off",
                " ".join("%.3f" % s for s in samples[-4:])))
        after = proxy.health()["processes"]
        log = proxy.wait_for_log(sent, 10)
    finally:
        client.close()
        leftovers = proxy.stop()
    later = [entry for i, entry in enumerate(log) if i % 5]  # turns 2-5
    return {"samples_s": samples,
            "median_by_turn_s": {str(n): median(v) for n, v in per_turn.items()},
            "hits": after["hits"] - before["hits"], "misses": after["misses"] - before["misses"],
            "requests": sent, "later_turns": len(later),
            "later_turns_reused": sum(1 for e in later if e["reused"]),
            "proxy_logged_ttft_s": [e["ttft"] for e in later],
            "leftover_processes": leftovers, "client": client.name}


# ================================================================================================
# 2. Upstream request bytes
# ================================================================================================

def upstream_since(upstream, start):
    with upstream.lock:
        rows = upstream.requests[start:]
    return [{"path": r["path"], "bytes": r["bytes"]} for r in rows]


def model_calls(rows):
    return [r for r in rows if r["path"].startswith("/v1/messages") and "count_tokens" not in r["path"]]


def upstream_bytes(procs, cli, env, upstream, workdir, budget):
    """The request bytes of "Say hi": through the proxy, and `claude -p "Say hi"` with defaults."""
    proxy = ProxyProcess(procs, ["--claude", cli, "--max-parked", "0", "--warm", "0"], env, budget)
    try:
        start = len(upstream.requests)
        status, _, body = http_request(proxy.port, "POST", "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": FIRST_TURN}]}, timeout=budget.cap(120))
        if status != 200:
            raise RuntimeError("the proxy answered %d: %r" % (status, body[:300]))
        time.sleep(0.3)  # anything the CLI sends after its answer belongs to it too
        via_proxy = upstream_since(upstream, start)
    finally:
        proxy_leftovers = proxy.stop()
    start = len(upstream.requests)
    proc = procs.popen([cli, "-p", FIRST_TURN], cmp.cli_env_for(first_turn_call(FIRST_TURN), cmp.Config(), env),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        output, _ = proc.communicate(timeout=budget.cap(120))
    except subprocess.TimeoutExpired:
        raise BenchTimeout("bare `claude -p` did not finish in 120 s")
    finally:
        procs.end(proc)
    bare = upstream_since(upstream, start)
    if proc.returncode != 0 or not model_calls(bare):
        raise RuntimeError("bare `claude -p` failed (exit %s): %s" % (
            proc.returncode, output[-400:].decode("utf-8", "replace")))
    proxy_calls, bare_calls = model_calls(via_proxy), model_calls(bare)
    return {"proxy_bytes": max(r["bytes"] for r in proxy_calls),
            "proxy_model_calls": len(proxy_calls),
            "proxy_all_requests": via_proxy,
            "bare_bytes": max(r["bytes"] for r in bare_calls),
            "bare_model_calls": len(bare_calls),
            "bare_all_requests": bare,
            "leftover_processes": proxy_leftovers}


def prompt_units(body):
    """A request's prompt in Anthropic's cache order (tools, system, messages), one JSON unit per
    tool or content block, with whether a cache breakpoint ends it. String content is its one text
    block, and `cache_control` is not part of the text: neither changes what the cache holds."""
    def unit(block, role=None):
        block = {"type": "text", "text": block} if isinstance(block, str) else dict(block)
        marked = block.pop("cache_control", None) is not None
        return json.dumps([role, block], sort_keys=True), marked
    units = [unit(tool) for tool in body.get("tools") or []]
    system = body.get("system") or []
    units += [unit(block, "system") for block in ([system] if isinstance(system, str) else system)]
    for message in body.get("messages") or []:
        content = message["content"]
        units += [unit(block, message["role"]) for block in ([content] if isinstance(content, str) else content)]
    return units


def uncached_bytes(bodies):
    """Per request: the prompt bytes after the longest prefix that an earlier request sent with a
    cache breakpoint at its end (what Anthropic's prompt cache can read), as JSON units."""
    cached, result = set(), []
    for body in bodies:
        units = prompt_units(body)
        sizes = [len(text.encode("utf-8")) for text, _ in units]
        keys, running = [], hashlib.sha256()
        for text, _ in units:
            running.update(text.encode("utf-8") + b"\0")
            keys.append(running.hexdigest())
        hit = max([i + 1 for i, key in enumerate(keys) if key in cached] or [0])
        result.append(sum(sizes[hit:]))
        cached.update(key for key, (_, marked) in zip(keys, units) if marked)
    return result


def conversation_bodies(procs, cli, env, upstream, budget, args, requests):
    """The upstream bodies of one conversation of `requests` chat requests through a proxy."""
    proxy = ProxyProcess(procs, ["--claude", cli] + args, env, budget)
    mark = uuid.uuid4().hex
    client = chat_client(proxy.url)
    messages = [{"role": "system", "content": "You are a careful assistant. " * 200}]
    try:
        for turn in range(requests):
            budget.cap(1)
            messages.append({"role": "user", "content": "Question %d of conversation %s: %s" % (
                turn + 1, mark, "please explain the details. " * 40)})
            answer = client.stream(messages)
            messages.append({"role": "assistant", "content": answer.text})
        proxy.wait_for_log(requests, 10)
    finally:
        client.close()
        leftovers = proxy.stop()
    with upstream.lock:
        bodies = [r["body"] for r in upstream.requests if r["path"].startswith("/v1/messages")
                  and "count_tokens" not in r["path"] and mark in json.dumps(r["body"]["messages"])]
    return bodies, leftovers


def cold_path_bytes(procs, cli, env, upstream, budget, requests=8):
    """Uncached prompt bytes of requests 2..N of one conversation, reuse on (default flags) and
    off (--max-parked 0: every turn resumes a transcript the proxy wrote)."""
    result = {}
    for name, args in (("reuse", []), ("cold", ["--max-parked", "0", "--warm", "0"])):
        bodies, leftovers = conversation_bodies(procs, cli, env, upstream, budget, args, requests)
        per_request = uncached_bytes(bodies)
        result[name] = {"uncached_bytes": per_request, "later_uncached_bytes": sum(per_request[1:]),
                        "requests": len(bodies), "empty_messages": sum(
                            1 for b in bodies for m in b["messages"] if not m["content"]),
                        "leftover_processes": leftovers}
    reuse = result["reuse"]["later_uncached_bytes"]
    result["ratio"] = result["cold"]["later_uncached_bytes"] / reuse if reuse else None
    return result


# An agent's first turn (OpenClaw's shape): a 49,000-character system prompt and 12 tools.
AGENT_SYSTEM = ("You are a capable agent working for the user. " * 1100)[:49000]
AGENT_TOOLS = [{"type": "function", "function": {
    "name": "tool_%d" % n, "description": "Tool number %d does one thing well. " % n * 8,
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}}}}}
    for n in range(12)]


def ttft_agent_first_turns(procs, cli, env, budget, repeats, gap=1.5):
    """First turns of new conversations that carry AGENT_SYSTEM and AGENT_TOOLS, `gap` s apart."""
    return first_turn_series(procs, cli, env, budget, repeats, gap=gap,
                             system=[{"role": "system", "content": AGENT_SYSTEM}], tools=AGENT_TOOLS)


def ttft_burst(procs, cli, env, budget, requests=9, up_for=3.0):
    """Independent first turns sent back to back (each after the previous answer) to a proxy with
    default flags that has been up for `up_for` seconds."""
    return first_turn_series(procs, cli, env, budget, requests, up_for=up_for)


def first_turn_series(procs, cli, env, budget, requests, gap=0.0, up_for=0.0, system=(), tools=None):
    """`requests` first turns of new conversations through one proxy with default flags: TTFT of
    each, and how many the access log shows reused. The pauses are the traffic's shape, not
    synchronisation: `up_for` s after the proxy answers, `gap` s before each request."""
    proxy = ProxyProcess(procs, ["--claude", cli], env, budget)
    client = chat_client(proxy.url)
    samples = []
    try:
        time.sleep(up_for)
        for _ in range(requests):
            time.sleep(gap)
            samples.append(client.stream(list(system) + [
                {"role": "user", "content": "Say hi (%s)" % uuid.uuid4().hex[:8]}], tools).ttft)
        progress("%d first turns: %s" % (requests, " ".join("%.3f" % x for x in samples)))
        log = proxy.wait_for_log(requests, 10)
    finally:
        client.close()
        leftovers = proxy.stop()
    return {"samples_s": samples, "reused": sum(1 for e in log if e["reused"]),
            "requests": requests, "leftover_processes": leftovers}


def ttft_history_rewriting(procs, cli, env, upstream, budget, turns=5, gap=2.0):
    """A client that appends a fresh context message to every request and leaves it out of the
    history it sends next; TTFT per turn, and whether each upstream request held only its own."""
    proxy = ProxyProcess(procs, ["--claude", cli], env, budget)
    client = chat_client(proxy.url)
    mark = uuid.uuid4().hex
    history, contexts, samples = [{"role": "system", "content": "You are a careful assistant."}], [], []
    try:
        for turn in range(1, turns + 1):
            if turn > 1:
                time.sleep(gap)  # the traffic's pace, not synchronisation
            history.append({"role": "user", "content": "Question %d (%s)" % (turn, mark)})
            contexts.append("[context %s]" % uuid.uuid4().hex)
            answer = client.stream(history + [{"role": "user", "content": contexts[-1]}])
            samples.append(answer.ttft)
            history.append({"role": "assistant", "content": answer.text})
        log = proxy.wait_for_log(turns, 10)
    finally:
        client.close()
        leftovers = proxy.stop()
    with upstream.lock:
        bodies = [json.dumps(r["body"]) for r in upstream.requests if r["path"].startswith("/v1/messages")
                  and "count_tokens" not in r["path"] and mark in json.dumps(r["body"])]
    faithful = len(bodies) == turns and all(
        contexts[n] in body and not any(c in body for c in contexts[:n]) for n, body in enumerate(bodies))
    return {"samples_s": samples, "reused": [e["reused"] for e in log], "faithful_upstream": faithful,
            "leftover_processes": leftovers}


def ttft_rewriting_sessions(procs, cli, env, upstream, budget, args=(), sessions=6, rounds=3, gap=0.0):
    """`sessions` history-rewriting clients (as ttft_history_rewriting) taking turns round-robin
    on one proxy started with `args`, `gap` s between requests; TTFT per round, and whether the
    upstream stayed faithful."""
    proxy = ProxyProcess(procs, ["--claude", cli] + list(args), env, budget)
    client = chat_client(proxy.url)
    marks = [uuid.uuid4().hex for _ in range(sessions)]
    histories = [[{"role": "system", "content": "You are a careful assistant."}] for _ in marks]
    contexts = [[] for _ in marks]
    per_round = {n: [] for n in range(1, rounds + 1)}
    try:
        for turn in range(1, rounds + 1):
            for history, mark, context in zip(histories, marks, contexts):
                budget.cap(1)
                time.sleep(gap)  # the traffic's pace, not synchronisation
                history.append({"role": "user", "content": "Question %d (%s)" % (turn, mark)})
                context.append("[context %s]" % uuid.uuid4().hex)
                answer = client.stream(history + [{"role": "user", "content": context[-1]}])
                per_round[turn].append(answer.ttft)
                history.append({"role": "assistant", "content": answer.text})
            progress("%d rewriting sessions %s, round %d: %s" % (
                sessions, " ".join(args) or "(defaults)", turn, " ".join("%.3f" % x for x in per_round[turn])))
        log = proxy.wait_for_log(sessions * rounds, 10)
        processes = proxy.health()["processes"]
    finally:
        client.close()
        leftovers = proxy.stop()
    with upstream.lock:
        bodies = [json.dumps(r["body"]) for r in upstream.requests if r["path"].startswith("/v1/messages")
                  and "count_tokens" not in r["path"]]
    faithful = all(
        sum(1 for body in bodies if mark in body) == rounds and all(
            sum(1 for body in bodies if c in body and mark in body) == 1 for c in context)
        for mark, context in zip(marks, contexts))
    return {"args": list(args), "samples_by_round_s": {str(n): v for n, v in per_round.items()},
            "reused_by_round": {str(n): sum(1 for e in log[(n - 1) * sessions:n * sessions] if e["reused"])
                                for n in per_round},
            "faithful_upstream": faithful, "processes": processes, "leftover_processes": leftovers}


# ================================================================================================
# 3. Relay throughput
# ================================================================================================

def sse_request(port, body):
    data = json.dumps(body).encode("utf-8")
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (port, len(data))) + data


def count_sse_chunks(port, body, budget, timeout=120):
    """Read one streamed answer off a raw socket as fast as possible, counting `data:` chunks.
    (status, chunks, first-chunk time, last-chunk time, whether [DONE] came)."""
    deadline = time.monotonic() + budget.cap(timeout)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.settimeout(5)
        sock.sendall(sse_request(port, body))
        head, status, count, first, last, done, tail = b"", None, 0, None, None, False, b""
        while time.monotonic() < deadline:
            data = sock.recv(1 << 18)
            now = time.perf_counter()
            if not data:
                break
            if status is None:
                head += data
                end = head.find(b"\r\n\r\n")
                if end < 0:
                    continue
                status = int(head.split(b" ", 2)[1])
                data = head[end + 4:]
            # The previous read's last 11 bytes: a marker split across two reads is seen once
            # (11 bytes hold no whole "data: [DONE]", and "data: " found in them was counted).
            window = tail + data
            found = window.count(b"data: ") - tail.count(b"data: ")
            if found:
                count += found
                first = first if first is not None else now
                last = now
            done = done or b"data: [DONE]" in window
            tail = window[-11:]
        else:
            raise BenchTimeout("the stream did not end within %.0f s" % timeout)
        return status, count, first, last, done
    finally:
        sock.close()


def fake_direct_rate(procs, budget, home):
    """Lines/s the fake CLI itself writes for words:N (the ceiling of what the proxy can relay)."""
    call = first_turn_call("@@fake:words:%d@@" % RELAY_DELTAS)
    workdir = tempfile.mkdtemp(prefix="fake-", dir=home)
    proc = procs.popen(cmp.cli_args_for(call, FAKE_CLAUDE, None, os.devnull), os.environ,
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=workdir)
    try:
        proc.stdin.write(cmp.stdin_line_for(call.prompt))
        proc.stdin.close()
        count, first, last = 0, None, None
        for event in json_events(proc, time.monotonic() + budget.cap(120)):
            if is_text_delta(event):
                now = time.perf_counter()
                first = first if first is not None else now
                last, count = now, count + 1
            elif event.get("type") == "result":
                break
    finally:
        procs.end(proc)
    return count / (last - first) if count > 1 else None


def relay_throughput(procs, repeats, budget, home, program):
    proxy = ProxyProcess(procs, ["--claude", FAKE_CLAUDE, "--max-parked", "0"], dict(os.environ, HOME=home),
                         budget, program)
    body = {"model": MODEL, "stream": True,
            "messages": [{"role": "user", "content": "@@fake:words:%d@@" % RELAY_DELTAS}]}
    rates, counts = [], []
    try:
        for i in range(repeats):
            status, count, first, last, done = count_sse_chunks(proxy.port, body, budget)
            if status != 200 or not done or count < RELAY_DELTAS:
                raise RuntimeError("relay run: status %s, %d chunks, [DONE] %s" % (status, count, done))
            rates.append(count / (last - first))
            counts.append(count)
            progress("relay %d/%d: %d chunks, %.0f chunks/s" % (i + 1, repeats, count, rates[-1]))
    finally:
        leftovers = proxy.stop()
    return {"chunks_per_s_samples": rates, "chunks": counts, "leftover_processes": leftovers,
            "fake_cli_alone_lines_per_s": fake_direct_rate(procs, budget, home)}


# ================================================================================================
# 4. Concurrent streams
# ================================================================================================

def slow_call():
    return first_turn_call("@@fake:slow:%s@@ hi" % SLOW_DELAY)


def fake_direct_times(procs, runs, budget, home, concurrent=False):
    """Spawn -> `result` of the fake CLI in slow mode, run directly: one by one, or all at once."""
    direct = DirectCli(procs, FAKE_CLAUDE, slow_call(), os.environ, tempfile.mkdtemp(prefix="fake-", dir=home))
    if not concurrent:
        return [direct.run(budget, until_result=True)[1] for _ in range(runs)]
    times, errors = [None] * runs, []
    barrier = threading.Barrier(runs)

    def one(i):
        try:
            barrier.wait(30)
            times[i] = direct.run(budget, until_result=True)[1]
        except Exception as exc:  # reported below, the run goes on
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(budget.cap(180))
    return [t for t in times if t is not None]


def one_stream(port, body, timeout):
    """(ok, seconds) of one streamed request read to its end over a fresh connection."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        elapsed = time.perf_counter() - started
        payloads = [line[6:] for line in raw.decode("utf-8", "replace").split("\n") if line.startswith("data: ")]
        if response.status != 200 or not payloads or payloads[-1] != "[DONE]":
            return False, elapsed
        text = "".join((json.loads(p)["choices"][0]["delta"].get("content") or "")
                       for p in payloads[:-1] if json.loads(p).get("choices"))
        return text == FAKE_TEXT, elapsed
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError):
        return False, time.perf_counter() - started
    finally:
        conn.close()


def concurrent_streams(procs, repeats, budget, home, program):
    direct = fake_direct_times(procs, repeats, budget, home)
    direct_concurrent = fake_direct_times(procs, CONCURRENT_STREAMS, budget, home, concurrent=True)
    proxy = ProxyProcess(procs, ["--claude", FAKE_CLAUDE, "--max-concurrency", str(CONCURRENT_STREAMS),
                                 "--max-parked", "0"], dict(os.environ, HOME=home), budget, program)
    body = {"model": MODEL, "stream": True,
            "messages": [{"role": "user", "content": "@@fake:slow:%s@@ hi" % SLOW_DELAY}]}
    results = [None] * CONCURRENT_STREAMS
    rss_samples, running = [], threading.Event()
    try:
        idle_rss = status_kb(proxy.proc.pid, "VmRSS")
        barrier = threading.Barrier(CONCURRENT_STREAMS)

        def client(i):
            try:
                barrier.wait(30)
            except threading.BrokenBarrierError:
                pass
            results[i] = one_stream(proxy.port, body, 60)

        def sample_rss():
            for _ in range(100000):  # bounded: at most ~10 minutes of 5 ms samples
                if not running.is_set():
                    return
                value = status_kb(proxy.proc.pid, "VmRSS")
                if value:
                    rss_samples.append(value)
                time.sleep(0.005)

        running.set()
        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CONCURRENT_STREAMS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(budget.cap(120))
        running.clear()
        sampler.join(5)
        hwm = status_kb(proxy.proc.pid, "VmHWM")
    finally:
        running.clear()
        leftovers = proxy.stop()
    done = [r for r in results if r is not None]
    base = median(direct)
    added = [elapsed - base for ok, elapsed in done if ok]
    base_concurrent = median(direct_concurrent)
    return {"successes": sum(1 for ok, _ in done if ok), "streams": CONCURRENT_STREAMS,
            "client_total_s": sorted(e for _, e in done),
            "fake_direct_median_s": base, "fake_direct_samples_s": direct,
            "added_p50_s": percentile(added, 50), "added_p99_s": percentile(added, 99),
            "fake_direct_32_at_once_median_s": base_concurrent,
            "added_vs_32_at_once_p50_s": percentile([e - base_concurrent for ok, e in done if ok], 50)
            if base_concurrent else None,
            "proxy_vmhwm_kb": hwm, "proxy_vmrss_peak_kb": max(rss_samples) if rss_samples else None,
            "proxy_idle_rss_kb": idle_rss, "leftover_processes": leftovers}


# ================================================================================================
# 5. Cold start
# ================================================================================================

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health_over(sock, port):
    """Send GET /health on a connected socket; True if a claude-max-proxy answered 200."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % port)
    data = b""
    for _ in range(1000):
        if b"\r\n\r\n" in data:
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0] \
        and b"claude-max-proxy/" in data


def cold_start_once(procs, port, budget, home, program):
    """(seconds to the first TCP connect, seconds to the first /health answer)."""
    argv = [sys.executable, program, "--port", str(port), "--claude", FAKE_CLAUDE]
    started = time.perf_counter()
    proc = procs.popen(argv, dict(os.environ, HOME=home), cwd=ROOT)
    try:
        deadline = time.monotonic() + budget.cap(5.0)
        while time.monotonic() < deadline:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            except (ConnectionRefusedError, socket.timeout):
                if proc.poll() is not None:
                    raise RuntimeError("the proxy exited with %s before listening" % proc.returncode)
                time.sleep(0.002)
                continue
            connected = time.perf_counter() - started
            with sock:
                sock.settimeout(2)
                if not health_over(sock, port):
                    raise RuntimeError("something else answers on port %d" % port)
            return connected, time.perf_counter() - started
        raise BenchTimeout("the proxy did not accept a connection within 5 s")
    finally:
        procs.end(proc, term_wait=5)
        procs.sweep()


def interpreter_start(procs, budget, home):
    """Seconds for `python3 -c pass`: what any Python program pays before its first line."""
    started = time.perf_counter()
    proc = procs.popen([sys.executable, "-c", "pass"], dict(os.environ, HOME=home), cwd=ROOT)
    try:
        proc.wait(budget.cap(30))
    finally:
        procs.end(proc)
    return time.perf_counter() - started


def cold_start(procs, repeats, budget, home, program):
    """The shipped zipapp (`program`), the module run as a script and a bare interpreter, in turns."""
    port = free_port()
    connects, healths, script_healths, bare = [], [], [], []
    for i in range(repeats):
        connect, health = cold_start_once(procs, port, budget, home, program)
        connects.append(connect)
        healths.append(health)
        script_healths.append(cold_start_once(procs, port, budget, home, MODULE)[1])
        bare.append(interpreter_start(procs, budget, home))
        progress("cold start %d/%d: zipapp connect %.3f s, /health %.3f s; module as a script /health %.3f s; "
                 "python3 -c pass %.3f s" % (i + 1, repeats, connect, health, script_healths[-1], bare[-1]))
    return {"connect_samples_s": connects, "health_samples_s": healths,
            "script_health_samples_s": script_healths, "interpreter_samples_s": bare}


# ================================================================================================
# The report
# ================================================================================================

def meets(metric, value):
    if value is None:
        return None
    comparison, bound, _ = BARS[metric]
    return value <= bound if comparison == "<=" else value >= bound


def summary_of(sections):
    """The headline metrics (the JSON `metrics`), computed from the sections' raw results."""
    cold = median(sections["ttft_cold_cli"]["samples_s"])
    first = sections["ttft_first_turn"]
    later = sections["ttft_later_turns"]

    def ratio(samples):
        return median(samples) / cold if samples and cold else None

    conc = sections["concurrent"]
    hwm = conc["proxy_vmhwm_kb"]
    return {
        "cli_cold_ttft_s": cold,
        "proxy_first_turn_warm_ttft_s": median(first["warm_health"]["samples_s"]),
        "ttft_ratio_first_turn_warm": ratio(first["warm_health"]["samples_s"]),
        "first_turn_warm_hits": first["warm_health"]["hits"],
        "first_turn_warm_requests": first["warm_health"]["requests"],
        "proxy_first_turn_warm_loaded_ttft_s": median(first["warm_loaded"]["samples_s"]),
        "ttft_ratio_first_turn_warm_loaded": ratio(first["warm_loaded"]["samples_s"]),
        "first_turn_warm_loaded_hits": first["warm_loaded"]["hits"],
        "proxy_first_turn_cold_ttft_s": median(first["cold"]["samples_s"]),
        "ttft_ratio_first_turn_cold": ratio(first["cold"]["samples_s"]),
        "proxy_later_turns_warm_ttft_s": median(later["warm"]["samples_s"]),
        "ttft_ratio_later_turns_warm": ratio(later["warm"]["samples_s"]),
        "later_turns_warm_reused": later["warm"]["later_turns_reused"],
        "later_turns_warm_count": later["warm"]["later_turns"],
        "proxy_later_turns_cold_ttft_s": median(later["cold"]["samples_s"]),
        "ttft_ratio_later_turns_cold": ratio(later["cold"]["samples_s"]),
        "upstream_bytes_proxy": sections["upstream_bytes"]["proxy_bytes"],
        "upstream_bytes_bare_cli": sections["upstream_bytes"]["bare_bytes"],
        "cold_path_uncached_bytes_ratio": sections["cold_path_bytes"]["ratio"],
        "ttft_ratio_agent_first_turns": ratio(sections["agent_first_turns"]["samples_s"]),
        "ttft_ratio_burst": ratio(sections["burst"]["samples_s"]),
        "burst_reused": sections["burst"]["reused"],
        "ttft_ratio_history_rewriting_turns_3_5": ratio(sections["history_rewriting"]["samples_s"][2:5]),
        "history_rewriting_faithful_upstream": sections["history_rewriting"]["faithful_upstream"],
        "ttft_ratio_rewriting_sessions_rounds_2_3": ratio(later_rounds(sections["rewriting_sessions"]["default"])),
        "rewriting_sessions_faithful_upstream": all(
            s["faithful_upstream"] for s in sections["rewriting_sessions"].values()),
        "cold_path_empty_messages": sections["cold_path_bytes"]["cold"]["empty_messages"],
        "relay_chunks_per_s": median(sections["relay"]["chunks_per_s_samples"]),
        "fake_cli_alone_lines_per_s": sections["relay"]["fake_cli_alone_lines_per_s"],
        "concurrent_successes": conc["successes"],
        "concurrent_streams": conc["streams"],
        "added_latency_p50_s": conc["added_p50_s"],
        "added_latency_p99_s": conc["added_p99_s"],
        "fake_direct_32_at_once_median_s": conc["fake_direct_32_at_once_median_s"],
        "added_latency_vs_32_at_once_p50_s": conc["added_vs_32_at_once_p50_s"],
        "proxy_idle_rss_mb": conc["proxy_idle_rss_kb"] * 1024 / 1e6 if conc["proxy_idle_rss_kb"] else None,
        "proxy_peak_rss_mb": hwm * 1024 / 1e6 if hwm else None,
        "proxy_peak_vmrss_sampled_mb": conc["proxy_vmrss_peak_kb"] * 1024 / 1e6
        if conc["proxy_vmrss_peak_kb"] else None,
        "cold_start_connect_s": median(sections["cold_start"]["connect_samples_s"]),
        "cold_start_health_s": median(sections["cold_start"]["health_samples_s"]),
        "cold_start_script_health_s": median(sections["cold_start"]["script_health_samples_s"]),
        "interpreter_start_s": median(sections["cold_start"]["interpreter_samples_s"]),
    }


def later_rounds(section):
    """TTFT samples of rounds 2 and 3 of ttft_rewriting_sessions."""
    return section["samples_by_round_s"]["2"] + section["samples_by_round_s"]["3"]


def yes_no(metric, value):
    result = meets(metric, value)
    return "—" if result is None else ("yes" if result else "**no**")


def table(m, sections):
    """The Markdown table: each number with its bar."""
    def s(x):
        return "%.3f s" % x if x is not None else "n/a"

    def r(x):
        return "%.2f" % x if x is not None else "n/a"

    first, later = sections["ttft_first_turn"], sections["ttft_later_turns"]
    rows = [
        ("1a", "TTFT ratio, first turn, warm on (sent once /health lists a warm process)",
         "%s (%s ÷ %s; warm hits %d/%d)" % (r(m["ttft_ratio_first_turn_warm"]), s(m["proxy_first_turn_warm_ttft_s"]),
                                            s(m["cli_cold_ttft_s"]), m["first_turn_warm_hits"],
                                            m["first_turn_warm_requests"]),
         BARS["ttft_ratio_first_turn_warm"][2], yes_no("ttft_ratio_first_turn_warm", m["ttft_ratio_first_turn_warm"])),
        ("1a", "TTFT ratio, first turn, warm on, warm process loaded (its CPU quiet for 1 s)",
         "%s (%s ÷ %s; warm hits %d/%d)" % (r(m["ttft_ratio_first_turn_warm_loaded"]),
                                            s(m["proxy_first_turn_warm_loaded_ttft_s"]), s(m["cli_cold_ttft_s"]),
                                            m["first_turn_warm_loaded_hits"], first["warm_loaded"]["requests"]),
         BARS["ttft_ratio_first_turn_warm_loaded"][2],
         yes_no("ttft_ratio_first_turn_warm_loaded", m["ttft_ratio_first_turn_warm_loaded"])),
        ("1a", "TTFT ratio, first turn, warm off (`--max-parked 0 --warm 0`)",
         "%s (%s ÷ %s)" % (r(m["ttft_ratio_first_turn_cold"]), s(m["proxy_first_turn_cold_ttft_s"]),
                           s(m["cli_cold_ttft_s"])), "—", "—"),
        ("1b", "TTFT ratio, turns 2–5, warm on (baseline: cold CLI first turn)",
         "%s (%s ÷ %s; process reused %d/%d)" % (r(m["ttft_ratio_later_turns_warm"]),
                                                 s(m["proxy_later_turns_warm_ttft_s"]), s(m["cli_cold_ttft_s"]),
                                                 m["later_turns_warm_reused"], m["later_turns_warm_count"]),
         BARS["ttft_ratio_later_turns_warm"][2],
         yes_no("ttft_ratio_later_turns_warm", m["ttft_ratio_later_turns_warm"])),
        ("1b", "TTFT ratio, turns 2–5, warm off (cold CLI resuming a session file)",
         "%s (%s ÷ %s)" % (r(m["ttft_ratio_later_turns_cold"]), s(m["proxy_later_turns_cold_ttft_s"]),
                           s(m["cli_cold_ttft_s"])), "—", "—"),
        ("2", "upstream request bytes, \"Say hi\" through the proxy",
         "%d B" % m["upstream_bytes_proxy"], "—", "—"),
        ("2", "upstream request bytes, bare `claude -p \"Say hi\"` (CLI defaults)",
         "%d B (%.1f× the proxy's)" % (m["upstream_bytes_bare_cli"],
                                       m["upstream_bytes_bare_cli"] / float(m["upstream_bytes_proxy"])), "—", "—"),
        ("2", "uncached prompt bytes, requests 2–8 of a conversation: reuse off ÷ reuse on",
         "%s (%d B ÷ %d B; empty upstream messages with reuse off: %d)" % (
             r(m["cold_path_uncached_bytes_ratio"]), sections["cold_path_bytes"]["cold"]["later_uncached_bytes"],
             sections["cold_path_bytes"]["reuse"]["later_uncached_bytes"], m["cold_path_empty_messages"]),
         BARS["cold_path_uncached_bytes_ratio"][2],
         yes_no("cold_path_uncached_bytes_ratio", m["cold_path_uncached_bytes_ratio"])),
        ("2b", "TTFT ratio, an agent's first turns (49,000-character system prompt, 12 tools, 1.5 s apart)",
         "%s (reused %d/%d)" % (r(m["ttft_ratio_agent_first_turns"]), sections["agent_first_turns"]["reused"],
                                sections["agent_first_turns"]["requests"]),
         BARS["ttft_ratio_agent_first_turns"][2],
         yes_no("ttft_ratio_agent_first_turns", m["ttft_ratio_agent_first_turns"])),
        ("2b", "TTFT ratio, 9 first turns back to back to a proxy up for 3 s (default flags)",
         "%s (reused %d/%d)" % (r(m["ttft_ratio_burst"]), m["burst_reused"], sections["burst"]["requests"]),
         BARS["ttft_ratio_burst"][2], yes_no("ttft_ratio_burst", m["ttft_ratio_burst"])),
        ("2b", "TTFT ratio, turns 3–5 of a client that rewrites its history (fresh context message each time)",
         "%s (reused %s; upstream saw only the current context: %s)" % (
             r(m["ttft_ratio_history_rewriting_turns_3_5"]),
             "".join("1" if x else "0" for x in sections["history_rewriting"]["reused"]),
             "yes" if m["history_rewriting_faithful_upstream"] else "no"),
         BARS["ttft_ratio_history_rewriting_turns_3_5"][2],
         yes_no("ttft_ratio_history_rewriting_turns_3_5", m["ttft_ratio_history_rewriting_turns_3_5"])),
        ("2b", "TTFT ratio, rounds 2–3 of six such sessions taking turns (one request every %.2f s), "
         "default flags" % SESSIONS_GAP,
         "%s (reused by round %s; upstream faithful: %s)" % (
             r(m["ttft_ratio_rewriting_sessions_rounds_2_3"]),
             "/".join(str(n) for n in sections["rewriting_sessions"]["default"]["reused_by_round"].values()),
             "yes" if m["rewriting_sessions_faithful_upstream"] else "no"),
         BARS["ttft_ratio_rewriting_sessions_rounds_2_3"][2],
         yes_no("ttft_ratio_rewriting_sessions_rounds_2_3", m["ttft_ratio_rewriting_sessions_rounds_2_3"])),
        ("3", "relay throughput, fake CLI words:%d, streaming" % RELAY_DELTAS,
         "%.0f chunks/s (fake CLI alone writes %.0f lines/s)" % (m["relay_chunks_per_s"],
                                                                 m["fake_cli_alone_lines_per_s"] or 0),
         BARS["relay_chunks_per_s"][2], yes_no("relay_chunks_per_s", m["relay_chunks_per_s"])),
        ("4", "%d concurrent streams (fake CLI slow:%s): successes" % (CONCURRENT_STREAMS, SLOW_DELAY),
         "%d/%d" % (m["concurrent_successes"], m["concurrent_streams"]),
         BARS["concurrent_successes"][2], yes_no("concurrent_successes", m["concurrent_successes"])),
        ("4", "added latency p50 / p99 (client total − fake CLI run directly, %s)" % s(
            sections["concurrent"]["fake_direct_median_s"]),
         "%s / %s" % (s(m["added_latency_p50_s"]), s(m["added_latency_p99_s"])), "—", "—"),
        ("4", "added latency p50 against %d fake CLIs run directly at the same time (their median %s)" % (
            CONCURRENT_STREAMS, s(m["fake_direct_32_at_once_median_s"])),
         s(m["added_latency_vs_32_at_once_p50_s"]), "—", "—"),
        ("4", "proxy peak RSS, %d streams (VmHWM; sampled VmRSS peak; idle before)" % CONCURRENT_STREAMS,
         "%.1f MB (%.1f MB; %.1f MB)" % (m["proxy_peak_rss_mb"] or 0, m["proxy_peak_vmrss_sampled_mb"] or 0,
                                         m["proxy_idle_rss_mb"] or 0),
         BARS["proxy_peak_rss_mb"][2], yes_no("proxy_peak_rss_mb", m["proxy_peak_rss_mb"])),
        ("5", "proxy cold start (zipapp): spawn → first TCP connect",
         s(m["cold_start_connect_s"]), "—", "—"),
        ("5", "proxy cold start (zipapp): spawn → /health answered",
         s(m["cold_start_health_s"]), BARS["cold_start_health_s"][2],
         yes_no("cold_start_health_s", m["cold_start_health_s"])),
        ("5", "same, `python3 claude_max_proxy.py` (compiles the module at every start); bare `python3 -c pass`",
         "%s; %s" % (s(m["cold_start_script_health_s"]), s(m["interpreter_start_s"])), "—", "—"),
    ]
    out = ["| # | measurement (median) | result | bar | meets bar |", "|---|---|---|---|---|"]
    out += ["| %s |" % " | ".join(row) for row in rows]
    return "\n".join(out)


def text_report(result):
    machine, m, sections = result["machine"], result["metrics"], result["sections"]
    repeats = result["repeats"]
    lines = [
        "# claude-max-proxy benchmark%s" % (" (--quick)" if result["quick"] else ""),
        "",
        "Machine: %s, %s cores (%s usable), %s GB RAM; Python %s; Claude CLI %s; proxy %s." % (
            machine["cpu_model"], machine["cores"], machine["cores_usable"], machine["ram_gb"],
            machine["python"], machine["cli_version"], machine["proxy_version"]),
        "Load average at start %s, at end %s (other work on this machine shows up as noise)." % (
            " ".join("%.2f" % x for x in machine["load_average_start"]),
            " ".join("%.2f" % x for x in machine["load_average_end"])),
        "Chat client for TTFT: %s. Repetitions: TTFT %d per series, %d conversations (%d samples of "
        "turns 2–5), relay %d, cold start %d." % (
            sections["ttft_later_turns"]["warm"]["client"], repeats["ttft"], repeats["conversations"],
            4 * repeats["conversations"], repeats["relay"], repeats["cold_start"]),
        "",
        table(m, sections),
        "",
        "Notes:",
        "- TTFT through the proxy: client sends the request → first content chunk. Cold CLI: process "
        "spawn (the proxy's own argv from `cli_args_for`) → first `content_block_delta` text event.",
        "- Turns 2–5 are compared with the cold CLI's *first-turn* TTFT: a CLI resumed cold from a "
        "session of the same history is the proxy's own warm-off path, reported on its own row.",
        "- /health lists a process as warm once it has answered the CLI's initialize handshake; the "
        "'loaded' row also waits for its CPU to go quiet for 1 s.",
        "- MB = 10^6 bytes. Leftover processes after the proxies stopped: %d." % result["leftover_processes"],
    ]
    return "\n".join(lines) + "\n"


# ================================================================================================
# main()
# ================================================================================================

def run(args, procs, budget):
    """All five measurements; the result that --json prints."""
    repeats = {name: counts[1 if args.quick else 0] for name, counts in REPEATS.items()}
    cli = real_cli.ensure_real_cli()
    machine = machine_description(cli, real_cli.cli_version(cli))
    home = tempfile.mkdtemp(prefix="claude-max-proxy-bench-")  # HOME of every process here
    progress("every process started here carries %s=%s" % (TAG_VAR, procs.tag))
    try:
        sections = measure_all(procs, budget, repeats, cli, home)
    finally:
        procs.end_all()
        shutil.rmtree(home, ignore_errors=True)
    machine["load_average_end"] = list(os.getloadavg())
    metrics = summary_of(sections)
    return {"quick": args.quick, "repeats": repeats, "machine": machine, "metrics": metrics,
            "bars": {k: {"comparison": v[0], "bound": v[1], "met": meets(k, metrics.get(k)),
                         "value": metrics.get(k)} for k, v in BARS.items()},
            "sections": sections, "leftover_processes": procs.leftovers}


def measure_all(procs, budget, repeats, cli, home):
    workdir = os.path.join(home, "cwd")
    os.makedirs(workdir)
    sections = {}
    upstream = fake_upstream.FakeUpstream().start()
    try:
        env = real_cli.cli_env(home, upstream.url)
        progress("1. time to first token (real CLI %s, fake upstream %s)" % (cli, upstream.url))
        sections["ttft_cold_cli"] = {"samples_s": ttft_cold_cli(procs, cli, env, workdir, repeats["ttft"], budget)}
        sections["ttft_first_turn"] = {
            "warm_health": ttft_first_turns(procs, cli, env, repeats["ttft"], budget, True, "health"),
            "warm_loaded": ttft_first_turns(procs, cli, env, repeats["ttft"], budget, True, "loaded"),
            "cold": ttft_first_turns(procs, cli, env, repeats["ttft"], budget, False, None),
        }
        sections["ttft_later_turns"] = {
            "warm": ttft_conversations(procs, cli, env, repeats["conversations"], budget, True),
            "cold": ttft_conversations(procs, cli, env, repeats["conversations"], budget, False),
        }
        progress("2. upstream request bytes")
        sections["upstream_bytes"] = upstream_bytes(procs, cli, env, upstream, workdir, budget)
        sections["cold_path_bytes"] = cold_path_bytes(procs, cli, env, upstream, budget)
        progress("2b. traffic shapes: an agent's first turns, a history-rewriting client")
        sections["agent_first_turns"] = ttft_agent_first_turns(procs, cli, env, budget, repeats["ttft"])
        sections["burst"] = ttft_burst(procs, cli, env, budget)
        sections["history_rewriting"] = ttft_history_rewriting(procs, cli, env, upstream, budget)
        sections["rewriting_sessions"] = {
            "default": ttft_rewriting_sessions(procs, cli, env, upstream, budget, gap=SESSIONS_GAP),
        }
    finally:
        upstream.stop()
    # What users run: the zipapp, whose bytecode is precompiled (the module file compiles at each start).
    program = build_pyz.build_pyz(MODULE, os.path.join(home, "claude_max_proxy.pyz"))
    progress("3. relay throughput (%s)" % program)
    sections["relay"] = relay_throughput(procs, repeats["relay"], budget, home, program)
    progress("4. %d concurrent streams" % CONCURRENT_STREAMS)
    sections["concurrent"] = concurrent_streams(procs, repeats["fake_direct"], budget, home, program)
    progress("5. cold start")
    sections["cold_start"] = cold_start(procs, repeats["cold_start"], budget, home, program)
    return sections


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 bench/bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke test)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds the whole run may take (default 1200, --quick 480)")
    args = parser.parse_args(argv)
    budget = Budget(args.time_limit or (480 if args.quick else 1200))
    procs = Processes()
    previous = {sig: signal.signal(sig, procs.interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        result = run(args, procs, budget)
    except real_cli.RealCliUnavailable as exc:
        sys.stderr.write("bench: the real Claude CLI is unavailable: %s\n" % exc)
        return 2
    except (BenchTimeout, RuntimeError, OSError) as exc:
        sys.stderr.write("bench: failed: %s: %s\n" % (type(exc).__name__, exc))
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("bench: interrupted\n")
        return 130
    finally:
        procs.end_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sys.stdout.write(json.dumps(result, indent=2) + "\n" if args.json else text_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
