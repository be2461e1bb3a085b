"""bench/load.py run small: a burst of streaming requests against a capped proxy on the fake CLI.

Every request must end as the full answer or as a 429 with Retry-After, and the proxy's threads,
open fds, child processes and temp dirs must be back at their baseline once it is idle. No timing
checks: the script's latencies are for people, not for CI.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # minutes of benchmark: CI runs it (.ci/run), a local run skips it

LOAD = os.path.join(ROOT, "bench", "load.py")
REQUESTS = 16


def run_load(args, timeout=240):
    """(exit status, stdout, stderr) of bench/load.py; on a timeout its whole group is killed,
    the proxy it started included."""
    proc = subprocess.Popen([sys.executable, LOAD] + args, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError("bench/load.py ran over %d s:\n%s" % (timeout, err.decode(errors="replace")))
    return proc.returncode, out.decode(), err.decode(errors="replace")


def test_small_burst_is_answered_in_full_or_refused_with_retry_after_and_nothing_leaks():
    status, out, err = run_load(["--requests", str(REQUESTS), "--concurrency", "2", "--json"])
    assert status == 0, out + err
    report = json.loads(out)
    assert report["requests"] == REQUESTS
    assert report["other"] == 0, report["other_details"]
    assert report["full"] + report["rate_limited"] == REQUESTS, report
    assert report["full"] >= 2, report  # at least the requests that found a free slot
    assert report["went_idle"], report["health_after"]
    assert set(report["baseline"]) >= {"threads", "fds", "children"}, report["baseline"]
    for key in report["baseline"]:
        assert report["after"][key] <= report["baseline"][key], (key, report["baseline"], report["after"])
    assert report["left_after_exit"] == 0, report["stderr_tail"]
    assert report["temp_dirs_left_after_exit"] == 0, report["stderr_tail"]
    assert report["ok"]
