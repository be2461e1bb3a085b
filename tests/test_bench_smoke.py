"""Smoke test of bench/bench.py: a --quick run finishes and reports every metric.

Speed is what the benchmark reports, not what a test asserts: only presence, types and
plausibility are checked here (and that no process outlived the run).
"""

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # minutes of benchmark: CI runs it (.ci/run), a local run skips it

BENCH = os.path.join(ROOT, "bench", "bench.py")
RUN_TIMEOUT = 900  # the benchmark's own --quick limit is 480 s; this only guards against a hang

SECONDS = ("cli_cold_ttft_s", "proxy_first_turn_warm_ttft_s", "proxy_first_turn_warm_loaded_ttft_s",
           "proxy_first_turn_cold_ttft_s", "proxy_later_turns_warm_ttft_s", "proxy_later_turns_cold_ttft_s",
           "fake_direct_32_at_once_median_s", "cold_start_connect_s", "cold_start_health_s",
           "cold_start_script_health_s", "interpreter_start_s")
SIGNED_SECONDS = ("added_latency_p50_s", "added_latency_p99_s", "added_latency_vs_32_at_once_p50_s")
RATIOS = ("ttft_ratio_first_turn_warm", "ttft_ratio_first_turn_warm_loaded", "ttft_ratio_first_turn_cold",
          "ttft_ratio_later_turns_warm", "ttft_ratio_later_turns_cold", "cold_path_uncached_bytes_ratio",
          "ttft_ratio_agent_first_turns", "ttft_ratio_history_rewriting_turns_3_5", "ttft_ratio_burst",
          "ttft_ratio_rewriting_sessions_rounds_2_3")
RATES = ("relay_chunks_per_s", "fake_cli_alone_lines_per_s")
SIZES = ("upstream_bytes_proxy", "upstream_bytes_bare_cli", "proxy_peak_rss_mb", "proxy_peak_vmrss_sampled_mb",
         "proxy_idle_rss_mb")
COUNTS = ("first_turn_warm_hits", "first_turn_warm_requests", "first_turn_warm_loaded_hits",
          "later_turns_warm_reused", "later_turns_warm_count", "concurrent_successes", "concurrent_streams",
          "cold_path_empty_messages", "burst_reused")
FLAGS = ("history_rewriting_faithful_upstream", "rewriting_sessions_faithful_upstream")


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_bench(env):
    proc = subprocess.Popen([sys.executable, BENCH, "--quick", "--json"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the benchmark ends its own processes on SIGTERM
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError("bench.py --quick ran over %d s:\n%s" % (RUN_TIMEOUT, err.decode()[-3000:]))
    assert proc.returncode == 0, "bench.py exited %d:\n%s" % (proc.returncode, err.decode()[-3000:])
    return json.loads(out.decode("utf-8"))


def test_quick_benchmark_reports_every_metric(real_claude):
    result = run_bench(dict(os.environ, CLAUDE_MAX_PROXY_TEST_CLI=real_claude))
    metrics = result["metrics"]
    expected = SECONDS + SIGNED_SECONDS + RATIOS + RATES + SIZES + COUNTS + FLAGS
    assert sorted(metrics) == sorted(expected), "metrics changed: update this test with bench.py"
    for name in SECONDS + RATIOS + RATES + SIZES:
        assert is_number(metrics[name]) and metrics[name] > 0, (name, metrics[name])
    for name in SIGNED_SECONDS:
        assert is_number(metrics[name]), (name, metrics[name])
    for name in FLAGS:
        assert metrics[name] in (True, False), (name, metrics[name])
    for name in COUNTS:
        assert isinstance(metrics[name], int) and not isinstance(metrics[name], bool), (name, metrics[name])
    assert 0 <= metrics["first_turn_warm_hits"] <= metrics["first_turn_warm_requests"]
    assert 0 <= metrics["later_turns_warm_reused"] <= metrics["later_turns_warm_count"]
    assert metrics["later_turns_warm_count"] == 4 * result["repeats"]["conversations"]
    assert 0 <= metrics["concurrent_successes"] <= metrics["concurrent_streams"] == 32
    assert metrics["cold_start_connect_s"] <= metrics["cold_start_health_s"]
    assert metrics["upstream_bytes_proxy"] == int(metrics["upstream_bytes_proxy"])

    for name, bar in result["bars"].items():
        assert bar["met"] in (True, False), (name, bar)
        assert bar["value"] == metrics[name]
    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"] and machine["python"]
    assert machine["cli_version"].split()[0].count(".") == 2
    assert result["quick"] is True
    assert result["leftover_processes"] == 0, "processes outlived the proxy that started them"
