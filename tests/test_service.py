"""`nightingale service`: the rendered LaunchAgent and systemd unit, dry runs, and a real
install/uninstall into a temporary home.

launchctl and a user systemd manager cannot run in this container, so the one test that
executes an install puts a recording `systemctl` first on PATH; everything else runs the
real CLI as a subprocess.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from nightingale.client import service

from .helpers.cli import make_fake_systemctl, nightingale

REPO = Path(__file__).resolve().parents[1]


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd unit -> {section: {key: [values...]}} (keys may repeat, e.g. Environment=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"key outside a section: {line}"
        current.setdefault(key, []).append(value)
    return sections


def test_install_dry_run_macos_prints_a_valid_launch_agent(tmp_path):
    model = tmp_path / "my model"
    model.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    result = nightingale(
        "service", "install", "--dry-run", "--platform", "macos",
        "--model", str(model), "--quantize", "4", "--device", "MacBook Speakers & more",
        env=dict(os.environ, HOME=str(home)),
    )
    assert result.returncode == 0, result.stderr
    plist = plistlib.loads(result.stdout.encode())

    assert plist["Label"] == service.LABEL
    argv = plist["ProgramArguments"]
    assert os.path.isabs(argv[0]) and os.path.basename(argv[0]) in ("nightingale", "python", "python3")
    assert "serve" in argv
    serve = argv[argv.index("serve") + 1 :]
    assert serve[serve.index("--model") + 1] == str(model)  # absolute, spaces kept
    assert serve[serve.index("--quantize") + 1] == "4"
    assert serve[serve.index("--device") + 1] == "MacBook Speakers & more"  # XML-escaped on the way
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # restart on failure only
    assert plist["ProcessType"] == "Interactive"
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert os.path.isabs(plist[key])
        assert Path(plist[key]).parent == home / "Library" / "Logs" / "Nightingale"
    assert os.path.isabs(plist["WorkingDirectory"])
    env = plist["EnvironmentVariables"]
    assert env["PATH"].split(":")[0] == os.path.dirname(argv[0])
    assert env["PYTHONUNBUFFERED"] == "1"

    # The plan goes to stderr: where the file would go and the launchctl commands.
    agent = home / "Library" / "LaunchAgents" / f"{service.LABEL}.plist"
    assert f"would write {agent}" in result.stderr
    assert f"launchctl bootstrap gui/{os.getuid()} {agent}" in result.stderr
    assert list(home.iterdir()) == []  # a dry run writes nothing


def test_install_dry_run_linux_prints_a_systemd_unit(tmp_path):
    weird = tmp_path / "100% $HOME model"
    weird.mkdir()
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "cfg"), HF_HOME="/data/hf cache")
    result = nightingale("service", "install", "--dry-run", "--platform", "linux", "--model", str(weird), env=env)
    assert result.returncode == 0, result.stderr
    unit = parse_unit(result.stdout)

    exec_start = unit["Service"]["ExecStart"][0]
    # systemd unescapes %% and $$; after that the line splits like a shell command.
    argv = shlex.split(exec_start.replace("%%", "%").replace("$$", "$"))
    assert os.path.isabs(argv[0])
    assert argv[1] == "serve"
    assert argv[argv.index("--model") + 1] == str(weird)
    assert "%%" in exec_start and "$$" in exec_start  # escaped, not expanded by systemd
    assert unit["Service"]["Restart"] == ["on-failure"]
    assert unit["Service"]["Type"] == ["simple"]
    assert unit["Install"]["WantedBy"] == ["default.target"]
    environment = [shlex.split(v)[0] for v in unit["Service"]["Environment"]]
    assert "HF_HOME=/data/hf cache" in environment
    assert any(e.startswith(f"PATH={os.path.dirname(argv[0])}:") for e in environment)

    unit_path = tmp_path / "cfg" / "systemd" / "user" / "nightingale.service"
    assert f"would write {unit_path}" in result.stderr
    assert "systemctl --user enable nightingale.service" in result.stderr
    assert not unit_path.exists()

    analyze = shutil.which("systemd-analyze")
    if analyze:  # where systemd's own checker exists, it must accept the unit too
        (tmp_path / "nightingale.service").write_text(result.stdout)
        check = subprocess.run([analyze, "verify", str(tmp_path / "nightingale.service")], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


def test_uninstall_dry_run_lists_its_commands():
    result = nightingale("service", "uninstall", "--dry-run", "--platform", "macos")
    assert result.returncode == 0 and result.stdout == ""
    assert f"launchctl bootout gui/{os.getuid()}/{service.LABEL}" in result.stderr
    assert "would remove" in result.stderr

    # status writes and changes nothing: it has no --dry-run, and asks systemd with `show`
    assert nightingale("service", "status", "--dry-run").returncode == 2
    status_plan = service.plan("status", "linux", home=Path("/home/u"))
    assert [str(c) for c in status_plan.commands][0].startswith("systemctl --user show nightingale.service")


def test_other_platform_needs_dry_run():
    other = "linux" if service.current_platform() == "macos" else "macos"
    result = nightingale("service", "install", "--platform", other)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--dry-run" in result.stderr


def test_packaged_templates_are_the_launchd_files():
    # The installer reads the packaged copies (client/*.plist, *.service link to launchd/).
    for name in (service.PLIST_TEMPLATE, service.UNIT_NAME):
        assert service.read_template(name) == (REPO / "launchd" / name).read_text()


def test_render_is_pure_and_absolute():
    spec = service.ServeSpec(
        program=("/opt/ng/bin/nightingale",),
        serve_args=service.serve_arguments("ResembleAI/chatterbox", "8", "rel/sock", None),
        environment={"PATH": "/opt/ng/bin:/usr/bin", "PYTHONUNBUFFERED": "1"},
    )
    assert spec.serve_args[:2] == ("--model", "ResembleAI/chatterbox")  # a repo id stays as given
    assert os.path.isabs(spec.serve_args[spec.serve_args.index("--socket") + 1])
    plan = service.plan("install", "macos", spec, home=Path("/Users/ada"), uid=501)
    plist = plistlib.loads(plan.content.encode())
    assert plist["ProgramArguments"][:2] == ["/opt/ng/bin/nightingale", "serve"]
    assert plist["StandardErrorPath"] == "/Users/ada/Library/Logs/Nightingale/nightingale.err.log"
    assert plan.path == Path("/Users/ada/Library/LaunchAgents/org.nightingale.daemon.plist")
    assert [str(c) for c in plan.commands][-1] == "launchctl bootstrap gui/501 /Users/ada/Library/LaunchAgents/org.nightingale.daemon.plist"


def test_launchctl_print_parsing():
    text = (
        "gui/501/org.nightingale.daemon = {\n\tactive count = 1\n\tpath = /Users/a/Library/LaunchAgents/x.plist\n"
        "\tstate = running\n\tpid = 4242\n\tlast exit code = (never exited)\n\tenvironment = {\n\t\tstate = nested\n\t}\n}\n"
    )
    fields = service.parse_launchctl_print(text)
    assert fields["state"] == "running" and fields["pid"] == "4242"


@pytest.fixture
def fake_systemctl(tmp_path):
    return make_fake_systemctl(tmp_path)


@pytest.mark.skipif(service.current_platform() != "linux", reason="executes the Linux install path")
def test_install_without_a_user_bus_is_one_line_and_leaves_no_unit(tmp_path, fake_systemctl):
    env, log = fake_systemctl
    script = Path(env["PATH"].split(":")[0]) / "systemctl"  # answers as on a machine with no user session
    script.write_text('#!/bin/sh\necho "Failed to connect to bus: No medium found" >&2\nexit 1\n')
    unit_path = tmp_path / "home" / ".config" / "systemd" / "user" / "nightingale.service"

    result = nightingale("service", "install", env=env)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("nightingale: "), result.stderr
    assert "Failed to connect to bus" in result.stderr and "nightingale serve" in result.stderr
    assert not unit_path.exists() and not list(unit_path.parent.glob("*"))


@pytest.mark.skipif(service.current_platform() != "linux", reason="executes the Linux install path")
def test_install_status_uninstall_linux(tmp_path, fake_systemctl):
    env, log = fake_systemctl
    unit_path = tmp_path / "home" / ".config" / "systemd" / "user" / "nightingale.service"

    result = nightingale("service", "install", "--platform", "linux", env=env)
    assert result.returncode == 0, result.stderr
    assert unit_path.is_file()
    assert "ExecStart=" in unit_path.read_text()
    assert not list(unit_path.parent.glob(".*tmp"))  # written via a temporary file, renamed
    assert log.read_text().splitlines() == [
        "--user daemon-reload",
        "--user enable nightingale.service",
        "--user restart nightingale.service",
    ]

    result = nightingale("service", "status", env=dict(env, NIGHTINGALE_SOCKET=str(tmp_path / "none.sock")))
    # systemd says running, but nothing answers on the socket: status fails (1) and says so.
    assert result.returncode == 1, result.stdout + result.stderr
    assert "installed" in result.stdout and "active (running)" in result.stdout and "pid 99" in result.stdout
    assert "daemon: not answering" in result.stdout

    result = nightingale("service", "uninstall", env=env)
    assert result.returncode == 0, result.stderr
    assert not unit_path.exists()
    assert log.read_text().splitlines()[-2:] == ["--user disable --now nightingale.service", "--user daemon-reload"]


def test_install_can_enable_the_http_and_wyoming_front_ends(tmp_path):
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "cfg"), NIGHTINGALE_HTTP_TOKEN="tok en")
    result = nightingale(
        "service", "install", "--dry-run", "--platform", "linux", "--http", "0.0.0.0:8880", "--wyoming", "tcp://0.0.0.0:10200", env=env
    )
    assert result.returncode == 0, result.stderr
    unit = parse_unit(result.stdout)
    argv = shlex.split(unit["Service"]["ExecStart"][0].replace("%%", "%").replace("$$", "$"))
    assert argv[argv.index("--http") + 1] == "0.0.0.0:8880"
    assert argv[argv.index("--wyoming") + 1] == "tcp://0.0.0.0:10200"
    assert "tok en" not in unit["Service"]["ExecStart"][0]  # the token stays out of the command line
    assert "NIGHTINGALE_HTTP_TOKEN=tok en" in [shlex.split(v)[0] for v in unit["Service"]["Environment"]]
    result = nightingale("service", "install", "--dry-run", "--platform", "macos", "--wyoming", "tcp://0.0.0.0:10200", env=env)
    assert result.returncode == 0, result.stderr
    args = plistlib.loads(result.stdout.encode())["ProgramArguments"]
    assert args[args.index("--wyoming") + 1] == "tcp://0.0.0.0:10200"


def test_service_keeps_the_model_family():
    args = service.serve_arguments("ResembleAI/chatterbox", "8", None, None, family="multilingual")
    assert args[args.index("--family") + 1] == "multilingual"
    from nightingale.cli import build_parser

    parsed = build_parser().parse_args(["serve", *args])  # the unit's command line parses
    assert parsed.family == "multilingual" and parsed.model == "ResembleAI/chatterbox"
