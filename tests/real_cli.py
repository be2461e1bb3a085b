"""Find or install the pinned Claude Code CLI that the end-to-end tests run.

The e2e tests drive the real `claude` executable against tests/fake_upstream.py on loopback.
So that every machine runs the same CLI, it is pinned to one npm version and installed into
<repo>/.cache/claude-cli, never globally.

    ensure_real_cli()   path of the pinned executable, installing it with npm if needed
    cli_env(...)        environment that points the CLI at the fake upstream, not the real API
    python tests/real_cli.py    install ahead of time and print the path (tests/run.sh, .ci/run)

CLAUDE_MAX_PROXY_TEST_CLI=/path/to/claude replaces the pinned install: it is used as given,
never installed, and only has to answer `--version`.
"""

import argparse
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

try:
    import fcntl
except ImportError:  # Windows: no install lock, concurrent first runs may race
    fcntl = None

PINNED_CLI_VERSION = "2.1.332"
CLI_PACKAGE = "@anthropic-ai/claude-code"
CLI_OVERRIDE_ENV = "CLAUDE_MAX_PROXY_TEST_CLI"

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(REPO_DIR, ".cache", "claude-cli")

INSTALL_TIMEOUT = 600
# The CLI is a large native binary; its first start on a cold disk can take a while.
VERSION_TIMEOUT = 60
OUTPUT_TAIL_LINES = 25

# The CLI is logged in as a subscriber is: an OAuth token, never an API key (rate-limit events
# and the subscription's billing path exist only with OAuth).
FAKE_OAUTH_TOKEN = "sk-ant-oat01-fake-token-for-tests"
# Settings that would send the CLI to a real account or read a real user's configuration.
FOREIGN_SETTINGS = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CONFIG_DIR",
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
)
# Stops update checks, telemetry and similar background requests to the real service.
QUIET_SETTINGS = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
}


class RealCliUnavailable(RuntimeError):
    """The real CLI cannot be used here; the message says precisely why."""


def pinned_cli_path():
    """Where npm puts the pinned executable inside CACHE_DIR."""
    return os.path.join(CACHE_DIR, "node_modules", ".bin", "claude")


def ensure_real_cli(install=True):
    """Return the absolute path of a usable CLI, installing the pinned one when allowed."""
    override = os.environ.get(CLI_OVERRIDE_ENV)
    if override:
        return checked_override(override)

    path = pinned_cli_path()
    problem = pinned_cli_problem(path)
    if problem is None:
        return path
    if not install:
        raise RealCliUnavailable(problem + "; run `python tests/real_cli.py` to install it")
    with install_lock():
        # Another test process may have finished the install while this one waited.
        if pinned_cli_problem(path) is not None:
            npm_install()
    problem = pinned_cli_problem(path)
    if problem is not None:
        raise RealCliUnavailable("after npm install, " + problem)
    return path


def checked_override(value):
    """Resolve CLAUDE_MAX_PROXY_TEST_CLI and make sure the executable runs."""
    path = value if os.sep in value else shutil.which(value)
    if path is None or not os.path.isfile(path):
        raise RealCliUnavailable("%s=%s: no such executable" % (CLI_OVERRIDE_ENV, value))
    path = os.path.abspath(path)
    cli_version(path)
    return path


def pinned_cli_problem(path):
    """Return why `path` is not the pinned CLI, or None if it is."""
    if not os.path.exists(path):
        return "pinned CLI %s@%s is not installed at %s" % (CLI_PACKAGE, PINNED_CLI_VERSION, path)
    try:
        version = cli_version(path)
    except RealCliUnavailable as exc:
        return str(exc)
    # Compare the whole first word so that 2.1.3320 does not pass for 2.1.332.
    words = version.split()
    if not words or words[0] != PINNED_CLI_VERSION:
        return "%s reports version %r, expected %s" % (path, version, PINNED_CLI_VERSION)
    return None


def cli_version(path):
    """Return the first line `path --version` prints; raise RealCliUnavailable if it fails."""
    env = dict(os.environ)
    env.update(QUIET_SETTINGS)
    try:
        proc = subprocess.run(
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=VERSION_TIMEOUT,
        )
    except OSError as exc:
        hint = ""
        if exc.errno == errno.ENOEXEC:
            # npm ships a non-executable placeholder that the postinstall script replaces.
            hint = (" (likely the npm placeholder: the package's postinstall script did not run,"
                    " e.g. because of ignore-scripts or --omit=optional)")
        raise RealCliUnavailable("cannot run %s --version: %s%s" % (path, exc, hint))
    except subprocess.TimeoutExpired:
        raise RealCliUnavailable(
            "%s --version did not finish within %d s" % (path, VERSION_TIMEOUT)
        )
    output = proc.stdout.decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        raise RealCliUnavailable(
            "%s --version exited with status %d:\n%s" % (path, proc.returncode, tail(output))
        )
    return output.splitlines()[0] if output else ""


def npm_install(package=CLI_PACKAGE, version=PINNED_CLI_VERSION, cache_dir=CACHE_DIR):
    """Install the pinned package into cache_dir; raise RealCliUnavailable on any failure."""
    npm = shutil.which("npm")
    if npm is None:
        raise RealCliUnavailable(
            "npm is not on PATH, so %s@%s cannot be installed (install Node.js and npm, or set %s)"
            % (package, version, CLI_OVERRIDE_ENV)
        )
    os.makedirs(cache_dir, exist_ok=True)
    # The package's postinstall script puts the native binary in place. npm 11 warns about
    # unapproved install scripts and may block them; approving it here keeps the install
    # working (older npm ignores the field).
    manifest = {"private": True, "allowScripts": {package: True}}
    with open(os.path.join(cache_dir, "package.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    argv = [
        npm, "install", "--no-audit", "--no-fund", "--save-exact", "--prefix", cache_dir,
        "%s@%s" % (package, version),
    ]
    command = "npm " + " ".join(argv[1:])
    env = dict(os.environ, npm_config_update_notifier="false")
    # Own session so that a timeout also ends the install scripts npm started.
    proc = subprocess.Popen(
        argv,
        cwd=cache_dir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise RealCliUnavailable(
            "`%s` did not finish within %d s; last output:\n%s"
            % (command, INSTALL_TIMEOUT, tail(output.decode("utf-8", "replace")))
        )
    if proc.returncode != 0:
        raise RealCliUnavailable(
            "`%s` failed with status %d; last output:\n%s"
            % (command, proc.returncode, tail(output.decode("utf-8", "replace")))
        )


@contextlib.contextmanager
def install_lock(cache_dir=CACHE_DIR):
    """Serialise installs between concurrent test processes (POSIX only)."""
    if fcntl is None:
        yield
        return
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, ".install.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def tail(text, lines=OUTPUT_TAIL_LINES):
    return "\n".join(text.strip().splitlines()[-lines:])


def cli_env(home, upstream_url, base_env=None):
    """Environment that runs the real CLI against a fake Anthropic API with a private HOME."""
    env = dict(os.environ if base_env is None else base_env)
    for name in FOREIGN_SETTINGS:
        env.pop(name, None)
    env.update(QUIET_SETTINGS)
    env.update({
        "HOME": home,
        "XDG_CONFIG_HOME": os.path.join(home, ".config"),
        "ANTHROPIC_BASE_URL": upstream_url,
        "CLAUDE_CODE_OAUTH_TOKEN": FAKE_OAUTH_TOKEN,
        "CLAUDE_CODE_MAX_RETRIES": "0",
    })
    return env


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python tests/real_cli.py",
        description="Install the pinned Claude Code CLI for the e2e tests if needed "
        "and print its path.",
    )
    parser.add_argument(
        "--no-install", action="store_true",
        help="only check the existing install; fail instead of running npm",
    )
    args = parser.parse_args(argv)
    try:
        path = ensure_real_cli(install=not args.no_install)
    except RealCliUnavailable as exc:
        print("real CLI unavailable: %s" % exc, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
