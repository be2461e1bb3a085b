"""install-service, uninstall-service, doctor and the zipapp build.

The service commands run as real processes with a throwaway HOME and fake `launchctl` and
`systemctl` first on PATH: the fakes record their argv (one JSON line each) and can be told to
fail, so the files written and the commands run are both checked without touching the machine.
`--platform macos` makes the launchd side testable on Linux. The doctor runs against the pinned
real CLI (not logged in, then pointed at tests/fake_upstream.py) and against real proxies.
"""

import http.server
import importlib.util
import json
import os
import plistlib
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import zipfile

import pytest

from conftest import FAKE_CLAUDE, MODULE, ROOT, http_request, wait_until
import claude_max_proxy as cmp
import real_cli

BUILD_PYZ = os.path.join(ROOT, "packaging", "build_pyz.py")
RUN_TIMEOUT = 120  # the doctor starts the real CLI twice; a cold start can take a while

FAKE_SERVICE_TOOL = """\
#!{python}
# Records its argv as one JSON line in $FAKE_SERVICE_LOG. FAKE_SERVICE_FAIL="verb:N" makes
# the first N calls whose first argument (after --user) is `verb` fail as launchd/systemd do.
import json, os, sys
name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
log = os.environ["FAKE_SERVICE_LOG"]
with open(log, "a") as handle:
    handle.write(json.dumps([name] + args) + "\\n")
verb = [a for a in args if a != "--user"][:1]
rule = os.environ.get("FAKE_SERVICE_FAIL", "")
if rule and verb and rule.split(":")[0] == verb[0]:
    with open(log) as handle:
        calls = [json.loads(l) for l in handle if l.strip()]
    seen = sum(1 for c in calls if c[0] == name and [a for a in c[1:] if a != "--user"][:1] == verb)
    if seen <= int(rule.split(":")[1]):
        sys.stderr.write("Bootstrap failed: 5: Input/output error\\n" if name == "launchctl"
                         else "Failed to connect to bus: No medium found\\n")
        sys.exit(5 if name == "launchctl" else 1)
if name == "systemctl" and verb == ["is-active"]:
    print("active")
if name == "launchctl" and verb == ["print"]:
    print("gui/501/local.claude-max-proxy = {{\\n\\tstate = running\\n}}")
"""


# ---- helpers -----------------------------------------------------------------------------------

def clean_env(home, path):
    """No real account, no proxy settings from the developer's shell, the given HOME and PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(cmp.ENV_PREFIX) and k not in real_cli.FOREIGN_SETTINGS
           and k not in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "FAKE_SERVICE_FAIL")}
    env.update(real_cli.QUIET_SETTINGS)
    env.update({"HOME": str(home), "PATH": path, "XDG_CONFIG_HOME": os.path.join(str(home), ".config")})
    return env


def run(args, env, program=None, timeout=RUN_TIMEOUT):
    command = [sys.executable, program or MODULE] + list(args)
    return subprocess.run(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout,
                          cwd=ROOT)


class Machine:
    """A throwaway HOME, a `claude` on PATH and fake service managers that log their argv."""

    def __init__(self, tmp_path):
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.fake_bin = tmp_path / "fake-bin"
        self.fake_bin.mkdir()
        self.cli_bin = tmp_path / "cli bin"  # a space, as in "Application Support"
        self.cli_bin.mkdir()
        self.claude = str(self.cli_bin / "claude")
        os.symlink(FAKE_CLAUDE, self.claude)
        for tool in ("launchctl", "systemctl"):
            path = self.fake_bin / tool
            path.write_text(FAKE_SERVICE_TOOL.format(python=sys.executable))
            path.chmod(0o755)
        self.log = tmp_path / "service-tools.log"
        self.env = clean_env(self.home, os.pathsep.join(
            [str(self.fake_bin), str(self.cli_bin), "/usr/local/bin", "/usr/bin", "/bin"]))
        self.env["FAKE_SERVICE_LOG"] = str(self.log)

    def run(self, *args, **env):
        full = dict(self.env)
        full.update(env)
        return run(args, full)

    def commands(self):
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def forget_commands(self):
        if self.log.exists():
            self.log.unlink()

    def files(self):
        return sorted(str(p.relative_to(self.home)) for p in self.home.rglob("*") if p.is_file())

    @property
    def plist_path(self):
        return str(self.home / "Library" / "LaunchAgents" / "local.claude-max-proxy.plist")

    @property
    def unit_path(self):
        return str(self.home / ".config" / "systemd" / "user" / "claude-max-proxy.service")


@pytest.fixture
def machine(tmp_path):
    return Machine(tmp_path)


def dry_run_files(stdout):
    """{path: text} of the files a --dry-run prints between its begin/end markers."""
    found = {}
    for match in re.finditer(r"^----- begin (.+) -----\n(.*?)\n----- end \1 -----$", stdout, re.M | re.S):
        found[match.group(1)] = match.group(2) + "\n"
    return found


def dry_run_commands(stdout):
    return [line[len("would run: "):].split("   (")[0] for line in stdout.splitlines()
            if line.startswith("would run: ")]


def unit_entries(text):
    """[(section, key, value)] of a systemd unit, comments and blank lines dropped."""
    section, entries = None, []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key, value))
    return entries


def unit_value(text, section, key):
    values = [v for s, k, v in unit_entries(text) if (s, k) == (section, key)]
    assert len(values) == 1, "%s.%s appears %d times" % (section, key, len(values))
    return values[0]


def assert_runs_this_program(argv, program=MODULE):
    assert argv[0] == sys.executable and os.path.isabs(argv[0]) and os.path.exists(argv[0])
    assert argv[1] == program and os.path.isfile(argv[1])


def flag(argv, name):
    assert name in argv, "%s missing from %s" % (name, argv)
    return argv[argv.index(name) + 1]


def report_lines(stdout):
    """{check: (status, summary, fix)} from the doctor's report."""
    lines, found = stdout.splitlines(), {}
    for i, line in enumerate(lines):
        match = re.match(r"^(OK|WARN|FAIL)\s+(\S+)\s+(.*)$", line)
        if match:
            following = lines[i + 1].strip() if i + 1 < len(lines) else ""
            fix = following[len("fix: "):] if following.startswith("fix: ") else ""
            found[match.group(2)] = (match.group(1), match.group(3), fix)
    return found


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the templates -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, constant", [("launchd.plist.template", "LAUNCHD_TEMPLATE"),
                                            ("systemd.service.template", "SYSTEMD_TEMPLATE")])
def test_packaging_templates_are_the_ones_the_module_fills(name, constant):
    with open(os.path.join(ROOT, "packaging", name), encoding="utf-8") as handle:
        assert handle.read() == getattr(cmp, constant), (
            "packaging/%s and claude_max_proxy.%s differ: edit both" % (name, constant))


# ---- install-service --dry-run -------------------------------------------------------------------

def test_linux_dry_run_prints_a_unit_running_this_program_with_the_flags_and_changes_nothing(machine, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("sk-local\n")
    out = machine.run("install-service", "--dry-run", "--platform", "linux", "--port", "4123",
                      "--api-key-file", str(key_file), "--max-concurrency", "2", "--log-prompts")
    assert out.returncode == 0, out.stderr
    assert machine.files() == [] and machine.commands() == []
    files = dry_run_files(out.stdout)
    assert list(files) == [machine.unit_path]
    unit = files[machine.unit_path]
    argv = cmp.argv_from_systemd_unit(unit)
    assert_runs_this_program(argv)
    assert flag(argv, "--claude") == machine.claude and os.path.exists(machine.claude)
    assert flag(argv, "--port") == "4123" and flag(argv, "--host") == "127.0.0.1"
    assert flag(argv, "--api-key-file") == str(key_file)
    assert flag(argv, "--max-concurrency") == "2" and "--log-prompts" in argv
    (environment,) = shlex.split(unit_value(unit, "Service", "Environment"))
    assert environment.startswith("PATH=")
    path_dirs = environment[len("PATH="):].split(":")
    assert path_dirs[0] == str(machine.cli_bin)
    assert all(os.path.isabs(d) for d in path_dirs)
    assert unit_value(unit, "Service", "Restart") == "always"
    assert unit_value(unit, "Install", "WantedBy") == "default.target"
    assert dry_run_commands(out.stdout) == ["systemctl --user daemon-reload",
                                            "systemctl --user enable --now claude-max-proxy.service"]


def test_macos_dry_run_prints_a_plist_that_plistlib_loads(machine):
    workdir = str(machine.home / "odd & <dir>")
    out = machine.run("install-service", "--dry-run", "--platform", "macos", "--port", "4124",
                      "--workdir", workdir, "--request-timeout", "90")
    assert out.returncode == 0, out.stderr
    assert machine.files() == [] and machine.commands() == []
    files = dry_run_files(out.stdout)
    assert list(files) == [machine.plist_path]
    plist = plistlib.loads(files[machine.plist_path].encode("utf-8"))
    assert plist["Label"] == "local.claude-max-proxy"
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] is True
    argv = plist["ProgramArguments"]
    assert_runs_this_program(argv)
    assert flag(argv, "--claude") == machine.claude and os.path.exists(machine.claude)
    assert flag(argv, "--port") == "4124" and flag(argv, "--request-timeout") == "90.0"
    assert flag(argv, "--workdir") == workdir  # XML escaping round-trips
    path_dirs = plist["EnvironmentVariables"]["PATH"].split(":")
    assert path_dirs[0] == str(machine.cli_bin) and "/usr/bin" in path_dirs
    logs = str(machine.home / "Library" / "Logs" / "claude-max-proxy.log")
    assert plist["StandardOutPath"] == logs and plist["StandardErrorPath"] == logs
    assert plist["ExitTimeOut"] == 40  # the proxy's 30 s shutdown grace, and some
    uid = os.getuid()
    assert dry_run_commands(out.stdout) == [
        "launchctl enable gui/%d/local.claude-max-proxy" % uid,
        "launchctl bootout gui/%d/local.claude-max-proxy" % uid,
        "launchctl bootstrap gui/%d %s" % (uid, machine.plist_path)]


def test_systemd_analyze_verify_accepts_the_unit_even_with_awkward_characters(machine, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        message = "SYSTEMD-ANALYZE NOT INSTALLED: the unit is not verified by systemd itself"
        sys.stderr.write("\n\n*** %s ***\n\n" % message)
        pytest.skip(message)
    workdir = str(tmp_path / "work dir %h $HOME \"quoted\" back\\slash")
    out = machine.run("install-service", "--dry-run", "--platform", "linux", "--workdir", workdir,
                      "--allowed-origins", "http://a.example,http://b.example")
    assert out.returncode == 0, out.stderr
    unit = dry_run_files(out.stdout)[machine.unit_path]
    argv = cmp.argv_from_systemd_unit(unit)
    assert flag(argv, "--workdir") == workdir

    def verify(text):
        path = tmp_path / "claude-max-proxy.service"
        path.write_text(text)
        return subprocess.run([analyze, "verify", str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)

    result = verify(unit)
    assert result.returncode == 0 and "claude-max-proxy.service" not in result.stdout, result.stdout
    # The check can fail: a unit whose interpreter does not exist is refused.
    broken = verify(unit.replace("ExecStart=" + sys.executable, "ExecStart=/nonexistent/python3"))
    assert broken.returncode != 0 and "nonexistent" in broken.stdout


@pytest.mark.parametrize("word", ["plain", "with space", "100%", "$HOME", "${HOME}", 'say "hi"',
                                  "back\\slash", "it's", "", "%%$$", "a=b,c:d/e"])
def test_systemd_words_read_back_as_written(word):
    unit = cmp.systemd_unit_for(["/usr/bin/python3", word, "--x"], {"PATH": "/bin"}, 40)
    assert cmp.argv_from_systemd_unit(unit) == ["/usr/bin/python3", word, "--x"]


@pytest.mark.parametrize("word, written", [
    ("plain/path-1.2", "plain/path-1.2"),
    ("100%", "100%%"),            # % starts a specifier (%h is the home directory)
    ("$HOME", '"$$HOME"'),        # $ starts a variable in ExecStart
    ("with space", '"with space"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("", '""'),
])
def test_systemd_words_are_escaped_as_systemd_reads_them(word, written):
    assert cmp.systemd_word(word) == written


def test_environment_values_keep_dollars_as_systemd_does_not_expand_them_there():
    unit = cmp.systemd_unit_for(["/bin/true"], {"PATH": "/a b:/c", "TOKEN": "x$y%z"}, 40)
    assert 'Environment="PATH=/a b:/c"' in unit.splitlines()
    assert 'Environment="TOKEN=x$y%%z"' in unit.splitlines()


def test_a_value_with_a_line_break_is_refused_not_written(machine):
    out = machine.run("install-service", "--dry-run", "--platform", "linux", "--workdir", "/tmp/a\nb")
    assert out.returncode == 2 and "line break" in out.stderr
    assert machine.files() == []


def test_install_refuses_when_claude_cannot_be_found(machine):
    out = machine.run("install-service", "--platform", "linux", PATH=str(machine.fake_bin))
    assert out.returncode == 2
    assert "--claude" in out.stderr and "not on PATH" in out.stderr
    assert machine.files() == [] and machine.commands() == []


def test_install_applies_the_servers_own_config_checks(machine):
    out = machine.run("install-service", "--platform", "linux", "--host", "0.0.0.0")
    assert out.returncode == 2 and "without an API key" in out.stderr
    out = machine.run("install-service", "--platform", "linux", "--port", "0")
    assert out.returncode == 2 and "fixed --port" in out.stderr
    assert machine.files() == [] and machine.commands() == []


def test_pass_env_puts_the_value_in_the_file_but_a_dry_run_does_not_print_it(machine):
    token = "sk-ant-oat01-not-a-real-token"
    dry = machine.run("install-service", "--dry-run", "--platform", "macos",
                      "--pass-env", "CLAUDE_CODE_OAUTH_TOKEN", CLAUDE_CODE_OAUTH_TOKEN=token)
    assert dry.returncode == 0, dry.stderr
    assert token not in dry.stdout
    plist = plistlib.loads(dry_run_files(dry.stdout)[machine.plist_path].encode())
    assert plist["EnvironmentVariables"]["CLAUDE_CODE_OAUTH_TOKEN"] == "<value of CLAUDE_CODE_OAUTH_TOKEN>"

    out = machine.run("install-service", "--platform", "macos",
                      "--pass-env", "CLAUDE_CODE_OAUTH_TOKEN", CLAUDE_CODE_OAUTH_TOKEN=token)
    assert out.returncode == 0, out.stderr
    with open(machine.plist_path, "rb") as handle:
        assert plistlib.load(handle)["EnvironmentVariables"]["CLAUDE_CODE_OAUTH_TOKEN"] == token
    assert stat.S_IMODE(os.stat(machine.plist_path).st_mode) == 0o600

    missing = machine.run("install-service", "--platform", "macos", "--pass-env", "NOT_SET_ANYWHERE")
    assert missing.returncode == 2 and "NOT_SET_ANYWHERE is not set" in missing.stderr


def test_an_oauth_token_that_the_service_would_not_see_is_pointed_out(machine):
    out = machine.run("install-service", "--dry-run", "--platform", "linux",
                      CLAUDE_CODE_OAUTH_TOKEN="sk-ant-oat01-x")
    assert out.returncode == 0
    assert "--pass-env CLAUDE_CODE_OAUTH_TOKEN" in out.stdout


# ---- install-service and uninstall-service for real (fake service managers) ----------------------

def test_macos_install_is_idempotent_and_uninstall_reverses_it(machine):
    uid = os.getuid()
    target = "gui/%d/local.claude-max-proxy" % uid
    expected = [["launchctl", "enable", target], ["launchctl", "bootout", target],
                ["launchctl", "bootstrap", "gui/%d" % uid, machine.plist_path]]

    first = machine.run("install-service", "--platform", "macos", "--port", "4125")
    assert first.returncode == 0, first.stderr
    assert machine.commands() == expected
    assert os.path.isdir(machine.home / "Library" / "Logs")
    with open(machine.plist_path, "rb") as handle:
        written = handle.read()
    assert flag(plistlib.loads(written)["ProgramArguments"], "--port") == "4125"
    assert stat.S_IMODE(os.stat(machine.plist_path).st_mode) == 0o600
    assert "tail -f" in first.stdout and "doctor" in first.stdout

    machine.forget_commands()
    again = machine.run("install-service", "--platform", "macos", "--port", "4125")
    assert again.returncode == 0, again.stderr
    assert machine.commands() == expected
    with open(machine.plist_path, "rb") as handle:
        assert handle.read() == written
    assert machine.files() == ["Library/LaunchAgents/local.claude-max-proxy.plist"]

    machine.forget_commands()
    gone = machine.run("uninstall-service", "--platform", "macos")
    assert gone.returncode == 0, gone.stderr
    assert machine.commands() == [["launchctl", "bootout", target]]
    assert not os.path.exists(machine.plist_path)

    machine.forget_commands()
    twice = machine.run("uninstall-service", "--platform", "macos")
    assert twice.returncode == 0 and "no service file" in twice.stdout
    assert machine.commands() == [["launchctl", "bootout", target]]


def test_bootstrap_is_retried_while_launchd_finishes_the_bootout(machine):
    out = machine.run("install-service", "--platform", "macos", FAKE_SERVICE_FAIL="bootstrap:2")
    assert out.returncode == 0, out.stderr
    assert [c[1] for c in machine.commands()] == ["enable", "bootout", "bootstrap", "bootstrap", "bootstrap"]


def test_linux_install_restarts_only_when_the_unit_changed_and_uninstall_reverses_it(machine):
    unit = "claude-max-proxy.service"
    reload_ = ["systemctl", "--user", "daemon-reload"]
    enable = ["systemctl", "--user", "enable", "--now", unit]

    first = machine.run("install-service", "--platform", "linux")
    assert first.returncode == 0, first.stderr
    assert machine.commands() == [reload_, enable]
    assert "journalctl --user -u claude-max-proxy" in first.stdout and "enable-linger" in first.stdout
    with open(machine.unit_path) as handle:
        written = handle.read()
    assert stat.S_IMODE(os.stat(machine.unit_path).st_mode) == 0o600

    machine.forget_commands()
    assert machine.run("install-service", "--platform", "linux").returncode == 0
    assert machine.commands() == [reload_, enable]
    with open(machine.unit_path) as handle:
        assert handle.read() == written

    machine.forget_commands()
    assert machine.run("install-service", "--platform", "linux", "--port", "4126").returncode == 0
    assert machine.commands() == [reload_, enable, ["systemctl", "--user", "restart", unit]]
    with open(machine.unit_path) as handle:
        assert flag(cmp.argv_from_systemd_unit(handle.read()), "--port") == "4126"

    machine.forget_commands()
    gone = machine.run("uninstall-service", "--platform", "linux")
    assert gone.returncode == 0, gone.stderr
    assert machine.commands() == [["systemctl", "--user", "disable", "--now", unit], reload_,
                                  ["systemctl", "--user", "reset-failed", unit]]
    assert machine.files() == []


def test_a_failing_service_manager_is_reported_with_its_output(machine):
    out = machine.run("install-service", "--platform", "linux", FAKE_SERVICE_FAIL="daemon-reload:99")
    assert out.returncode == 1
    assert "daemon-reload" in out.stderr and "Failed to connect to bus" in out.stderr
    assert "no systemd user session" in out.stderr


def test_uninstall_dry_run_changes_nothing(machine):
    assert machine.run("install-service", "--platform", "linux").returncode == 0
    machine.forget_commands()
    out = machine.run("uninstall-service", "--dry-run", "--platform", "linux")
    assert out.returncode == 0
    assert "would remove %s" % machine.unit_path in out.stdout
    assert machine.commands() == [] and os.path.exists(machine.unit_path)


# ---- which program the service runs ----------------------------------------------------------------

def test_program_argv_is_the_archive_inside_a_zipapp_else_the_module_file(tmp_path):
    archive = tmp_path / "claude_max_proxy.pyz"
    with zipfile.ZipFile(str(archive), "w") as handle:
        handle.writestr("claude_max_proxy.py", "")
    assert cmp.program_argv_for("/venv/bin/python", str(archive / "claude_max_proxy.py")) == [
        "/venv/bin/python", str(archive)]
    assert cmp.program_argv_for("/venv/bin/python", MODULE) == ["/venv/bin/python", MODULE]


def test_an_installed_module_run_by_its_console_script_installs_itself(machine, tmp_path):
    """What pip/pipx set up: the module in site-packages and a script that imports main()."""
    site = tmp_path / "site-packages"
    site.mkdir()
    shutil.copy(MODULE, str(site / "claude_max_proxy.py"))
    script = tmp_path / "claude-max-proxy"
    # The console script pip generates for `claude-max-proxy = "claude_max_proxy:main"`.
    script.write_text("import re\nimport sys\nfrom claude_max_proxy import main\n"
                      "if __name__ == '__main__':\n"
                      "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                      "    sys.exit(main())\n")
    env = dict(machine.env, PYTHONPATH=str(site))
    out = run(["install-service", "--dry-run", "--platform", "linux"], env, program=str(script))
    assert out.returncode == 0, out.stderr
    argv = cmp.argv_from_systemd_unit(dry_run_files(out.stdout)[machine.unit_path])
    assert_runs_this_program(argv, program=str(site / "claude_max_proxy.py"))
    # The service's command works without the console script or PYTHONPATH.
    version = subprocess.run(argv[:2] + ["--version"], env=machine.env, stdout=subprocess.PIPE,
                             universal_newlines=True, timeout=30)
    assert version.stdout.strip() == "claude-max-proxy " + cmp.__version__


def test_pyproject_console_script_is_main():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as handle:
        text = handle.read()
    scripts = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^claude-max-proxy\s*=\s*"claude_max_proxy:main"\s*$', scripts, re.M)


# ---- the zipapp ------------------------------------------------------------------------------------

def oldest_python():
    """A Python 3.9 to run the built archive with, if this machine has one."""
    for candidate in ("python3.9", os.path.expanduser("~/.pyenv/versions/3.9.18/bin/python3")):
        found = shutil.which(candidate)
        if found:
            probe = subprocess.run([found, "-c", "import sys; print(sys.version_info[:2])"],
                                   stdout=subprocess.PIPE, universal_newlines=True, timeout=30)
            if probe.returncode == 0 and probe.stdout.strip() == "(3, 9)":
                return found
    return None


def test_the_pyz_build_is_reproducible_and_the_archive_runs(machine, tmp_path):
    outputs = []
    for name in ("a", "b"):
        output = str(tmp_path / name / "claude_max_proxy.pyz")
        build = subprocess.run([sys.executable, BUILD_PYZ, "--output", output], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        assert build.returncode == 0, build.stderr
        with open(output, "rb") as handle:
            outputs.append(handle.read())
    assert outputs[0] == outputs[1]
    assert outputs[0].startswith(b"#!/usr/bin/env python3\n")
    pyz = str(tmp_path / "a" / "claude_max_proxy.pyz")
    assert os.access(pyz, os.X_OK)

    pythons = [sys.executable]
    old = oldest_python()
    if old is None:
        sys.stderr.write("\n*** no Python 3.9 here: the archive runs on %s only (vermin checks 3.9 "
                         "syntax) ***\n" % sys.version.split()[0])
    else:
        pythons.append(old)
    for python in pythons:
        for args, expected in ((["--version"], "claude-max-proxy " + cmp.__version__),
                               (["--help"], "install-service")):
            result = subprocess.run([python, pyz] + args, env=machine.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
            assert result.returncode == 0 and expected in result.stdout, (python, result.stderr)

    out = run(["install-service", "--dry-run", "--platform", "macos"], machine.env, program=pyz)
    assert out.returncode == 0, out.stderr
    argv = plistlib.loads(dry_run_files(out.stdout)[machine.plist_path].encode())["ProgramArguments"]
    assert_runs_this_program(argv, program=pyz)


def build_archive(tmp_path, name="claude_max_proxy.pyz"):
    output = str(tmp_path / name)
    build = subprocess.run([sys.executable, BUILD_PYZ, "--output", output], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert build.returncode == 0, build.stderr
    return output


def loaded_from(archive, python=sys.executable):
    """Where the archive's module code came from: the name compiled into it ("claude_max_proxy.py"
    for the shipped bytecode, the path inside the archive when zipimport compiled the source)."""
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import claude_max_proxy as m; "
             "print(m.main.__code__.co_filename); print(m.__file__)")
    out = subprocess.run([python, "-c", probe, archive], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")[:2]


def rewritten_archive(archive, output, change):
    """A copy of the archive with `change(name, data) -> data` applied to every member."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(output, "w") as target:
        for info in source.infolist():
            target.writestr(info, change(info.filename, source.read(info.filename)))
    return output


def test_the_pyz_ships_bytecode_that_this_python_runs_without_compiling(tmp_path):
    archive = build_archive(tmp_path)
    with zipfile.ZipFile(archive) as handle:
        names = handle.namelist()
        bytecode = handle.read("claude_max_proxy.pyc")
    assert names == ["__main__.py", "claude_max_proxy.py", "claude_max_proxy.pyc"]
    assert bytecode[:4] == importlib.util.MAGIC_NUMBER
    code_name, module_file = loaded_from(archive)
    assert code_name == "claude_max_proxy.py"  # the shipped bytecode, not a compile of the source
    # The module's file is claude_max_proxy.pyc in the archive: install-service still runs the archive.
    assert cmp.program_argv_for(sys.executable, module_file) == [sys.executable, archive]


@pytest.mark.parametrize("change", ["other_python", "edited_source"])
def test_the_pyz_falls_back_to_its_source_when_the_bytecode_does_not_fit(tmp_path, change):
    archive = build_archive(tmp_path)
    marker = "# edited after the build\n"

    def changed(name, data):
        if change == "other_python" and name.endswith(".pyc"):
            return b"\x00\x00" + data[2:]  # another bytecode version's magic number
        if change == "edited_source" and name == "claude_max_proxy.py":
            return data + marker.encode()  # the bytecode's source hash no longer matches
        return data

    copy = rewritten_archive(archive, str(tmp_path / "changed.pyz"), changed)
    code_name, _ = loaded_from(copy)
    assert code_name == os.path.join(copy, "claude_max_proxy.py")  # compiled from the source
    result = subprocess.run([sys.executable, copy, "--version"], stdout=subprocess.PIPE,
                            universal_newlines=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "claude-max-proxy " + cmp.__version__


def test_the_pyz_runs_from_source_on_an_older_python(tmp_path):
    old = oldest_python()
    if old is None:
        pytest.skip("no Python 3.9 on this machine")
    archive = build_archive(tmp_path)
    assert loaded_from(archive, old)[0] == os.path.join(archive, "claude_max_proxy.py")


def vermin_command():
    beside = os.path.join(os.path.dirname(sys.executable), "vermin")
    return beside if os.path.exists(beside) else shutil.which("vermin")


def test_the_module_is_python_3_9_compatible_by_vermin(tmp_path):
    vermin = vermin_command()
    if vermin is None:
        message = "VERMIN NOT INSTALLED (tests/run.sh installs it): Python 3.9 compatibility unchecked"
        sys.stderr.write("\n\n*** %s ***\n\n" % message)
        pytest.skip(message)
    checked = subprocess.run([vermin, "-t=3.9-", "--no-tips", "--violations", MODULE],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                             timeout=120)
    assert checked.returncode == 0, checked.stdout
    # The check can fail: pattern matching needs 3.10.
    newer = tmp_path / "newer.py"
    newer.write_text("match 1:\n    case 1:\n        pass\n")
    assert subprocess.run([vermin, "-t=3.9-", "--no-tips", "--violations", str(newer)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120).returncode != 0


# ---- doctor: pure findings -----------------------------------------------------------------------

@pytest.mark.parametrize("text, status", [
    ("2.1.332 (Claude Code)", "OK"),
    ("2.1.0 (Claude Code)", "OK"),
    ("2.0.99 (Claude Code)", "FAIL"),
    ("1.0.128 (Claude Code)", "FAIL"),
    ("3.0.0 (Claude Code)", "WARN"),
    ("who knows", "WARN"),
])
def test_cli_version_against_the_supported_range(text, status):
    assert cmp.cli_version_finding("/bin/claude", "claude", text, None).status == status


def test_the_pinned_test_cli_is_in_the_supported_range():
    finding = cmp.cli_version_finding("/bin/claude", "claude", real_cli.PINNED_CLI_VERSION, None)
    assert finding.status == "OK"


def test_a_missing_or_broken_cli_fails_with_the_fix():
    missing = cmp.cli_version_finding(None, "claude", None, None)
    assert missing.status == "FAIL" and "--claude" in missing.fix
    broken = cmp.cli_version_finding("/bin/claude", "claude", None, "exit 1")
    assert broken.status == "FAIL"


@pytest.mark.parametrize("code, status, expected, words", [
    (1, {"loggedIn": False, "authMethod": "none"}, "FAIL", "claude auth login"),
    (0, {"loggedIn": True, "authMethod": "claude.ai", "subscriptionType": "max",
         "email": "a@b.example"}, "OK", "max"),
    (0, {"loggedIn": True, "authMethod": "oauth_token"}, "OK", "CLAUDE_CODE_OAUTH_TOKEN"),
    (0, {"loggedIn": True, "authMethod": "api_key", "apiKeySource": "ANTHROPIC_API_KEY"}, "OK",
     "ANTHROPIC_API_KEY"),
    (0, {"loggedIn": True, "authMethod": "api_key", "apiKeySource": "/login managed key"}, "WARN",
     "billed to the API"),
    (0, {"loggedIn": True, "authMethod": "third_party", "apiProvider": "bedrock"}, "OK", "bedrock"),
])
def test_login_finding_from_auth_status(code, status, expected, words):
    finding = cmp.login_finding(code, json.dumps(status, indent=2))
    assert finding.status == expected
    assert words in finding.summary + finding.fix


def test_login_finding_when_auth_status_says_nothing_useful():
    finding = cmp.login_finding(1, "error: unknown command 'auth'")
    assert finding.status == "WARN" and "--live" in finding.fix


@pytest.mark.parametrize("state, words", [
    (None, "no plan limit reported yet"),
    ({"status": "allowed_warning", "window": "five_hour", "utilization": 0.92, "resets_at": 1795951600,
      "overage_in_use": False}, "plan limit five_hour: allowed_warning at 92%, resets 2026-11-29T11:26:40Z"),
    ({"status": "rejected", "window": "five_hour", "utilization": None, "resets_at": 1795951600,
      "overage_in_use": True}, "rejected, resets 2026-11-29T11:26:40Z, extra usage in use"),
])
def test_doctor_port_line_shows_the_running_proxys_limit_state(state, words):
    health = {"version": "1", "claude": {"version": "2.1.332"}, "limits": state}
    finding = cmp.port_finding("127.0.0.1", 3456, health, None)
    assert finding.status == "OK" and words in finding.summary


def test_doctor_processes_line_says_the_caps_and_where_the_kept_one_comes_from():
    total, available = 24683656 * 1024, 24137428 * 1024
    config = cmp.Config(max_parked=cmp.default_max_parked(total, available))
    finding = cmp.processes_finding(config, total, available)
    assert finding.status == "OK"
    assert "up to 4 CLI processes answering" in finding.summary
    assert "19 kept between turns (--max-parked; default from 25.3 GB RAM, 24.7 GB available)" in finding.summary
    assert "as set" in cmp.processes_finding(cmp.Config(max_parked=7), total, available).summary
    assert "memory is unknown" in cmp.processes_finding(cmp.Config(max_parked=4), None, None).summary
    tight = cmp.processes_finding(cmp.Config(max_parked=40), total, 4 * 10 ** 9)
    assert tight.status == "WARN" and "--max-parked" in tight.fix


def test_doctor_exit_code_is_one_only_when_something_fails():
    ok, warn, fail = (cmp.Finding(s, "x", "y", "z") for s in ("OK", "WARN", "FAIL"))
    assert cmp.doctor_report([ok, warn])[1] == 0
    text, code = cmp.doctor_report([ok, warn, fail])
    assert code == 1 and "1 problem(s), 1 warning(s)" in text and "fix: z" in text


# ---- doctor: the real CLI, real proxies ------------------------------------------------------------

def doctor(env, *args):
    out = run(["doctor"] + list(args), env)
    return out, report_lines(out.stdout)


def test_doctor_with_the_real_cli_and_no_login_fails_on_login(real_claude, tmp_path):
    env = clean_env(tmp_path, os.environ.get("PATH", ""))
    out, lines = doctor(env, "--claude", real_claude, "--port", str(free_port()))
    assert out.returncode == 1, out.stdout + out.stderr
    assert lines["python"][0] == "OK"
    assert lines["claude"][0] == "OK" and real_cli.PINNED_CLI_VERSION in lines["claude"][1]
    status, summary, fix = lines["login"]
    assert status == "FAIL" and "not logged in" in summary
    assert "claude auth login" in fix and "CLAUDE_CODE_OAUTH_TOKEN" in fix
    assert lines["billing"][0] == "OK"
    assert lines["port"][0] == "OK" and lines["service"][0] == "OK"


def test_doctor_with_the_fake_upstream_reports_login_ok_and_an_ignored_api_key(real_claude, e2e_env):
    env = dict(e2e_env, ANTHROPIC_API_KEY="sk-ant-api03-stray")
    out, lines = doctor(env, "--claude", real_claude, "--port", str(free_port()))
    assert out.returncode == 0, out.stdout + out.stderr
    # The login the proxy's CLIs would use: the OAuth token, not the stray key they never get.
    assert lines["login"][0] == "OK" and "OAuth token" in lines["login"][1]
    status, summary, _ = lines["billing"]
    assert status == "OK" and "ANTHROPIC_API_KEY is set but ignored" in summary
    assert "FAIL" not in out.stdout


def test_doctor_warns_when_use_api_key_bills_the_key(real_claude, e2e_env):
    env = dict(e2e_env, ANTHROPIC_API_KEY="sk-ant-api03-on-purpose")
    out, lines = doctor(env, "--claude", real_claude, "--port", str(free_port()), "--use-api-key")
    status, summary, fix = lines["billing"]
    assert status == "WARN" and "bills" in summary and "--use-api-key" in fix
    assert lines["login"][0] == "OK" and "ANTHROPIC_API_KEY" in lines["login"][1]


def test_doctor_live_round_trip_through_a_running_proxy(real_claude, e2e_env, start_proxy):
    proxy = start_proxy(["--claude", real_claude], e2e_env)
    out, lines = doctor(e2e_env, "--claude", real_claude, "--port", str(proxy.port), "--live")
    assert out.returncode == 0, out.stdout + out.stderr
    assert lines["port"][0] == "OK" and "claude-max-proxy" in lines["port"][1]
    assert lines["live"][0] == "OK" and "Hello from the fake upstream." in lines["live"][1]
    assert proxy.wait_for_line("POST /v1/chat/completions 200", timeout=10)


def test_doctor_live_fails_when_no_proxy_answers(machine):
    out, lines = doctor(machine.env, "--port", str(free_port()), "--live")
    assert out.returncode == 1
    assert lines["live"][0] == "FAIL" and "nothing answers" in lines["live"][1]
    assert lines["login"][0] == "OK"  # the fake CLI says it is logged in


def test_doctor_fails_when_the_running_proxy_cannot_find_claude(machine, start_proxy):
    """The launchd PATH problem: the proxy runs, but its environment has no `claude`."""
    proxy = start_proxy(["--claude", "claude-that-is-not-installed"], machine.env)
    wait_until(lambda: json.loads(http_request(proxy.port, "GET", "/health")[2])["claude"]["error"],
               10, "the proxy's CLI probe")
    out, lines = doctor(machine.env, "--port", str(proxy.port))
    assert out.returncode == 1
    status, summary, fix = lines["port"]
    assert status == "FAIL" and "cannot run the CLI" in summary and "install-service" in fix


def test_doctor_fails_when_another_program_holds_the_port(machine):
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        out, lines = doctor(machine.env, "--port", str(server.server_address[1]))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert out.returncode == 1
    assert lines["port"][0] == "FAIL" and "taken by another program" in lines["port"][1]


def test_doctor_checks_the_installed_service_and_the_paths_it_runs(machine):
    assert machine.run("install-service", "--platform", "linux", "--port", "4127").returncode == 0
    machine.forget_commands()
    out, lines = doctor(machine.env, "--platform", "linux", "--port", str(free_port()))
    assert out.returncode == 0, out.stdout
    assert lines["service"][0] == "OK" and "running on port 4127" in lines["service"][1]
    assert machine.commands() == [["systemctl", "--user", "is-active", "claude-max-proxy.service"]]

    # The CLI moved away after install: the service would fail to start requests.
    os.unlink(machine.claude)
    shutil.copy(FAKE_CLAUDE, str(machine.fake_bin / "claude"))  # doctor itself still finds one
    out, lines = doctor(machine.env, "--platform", "linux", "--port", str(free_port()))
    assert out.returncode == 1
    status, summary, fix = lines["service"]
    assert status == "FAIL" and machine.claude in summary and "install-service" in fix


def test_doctor_reads_a_launchd_service_too(machine):
    assert machine.run("install-service", "--platform", "macos").returncode == 0
    machine.forget_commands()
    out, lines = doctor(machine.env, "--platform", "macos", "--port", str(free_port()))
    assert out.returncode == 0, out.stdout
    assert lines["service"][0] == "OK" and machine.plist_path in lines["service"][1]
    assert machine.commands() == [["launchctl", "print",
                                   "gui/%d/local.claude-max-proxy" % os.getuid()]]
