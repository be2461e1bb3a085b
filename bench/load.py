#!/usr/bin/env python3
"""Bounded loopback load test: many streaming requests at once against a proxy with a small cap.

Starts claude_max_proxy.py on 127.0.0.1 (ephemeral port) with tests/fake_claude.py as the CLI,
each answer streamed slowly (`slow:DELAY`, ~0.5 s in all), then fires --requests streaming
requests at the same moment, one thread and one connection each, every one with a hard deadline.
Each must end as a full answer (the fake's text, then [DONE]) or as a 429 with Retry-After; any
other outcome is a failure. The proxy's threads, open fds and child processes (from /proc) and its
private temp dirs (its TMPDIR is one of ours) are read before the load (idle, after a warm-up
request) and after it (once /health shows no request in flight and no idle CLI process), and
must be back at their baseline. Stdlib only; Linux (/proc).

    python3 bench/load.py                        # 64 requests, --max-concurrency 4, --max-queue 8
    python3 bench/load.py --requests 16 --concurrency 2 --json

Exit status: 0 all well; 1 a request ended otherwise or a resource stayed above its baseline;
2 the proxy did not start. The proxy is ended on every path (SIGTERM, then SIGKILL), and any
process it leaves behind is reported and killed.
"""

import argparse
import http.client
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY = os.path.join(ROOT, "claude_max_proxy.py")
FAKE_CLAUDE = os.path.join(ROOT, "tests", "fake_claude.py")
HELLO = "Hello from the fake CLI."  # what tests/fake_claude.py answers in its text/slow modes

sys.path.insert(0, os.path.join(ROOT, "tests"))
from launch import ProxyProcess  # noqa: E402  (the proxy launcher the tests use too)


# ---- the proxy process ---------------------------------------------------------------------------

def resources(proxy):
    """The proxy's thread count, open fds and descendant processes, from /proc."""
    pid = proxy.proc.pid
    with open("/proc/%d/status" % pid) as handle:
        threads = next(int(line.split()[1]) for line in handle if line.startswith("Threads:"))
    return {"threads": threads, "fds": len(os.listdir("/proc/%d/fd" % pid)),
            "children": len(proxy.tagged_pids()),
            "temp_dirs": len(os.listdir(proxy.tmp)) if proxy.tmp else 0}


def settled_resources(proxy, baseline=None, timeout=5.0):
    """Resources once transient handler threads have gone: the lowest reading per count within
    `timeout`, or the first reading at or below `baseline` (a leak never gets there)."""
    lowest = None
    deadline = time.monotonic() + timeout
    while True:
        now = resources(proxy)
        lowest = now if lowest is None else {k: min(v, now[k]) for k, v in lowest.items()}
        if baseline is not None and all(now[k] <= baseline[k] for k in baseline):
            return now
        if time.monotonic() >= deadline:
            return lowest
        time.sleep(0.05)


# ---- HTTP ------------------------------------------------------------------------------------------

def in_flight(report):
    """Requests the proxy is serving or queueing, and idle CLI processes it keeps (if it pools)."""
    slots = report.get("slots") or {}
    pooled = report.get("processes") or {}
    return slots.get("busy", 0) + slots.get("waiting", 0), pooled.get("warm", 0) + pooled.get("parked", 0)


def wait_idle(proxy, timeout):
    """Poll /health until no slot is busy, nobody waits and no idle process is kept; bounded."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = proxy.health(timeout=5.0)
            busy, pooled = in_flight(last)
            if busy == 0 and pooled == 0:
                return True, last
        except (OSError, ValueError, RuntimeError, http.client.HTTPException) as exc:
            last = {"error": repr(exc)}
        time.sleep(0.1)
    return False, last


def stream_body(delay):
    return json.dumps({"model": "claude-sonnet-4", "stream": True, "messages": [
        {"role": "user", "content": "load test @@fake:slow:%s@@" % delay}]}).encode()


def sse_text(raw):
    """(answer text, ended with [DONE], error events) of an SSE body."""
    text, done, errors = [], False, []
    for block in raw.decode("utf-8", "replace").split("\n\n"):
        for line in block.split("\n"):
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                done = True
                continue
            chunk = json.loads(payload)
            if "error" in chunk:
                errors.append(chunk["error"])
            for choice in chunk.get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
    return "".join(text), done, errors


def read_until(response, sock, deadline):
    """The whole response body, giving up at the deadline however slowly it trickles in."""
    parts = []
    while not response.isclosed():
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the answer did not end in time")
        sock.settimeout(left)
        data = response.read(65536)
        if not data:
            break
        parts.append(data)
    return b"".join(parts)


def one_request(port, body, barrier, timeout):
    """One streaming request on its own connection: a result dict whatever happens."""
    result = {"outcome": "other", "status": None, "latency": None, "detail": ""}
    deadline = time.monotonic() + timeout
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.connect()
        try:
            barrier.wait(timeout)  # everyone connected: fire together
        except threading.BrokenBarrierError:
            pass
        started = time.monotonic()
        deadline = started + timeout
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json", "Connection": "close"})
        sock = conn.sock  # getresponse hands a closing connection's socket to the response
        response = conn.getresponse()
        raw = read_until(response, sock, deadline)
        result["status"] = response.status
        result["latency"] = time.monotonic() - started
        if response.status == 200:
            text, done, errors = sse_text(raw)
            if done and not errors and text == HELLO:
                result["outcome"] = "full"
            else:
                result["detail"] = "200 but text %r, [DONE] %s, errors %s" % (text, done, errors)
        elif response.status == 429:
            retry_after = response.getheader("Retry-After")
            error = json.loads(raw).get("error") or {}
            if retry_after and retry_after.strip().isdigit() and error.get("type") == "rate_limit_error":
                result["outcome"] = "rate_limited"
            else:
                result["detail"] = "429 with Retry-After %r and body %r" % (retry_after, raw[:200])
        else:
            result["detail"] = "status %d: %r" % (response.status, raw[:300])
    except Exception as exc:  # any failure is a result to report, not a crash of the bench
        result["detail"] = "%s: %s" % (type(exc).__name__, exc)
    finally:
        conn.close()
    return result


def fire(port, count, body, timeout):
    """`count` requests at once, one thread each; every thread is bounded by `timeout`."""
    barrier = threading.Barrier(count)
    results = [None] * count

    def run(i):
        results[i] = one_request(port, body, barrier, timeout)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    end = time.monotonic() + timeout * 2 + 10
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    return [r or {"outcome": "other", "status": None, "latency": None, "detail": "did not finish"}
            for r in results]


# ---- the run -------------------------------------------------------------------------------------

def percentile(values, fraction):
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def proxy_flags(python, proxy_path):
    """The flags the proxy under test understands (it is changing; only ask for what exists)."""
    try:
        out = subprocess.run([python, proxy_path, "--help"], capture_output=True, timeout=20,
                             stdin=subprocess.DEVNULL)
        return out.stdout.decode("utf-8", "replace")
    except (OSError, subprocess.TimeoutExpired):
        return ""


def run_load(options):
    """Start the proxy, measure, load, measure again, stop it; the numbers as a dict."""
    home = tempfile.mkdtemp(prefix="claude-max-proxy-bench-")
    args = ["--claude", options.claude, "--max-concurrency", str(options.concurrency),
            "--max-queue", str(options.max_queue), "--workdir", os.path.join(home, "cwd")]
    if "--parked-ttl" in proxy_flags(options.python, options.proxy):
        # Idle CLI processes are kept by design; a short life lets the "after" reading see them go.
        args += ["--parked-ttl", str(options.parked_ttl)]
    args += options.proxy_arg
    os.makedirs(os.path.join(home, "tmp"))  # the proxy's TMPDIR: its private temp dirs land here
    env = dict(os.environ, HOME=home)
    env.pop("FAKE_CLAUDE_MODE", None)
    report = {"requests": options.requests, "max_concurrency": options.concurrency,
              "max_queue": options.max_queue, "delay": options.delay}
    proxy = ProxyProcess(args, env, tmp=os.path.join(home, "tmp"), program=options.proxy,
                         python=options.python)
    report["proxy_args"] = proxy.argv[2:]
    try:
        body = stream_body(options.delay)
        # Warm-up: the probe of `claude --version` done, the first request served and let go.
        warm = one_request(proxy.port, body, threading.Barrier(1), options.timeout)
        if warm["outcome"] != "full":
            raise RuntimeError("the warm-up request failed: %s" % warm["detail"])
        idle, last = wait_idle(proxy, options.settle)
        if not idle:
            raise RuntimeError("the proxy did not go idle after the warm-up: %s" % last)
        report["baseline"] = settled_resources(proxy, timeout=1.0)

        started = time.monotonic()
        results = fire(proxy.port, options.requests, body, options.timeout)
        report["wall_seconds"] = round(time.monotonic() - started, 3)

        idle, last = wait_idle(proxy, options.settle)
        report["went_idle"] = idle
        report["health_after"] = last
        report["after"] = settled_resources(proxy, report["baseline"], timeout=options.settle)
    finally:
        proxy.stop()
        left = proxy.kill_leftovers()
        report["left_after_exit"] = len(left)
        report["temp_dirs_left_after_exit"] = len(os.listdir(proxy.tmp))
        report["exit_status"] = proxy.proc.returncode
        report["stderr_tail"] = proxy.lines[-20:]
        shutil.rmtree(home, ignore_errors=True)
    full = [r for r in results if r["outcome"] == "full"]
    others = [r for r in results if r["outcome"] == "other"]
    latencies = [r["latency"] for r in full]
    report.update({
        "full": len(full),
        "rate_limited": sum(1 for r in results if r["outcome"] == "rate_limited"),
        "other": len(others),
        "other_details": [r["detail"] for r in others][:20],
        "latency_p50": round(percentile(latencies, 0.50), 3) if latencies else None,
        "latency_p99": round(percentile(latencies, 0.99), 3) if latencies else None,
        "latency_max": round(max(latencies), 3) if latencies else None,
    })
    above = [k for k in report["baseline"] if report["after"][k] > report["baseline"][k]]
    report["above_baseline"] = above
    report["ok"] = (not others and not above and report["went_idle"] and not report["left_after_exit"]
                    and not report["temp_dirs_left_after_exit"]
                    and report["full"] + report["rate_limited"] == options.requests)
    return report


def table(report):
    lines = [
        "claude-max-proxy load: %d streaming requests at once, --max-concurrency %d, --max-queue %d, "
        "fake CLI slow:%s" % (report["requests"], report["max_concurrency"], report["max_queue"],
                              report["delay"]),
        "  %-26s %8d" % ("requests", report["requests"]),
        "  %-26s %8d" % ("full answers", report["full"]),
        "  %-26s %8d" % ("429 with Retry-After", report["rate_limited"]),
        "  %-26s %8d" % ("other", report["other"]),
    ]
    for name in ("latency_p50", "latency_p99", "latency_max"):
        value = report[name]
        lines.append("  %-26s %8s" % (name.replace("_", " ") + " (full)",
                                      "-" if value is None else "%.3f s" % value))
    lines.append("  %-26s %8.3f s" % ("wall time of the burst", report["wall_seconds"]))
    lines.append("  %-26s %8s %8s" % ("", "baseline", "after"))
    for key, label in (("threads", "proxy threads"), ("fds", "proxy open fds"),
                       ("children", "child processes"), ("temp_dirs", "private temp dirs")):
        lines.append("  %-26s %8d %8d%s" % (label, report["baseline"][key], report["after"][key],
                                            "   <- above baseline" if key in report["above_baseline"] else ""))
    lines.append("  %-26s %8s %8d" % ("processes left after exit", "-", report["left_after_exit"]))
    lines.append("  %-26s %8s %8d" % ("temp dirs left after exit", "-", report["temp_dirs_left_after_exit"]))
    for detail in report["other_details"]:
        lines.append("  other: " + detail)
    if not report["went_idle"]:
        lines.append("  the proxy did not go idle: %s" % report["health_after"])
    lines.append("result: %s" % ("OK" if report["ok"] else "FAIL"))
    return "\n".join(lines)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64, help="requests fired at once (default 64)")
    p.add_argument("--concurrency", type=int, default=4, help="the proxy's --max-concurrency (default 4)")
    p.add_argument("--max-queue", type=int, default=8, help="the proxy's --max-queue (default 8)")
    p.add_argument("--delay", type=float, default=0.1,
                   help="seconds before each of the fake's 5 deltas (default 0.1: ~0.5 s per answer)")
    p.add_argument("--timeout", type=float, default=60.0, help="hard deadline of one request (default 60)")
    p.add_argument("--settle", type=float, default=15.0,
                   help="seconds the proxy gets to go idle and release resources (default 15)")
    p.add_argument("--parked-ttl", type=float, default=1.0,
                   help="the proxy's --parked-ttl, if it has one (default 1)")
    p.add_argument("--proxy-arg", action="append", default=[],
                   help="one more argument for the proxy (repeatable: --proxy-arg=--warm --proxy-arg=0)")
    p.add_argument("--proxy", default=PROXY, help="claude_max_proxy.py to run")
    p.add_argument("--claude", default=FAKE_CLAUDE, help="the fake CLI to give it")
    p.add_argument("--python", default=sys.executable, help="interpreter for the proxy")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    return p


def main(argv=None):
    options = parser().parse_args(argv)
    # SIGTERM ends the run like Ctrl-C does: through the `finally` that stops the proxy.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if options.requests < 1 or options.concurrency < 1 or options.max_queue < 0:
        parser().error("--requests and --concurrency must be positive, --max-queue not negative")
    try:
        report = run_load(options)
    except RuntimeError as exc:
        sys.stderr.write("bench/load.py: %s\n" % exc)
        return 2
    print(json.dumps(report, indent=2) if options.json else table(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
