"""Starting claude_max_proxy.py as a process, for the tests and the benchmarks (no pytest needed).

`ProxyProcess` runs `python3 claude_max_proxy.py --host 127.0.0.1 --port 0 ...` with a TMPDIR of
its own. The proxy passes its CLI children only allow-listed variables, TMPDIR among them, so that
directory tags every process the proxy starts and a scan of /proc (Linux) finds any it left
behind. A thread reads the proxy's stderr (the port it bound, then its access log); every wait is
on that output, bounded, never on time. tests/conftest.py, bench/bench.py and bench/load.py all
start proxies here; the benchmarks import this module by putting tests/ on sys.path.
"""

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = os.path.join(ROOT, "claude_max_proxy.py")
TAG_VAR = "TMPDIR"  # a directory of each proxy's own, inherited by every process it starts


def tagged_processes(variable, value, exclude=()):
    """PIDs of processes whose environment has variable=value, except those in `exclude`."""
    needle = ("%s=%s" % (variable, value)).encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        try:
            with open("/proc/%s/environ" % name, "rb") as handle:
                if needle in handle.read():
                    found.append(int(name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def http_request(port, method, path, body=None, headers=None, timeout=60):
    """(status, headers dict lower-cased, body bytes) over a fresh loopback connection; a body
    that is not bytes is sent as JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None
        hdrs = {"Host": "127.0.0.1:%d" % port}
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


class ProxyProcess:
    """A running proxy: its port and URL, its stderr lines and access log, /health; `stop` ends
    and reaps it, `kill_leftovers` then finds (and kills) any process of its that outlived it."""

    def __init__(self, args, env, tmp=None, cwd=None, start_timeout=20.0, program=MODULE,
                 python=sys.executable):
        self.tmp = tmp or tempfile.mkdtemp(prefix="proxy-tmp-")  # a given one: a restart's, kept
        self.owns_tmp = tmp is None
        self.tag = self.tmp
        env = dict(env)
        env[TAG_VAR] = self.tag
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.argv = [python, program, "--host", "127.0.0.1", "--port", "0"] + list(args)
        self.lines = []
        self.lines_changed = threading.Condition()
        self.stderr_ended = False
        self.port = self.url = None
        self.proc = self.spawn(self.argv, env, cwd or ROOT)
        self.reader = threading.Thread(target=self._read_stderr, daemon=True)
        self.reader.start()
        line = self.wait_for_line("listening on http://", start_timeout)
        if line is None:
            self.stop()
            raise RuntimeError("the proxy did not start:\n" + "\n".join(self.lines[-20:]))
        self.port = int(line.rsplit(":", 1)[1].split("/", 1)[0])
        self.url = "http://127.0.0.1:%d" % self.port

    def spawn(self, argv, env, cwd):
        """The proxy's Popen, its stderr a pipe (bench.py spawns through its process tracker)."""
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=env, cwd=cwd)

    def _read_stderr(self):
        # Reading to EOF also keeps a busy access log from filling the pipe and blocking the proxy.
        try:
            for raw in iter(self.proc.stderr.readline, b""):
                with self.lines_changed:
                    self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                    self.lines_changed.notify_all()
        except (OSError, ValueError):
            pass  # the pipe was closed under us: the proxy has been ended
        finally:
            with self.lines_changed:
                self.stderr_ended = True
                self.lines_changed.notify_all()

    # -- its output ----------------------------------------------------------------------------

    def wait_for(self, found, timeout):
        """Wait (bounded, on new output) until `found()` is not None; its value, or None once the
        output has ended or `timeout` has passed."""
        deadline = time.monotonic() + timeout
        with self.lines_changed:
            while True:
                value = found()
                if value is not None:
                    return value
                left = deadline - time.monotonic()
                if left <= 0 or self.stderr_ended:
                    return None
                self.lines_changed.wait(min(left, 0.5))

    def wait_for_line(self, needle, timeout=10.0, start=0):
        """The first stderr line from index `start` containing `needle`, or None."""
        return self.wait_for(lambda: next((l for l in self.lines[start:] if needle in l), None), timeout)

    def access_lines(self):
        with self.lines_changed:
            return [l for l in self.lines if " req_" in l]

    def chat_log(self):
        """Access-log entries of chat completions, in order: dicts with ttft and reused."""
        entries = []
        for line in self.access_lines():
            if "/v1/chat/completions" not in line:
                continue
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            ttft = fields.get("ttft", "-")
            entries.append({"ttft": float(ttft) if ttft != "-" else None,
                            "reused": fields.get("reused") == "1"})
        return entries

    def wait_for_log(self, count, timeout):
        """The chat log once it has `count` entries, or as it is after `timeout` seconds."""
        self.wait_for(lambda: True if len(self.chat_log()) >= count else None, timeout)
        return self.chat_log()

    # -- HTTP ----------------------------------------------------------------------------------

    def request(self, method, path, body=None, headers=None, timeout=60):
        return http_request(self.port, method, path, body, headers, timeout)

    def chat(self, body, headers=None, timeout=60):
        return self.request("POST", "/v1/chat/completions", body, headers, timeout)

    def health(self, timeout=10):
        """/health's report; RuntimeError on any other status than 200."""
        status, _, body = http_request(self.port, "GET", "/health", timeout=timeout)
        if status != 200:
            raise RuntimeError("/health answered %d: %r" % (status, body[:200]))
        return json.loads(body.decode("utf-8"))

    # -- ending it -----------------------------------------------------------------------------

    def stop(self, sig=signal.SIGTERM, timeout=15):
        """`sig` (it drains on SIGTERM), a bounded wait, SIGKILL; reaped. Its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.reader.join(2.0)  # the last of its log
        return self.proc.returncode

    def tagged_pids(self):
        """Live processes this proxy started (directly or not), the proxy itself excluded."""
        return tagged_processes(TAG_VAR, self.tag, exclude=(self.proc.pid,))

    def kill_leftovers(self, wait=5.0):
        """After `stop`: the processes it started that are still alive once killed groups have
        had `wait` seconds to go, each killed; their pids."""
        deadline = time.monotonic() + wait
        while self.tagged_pids() and time.monotonic() < deadline:
            time.sleep(0.05)  # bounded wait for the kernel to finish tearing down killed groups
        left = self.tagged_pids()
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return left

    def remove_tmp(self):
        if self.owns_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
