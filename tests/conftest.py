"""Shared fixtures: the fake upstream, the pinned real CLI, and proxies run as real processes.

Every proxy a test starts runs as `python3 claude_max_proxy.py --port 0` in a subprocess with a
TMPDIR of its own (tests/launch.py, which the benchmarks share). The proxy passes its CLI children only an allow-list of variables, TMPDIR among
them (nothing test-only gets through), so that directory tags every process the proxy starts;
teardown stops the proxy and looks through /proc for any process still carrying it, so a leaked
`claude` fails the test. The fake `claude` gets its FAKE_CLAUDE_* settings from a wrapper script.
"""

import os
import shlex
import sys
import tempfile
import time
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import fake_upstream  # noqa: E402
import launch  # noqa: E402
from launch import MODULE  # noqa: E402,F401  (tests import it from here)
import openapi_check  # noqa: E402
import real_cli  # noqa: E402

FAKE_CLAUDE = os.path.join(HERE, "fake_claude.py")
REQUIRE_E2E = os.environ.get("CLAUDE_MAX_PROXY_REQUIRE_E2E") == "1"
RUN_SLOW = os.environ.get("CLAUDE_MAX_PROXY_SLOW_TESTS") == "1"


def pytest_collection_modifyitems(config, items):
    """The slow benchmark smoke tests run only when asked for (.ci/run asks, so CI runs them)."""
    if RUN_SLOW:
        return
    skip = pytest.mark.skip(reason="slow: set CLAUDE_MAX_PROXY_SLOW_TESTS=1 to run it (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ---- the fake Anthropic API and the real CLI ----------------------------------------------------

@pytest.fixture(scope="session")
def upstream():
    server = fake_upstream.FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def real_claude():
    """The pinned real CLI; a failure (not a skip) when CLAUDE_MAX_PROXY_REQUIRE_E2E=1."""
    try:
        return real_cli.ensure_real_cli()
    except real_cli.RealCliUnavailable as exc:
        message = "REAL CLAUDE CLI UNAVAILABLE, end-to-end tests cannot run: %s" % exc
        if REQUIRE_E2E:
            pytest.fail(message)
        sys.stderr.write("\n\n*** %s ***\n\n" % message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def cli_home(tmp_path_factory):
    """A throwaway HOME for the whole session: no real login, settings or CLAUDE.md leak in."""
    return str(tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="session")
def e2e_env(cli_home, upstream):
    return real_cli.cli_env(cli_home, upstream.url)


# ---- proxies as real processes --------------------------------------------------------------------

class Proxy(launch.ProxyProcess):
    """A test's proxy (tests/launch.py): every answer read through `request` is spec-checked."""

    def request(self, method, path, body=None, headers=None, timeout=60):
        return http_request(self.port, method, path, body, headers, timeout)


def http_request(port, method, path, body=None, headers=None, timeout=60):
    """(status, headers dict lower-cased, body bytes) over a fresh connection, spec-checked."""
    answer = launch.http_request(port, method, path, body, headers, timeout)
    spec_checked(method, path, *answer)
    return answer


SPEC_CHECKS = {"answers": 0, "failures": []}


def spec_checked(method, path, status, headers, raw):
    """Every answer a test reads must conform to the official OpenAI OpenAPI document."""
    failures = openapi_check.failures_for(method, path, status, headers, raw)
    SPEC_CHECKS["answers"] += 1
    SPEC_CHECKS["failures"] += failures
    assert not failures, "the answer departs from the OpenAI spec:\n" + "\n".join(failures[:10])


def spec_checked_http_client():
    """An HTTP client for the openai SDK that checks every answer like http_request does."""
    import openai

    def check(response):
        response.read()
        spec_checked(response.request.method, response.request.url.raw_path.decode("ascii"),
                     response.status_code, {k.lower(): v for k, v in response.headers.items()},
                     response.content)
    return openai.DefaultHttpxClient(event_hooks={"response": [check]})


def pytest_terminal_summary(terminalreporter):
    if openapi_check.spec() is None:
        terminalreporter.write_line("openapi: answers NOT checked (install %s, pyyaml and jsonschema)"
                                    % openapi_check.SPEC_PACKAGE)
    elif SPEC_CHECKS["answers"]:
        terminalreporter.write_line("openapi: %d answers checked against the OpenAI spec (%s), %d failures"
                                    % (SPEC_CHECKS["answers"], openapi_check.SPEC_PACKAGE,
                                       len(SPEC_CHECKS["failures"])))


def sse_payloads(raw):
    """The `data:` payloads of an SSE body, in order."""
    out = []
    for block in raw.decode("utf-8").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                out.append(line[6:])
    return out


def wait_until(predicate, timeout=5.0, what="a condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail("waited %.1f s for %s" % (timeout, what))
        time.sleep(0.02)  # bounded polling for a state change, not a guess at timing


# ---- reading what the fake upstream received ----------------------------------------------------

def marker():
    """A unique tag for a prompt, to find the upstream requests it caused."""
    return "@@id:%s@@" % uuid.uuid4().hex


def upstream_texts(body):
    """(role, text) for every message the upstream received, skipping the CLI's system rows."""
    out = []
    for message in body["messages"]:
        if message["role"] == "system":
            continue
        content = message["content"]
        text = content if isinstance(content, str) else "".join(
            b.get("text", "") for b in content if b.get("type") == "text")
        out.append((message["role"], text))
    return out


def only_request(upstream, mark):
    bodies = upstream.messages_requests(mark)
    assert len(bodies) == 1, "expected exactly one upstream model call, got %d" % len(bodies)
    return bodies[0]



@pytest.fixture
def start_proxy():
    """start_proxy(args, env) -> Proxy; each one stopped, and checked for leaks, at teardown."""
    proxies = []

    def start(args=(), env=None, tmp=None):
        proxy = Proxy(args, env if env is not None else dict(os.environ), tmp=tmp)
        proxies.append(proxy)
        return proxy

    yield start
    leaks = []
    for proxy in proxies:  # all of them first: a restarted proxy shares its predecessor's TMPDIR
        proxy.stop()
    for proxy in proxies:
        leaks += proxy.kill_leftovers()
        proxy.remove_tmp()
    assert not leaks, "processes outlived their proxy: %s" % leaks


@pytest.fixture
def e2e_proxy(start_proxy, real_claude, e2e_env):
    """A proxy driving the real CLI against the fake upstream."""
    return start_proxy(["--claude", real_claude], e2e_env)


@pytest.fixture
def fake_proxy(start_proxy, tmp_path):
    """start a proxy on the fake `claude`: fake_proxy(extra_args, **env) -> Proxy.

    FAKE_CLAUDE_* settings reach the fake through a wrapper script, since the proxy passes its CLI
    only allow-listed variables; the rest of `env` is the proxy's environment."""
    def start(args=(), tmp=None, **env):
        full = dict(os.environ)
        full["HOME"] = str(tmp_path)
        fake = {k: str(v) for k, v in env.items() if k.startswith("FAKE_CLAUDE_")}
        full.update({k: str(v) for k, v in env.items() if k not in fake})
        wrapper = os.path.join(tempfile.mkdtemp(prefix="fake-claude-", dir=str(tmp_path)), "claude")
        with open(wrapper, "w") as handle:
            handle.write("#!/bin/sh\n%sexec %s %s \"$@\"\n" % (
                "".join("export %s=%s\n" % (k, shlex.quote(v)) for k, v in sorted(fake.items())),
                shlex.quote(sys.executable), shlex.quote(FAKE_CLAUDE)))
        os.chmod(wrapper, 0o755)
        # Fault tests watch single processes come and go: process reuse is tested on its own.
        reuse = [] if "--max-parked" in args else ["--max-parked", "0"]
        proxy = start_proxy(["--claude", wrapper] + reuse + list(args), full, tmp)
        proxy.claude = wrapper
        return proxy
    return start
