"""Find or install the pinned OpenAI Codex CLI that the Codex end-to-end test runs.

Like tests/real_cli.py for `claude`: one npm version, installed into <repo>/.cache/codex-cli (the
npm package brings its native binary in a platform sub-package), never globally.

    ensure_codex()              path of the pinned executable, installing it with npm if needed
    codex_config(url, model)    the config.toml that points Codex at the proxy (Responses API)
    python tests/real_codex.py  install ahead of time and print the path (tests/run.sh)
"""

import os
import subprocess
import sys

import real_cli

PINNED_CODEX_VERSION = "0.169.0"
CODEX_PACKAGE = "@openai/codex"
CODEX_DIR = os.path.join(real_cli.REPO_DIR, ".cache", "codex-cli")


def pinned_codex_path():
    return os.path.join(CODEX_DIR, "node_modules", ".bin", "codex")


def codex_problem(path):
    """Why `path` is not the pinned Codex CLI, or None if it is."""
    if not os.path.exists(path):
        return "pinned %s@%s is not installed at %s" % (CODEX_PACKAGE, PINNED_CODEX_VERSION, path)
    try:
        proc = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=real_cli.VERSION_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "cannot run %s --version: %s" % (path, exc)
    words = proc.stdout.decode("utf-8", "replace").split()
    if proc.returncode != 0 or words[-1:] != [PINNED_CODEX_VERSION]:
        return "%s --version said %r, expected codex-cli %s" % (path, " ".join(words), PINNED_CODEX_VERSION)
    return None


def ensure_codex(install=True):
    """The pinned Codex executable; raises real_cli.RealCliUnavailable when it cannot be had."""
    path = pinned_codex_path()
    if codex_problem(path) is None:
        return path
    if not install:
        raise real_cli.RealCliUnavailable(codex_problem(path))
    with real_cli.install_lock(CODEX_DIR):
        if codex_problem(path) is not None:
            real_cli.npm_install(CODEX_PACKAGE, PINNED_CODEX_VERSION, CODEX_DIR)
    problem = codex_problem(path)
    if problem is not None:
        raise real_cli.RealCliUnavailable("after npm install, " + problem)
    return path


def codex_config(base_url, model):
    """A Codex config.toml with one model provider: the proxy, spoken to over the Responses API."""
    return ('model = "%s"\nmodel_provider = "claude-max"\n\n[model_providers.claude-max]\n'
            'name = "claude-max"\nbase_url = "%s"\nwire_api = "responses"\n' % (model, base_url))


if __name__ == "__main__":
    try:
        print(ensure_codex(install="--no-install" not in sys.argv[1:]))
    except real_cli.RealCliUnavailable as exc:
        print("Codex CLI unavailable: %s" % exc, file=sys.stderr)
        sys.exit(1)
