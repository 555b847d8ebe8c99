"""`nightingale service install|uninstall|status`: keep the daemon warm from login.

On macOS the LaunchAgent template (launchd/org.nightingale.daemon.plist, packaged beside
this module) is rendered with this installation's absolute paths into
~/Library/LaunchAgents and loaded with `launchctl bootstrap gui/UID`. On Linux the systemd
user unit (launchd/nightingale.service) goes to ~/.config/systemd/user and is enabled with
`systemctl --user`. `--dry-run` prints the rendered file on stdout and what it would do on
stderr; `--platform` renders for either system from any machine.

This module is light on purpose (no MLX, no numpy): it runs from the `nightingale` CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import os
import plistlib
import re
import shlex
import string
import subprocess
import sys
import sysconfig
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

LABEL = "org.nightingale.daemon"
PLIST_TEMPLATE = f"{LABEL}.plist"
UNIT_NAME = "nightingale.service"
PLATFORMS = ("macos", "linux")

# Variables the daemon may need that a login session has but launchd/systemd do not pass on:
# where the Hugging Face cache lives and whether it may go online, and our own overrides.
# (Never HF_TOKEN: a plist or unit file is no place for a secret; huggingface_hub reads its
# own token file.)
PASSTHROUGH_ENV = (
    "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE",
    "NIGHTINGALE_SOCKET", "NIGHTINGALE_DATA_DIR", "NIGHTINGALE_CACHE_DIR",
    "NIGHTINGALE_HTTP_TOKEN",  # the --http bearer token: in the unit's environment, not its command line
)  # fmt: skip
# launchd starts agents with PATH=/usr/bin:/bin:/usr/sbin:/sbin; Homebrew and our venv come first.
MACOS_PATH = ("/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")
LINUX_PATH = ("/usr/local/bin", "/usr/bin", "/bin")


# systemctl --user without a user service manager (containers, su, cron, CI).
NO_USER_BUS = re.compile(r"connect to bus|DBUS_SESSION_BUS_ADDRESS|XDG_RUNTIME_DIR", re.IGNORECASE)


class ServiceError(Exception):
    """A service action that cannot go on; the CLI turns it into one line on stderr."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Command:
    """One external command of a plan. `check=False` for steps that may fail harmlessly
    (booting out an agent that is not loaded)."""

    argv: tuple[str, ...]
    check: bool = True

    def __str__(self) -> str:
        return shlex.join(self.argv)


@dataclasses.dataclass(frozen=True)
class ServicePlan:
    """What an action does: write (or remove) one file, then run commands in order."""

    platform: str
    action: str
    path: Path
    content: str | None  # the file to write (install), None otherwise
    commands: tuple[Command, ...]  # after writing the file (install), before removing it (uninstall)
    log_dir: Path | None = None  # macOS: launchd opens the log files but won't create their folder
    cleanup: tuple[Command, ...] = ()  # after removing the file (uninstall)


@dataclasses.dataclass(frozen=True)
class ServeSpec:
    """How the service starts the daemon: the program and its `serve` arguments."""

    program: tuple[str, ...]  # absolute `nightingale` (or python -m ...), never relative
    serve_args: tuple[str, ...]
    environment: dict[str, str]

    @property
    def argv(self) -> tuple[str, ...]:
        return (*self.program, "serve", *self.serve_args)


def current_platform() -> str:
    return "macos" if sys.platform == "darwin" else "linux"


def nightingale_program() -> tuple[str, ...]:
    """This installation's `nightingale`, as an absolute path.

    The console script beside the running interpreter is preferred (a venv's bin/); paths are
    made absolute but symlinks are kept, since resolving a venv's python would leave the venv.
    """
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "nightingale" and os.path.isfile(argv0):
        return (os.path.abspath(argv0),)
    script = Path(sysconfig.get_path("scripts")) / "nightingale"
    if script.is_file() and os.access(script, os.X_OK):
        return (os.path.abspath(script),)
    # What the console script does. (Not `-m nightingale.cli`: that runs cli.py as
    # __main__, whose CliError is not the class the handlers raise.)
    return (os.path.abspath(sys.executable), "-c", "import sys; from nightingale.cli import main; sys.exit(main())")


def serve_arguments(
    model: str | None, quantize: str | None, socket: str | None, device: str | None,
    http: str | None = None, wyoming: str | None = None, decoder: str | None = None, family: str | None = None,
) -> tuple[str, ...]:
    """The `serve` options baked into the service. Local paths become absolute: launchd and
    systemd start the daemon from another working directory."""
    out: list[str] = []
    if model:
        out += ["--model", os.path.abspath(model) if os.path.exists(model) else model]
    if family:
        out += ["--family", family]
    if quantize:
        out += ["--quantize", quantize]
    if socket:
        out += ["--socket", os.path.abspath(socket)]
    if device is not None:
        out += ["--device", device]
    if http:
        out += ["--http", http]
    if wyoming:
        out += ["--wyoming", wyoming]
    if decoder:
        out += ["--decoder", os.path.abspath(decoder) if os.path.exists(decoder) else decoder]
    return tuple(out)


def service_environment(platform: str, program: tuple[str, ...], env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the service: a PATH that finds this installation first, unbuffered
    output so the logs are current, and the pass-through variables that are set now."""
    env = os.environ if env is None else env
    bin_dir = os.path.dirname(program[0])
    system_path = MACOS_PATH if platform == "macos" else LINUX_PATH
    path = [bin_dir] + [p for p in system_path if p != bin_dir]
    out = {"PATH": ":".join(path), "PYTHONUNBUFFERED": "1"}
    for name in PASSTHROUGH_ENV:
        if env.get(name):
            out[name] = env[name]
    return out


def read_template(name: str) -> str:
    """A template from the package (the files in launchd/, packaged beside this module)."""
    return importlib.resources.files("nightingale.client").joinpath(name).read_text(encoding="utf-8")


def launch_agent_path(home: Path) -> Path:
    return home / "Library" / "LaunchAgents" / PLIST_TEMPLATE


def macos_log_dir(home: Path) -> Path:
    return home / "Library" / "Logs" / "Nightingale"


def systemd_unit_path(home: Path, env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    config = env.get("XDG_CONFIG_HOME") or str(home / ".config")
    return Path(config) / "systemd" / "user" / UNIT_NAME


def render_launch_agent(spec: ServeSpec, home: Path) -> str:
    """The LaunchAgent plist for `spec` (XML text), checked to parse."""
    logs = macos_log_dir(home)
    indent = " " * 8
    fields = {
        "label": xml_escape(LABEL),
        "program_arguments": "\n".join(f"{indent}<string>{xml_escape(a)}</string>" for a in spec.argv),
        "working_directory": xml_escape(str(home)),
        "environment": "\n".join(
            f"{indent}<key>{xml_escape(k)}</key>\n{indent}<string>{xml_escape(v)}</string>"
            for k, v in spec.environment.items()
        ),
        "stdout_path": xml_escape(str(logs / "nightingale.out.log")),
        "stderr_path": xml_escape(str(logs / "nightingale.err.log")),
    }
    text = string.Template(read_template(PLIST_TEMPLATE)).substitute(fields)
    plistlib.loads(text.encode("utf-8"))  # a template edit that breaks XML fails here, not in launchd
    return text


def systemd_quote(arg: str) -> str:
    """Quote one word for systemd's ExecStart= / Environment= (systemd.syntax(7)):
    specifiers (%) and variable expansion ($) are escaped, spaces and quotes are quoted."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not any(c in arg for c in ' \t"\'\\;'):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_systemd_unit(spec: ServeSpec, home: Path) -> str:
    """The systemd user unit for `spec` (INI text)."""
    fields = {
        "exec_start": " ".join(systemd_quote(a) for a in spec.argv),
        "working_directory": systemd_quote(str(home)),
        "environment": "\n".join(f"Environment={systemd_quote(f'{k}={v}')}" for k, v in spec.environment.items()),
    }
    return string.Template(read_template(UNIT_NAME)).substitute(fields)


def plan(
    action: str,
    platform: str,
    spec: ServeSpec | None = None,
    home: Path | None = None,
    uid: int | None = None,
    env: dict[str, str] | None = None,
) -> ServicePlan:
    """The file and commands for `action` (install/uninstall/status) on `platform`.

    Pure: nothing is written or run, so any platform can be planned from any machine.
    """
    home = Path.home() if home is None else home
    uid = os.getuid() if uid is None else uid
    if platform == "macos":
        path = launch_agent_path(home)
        domain = f"gui/{uid}"
        target = f"{domain}/{LABEL}"
        if action == "install":
            assert spec is not None
            # Boot out a previous copy first (it may not be loaded), or bootstrap fails with EIO.
            commands = (
                Command(("launchctl", "bootout", target), check=False),
                Command(("launchctl", "enable", target)),
                Command(("launchctl", "bootstrap", domain, str(path))),
            )
            return ServicePlan(platform, action, path, render_launch_agent(spec, home), commands, macos_log_dir(home))
        if action == "uninstall":
            return ServicePlan(platform, action, path, None, (Command(("launchctl", "bootout", target), check=False),))
        if action == "status":
            return ServicePlan(platform, action, path, None, (Command(("launchctl", "print", target), check=False),))
    elif platform == "linux":
        path = systemd_unit_path(home, env)
        ctl = ("systemctl", "--user")
        if action == "install":
            assert spec is not None
            # restart (not start): a reinstall with new arguments must replace the running daemon.
            commands = (
                Command((*ctl, "daemon-reload")),
                Command((*ctl, "enable", UNIT_NAME)),
                Command((*ctl, "restart", UNIT_NAME)),
            )
            return ServicePlan(platform, action, path, render_systemd_unit(spec, home), commands)
        if action == "uninstall":
            return ServicePlan(
                platform, action, path, None,
                (Command((*ctl, "disable", "--now", UNIT_NAME), check=False),),
                cleanup=(Command((*ctl, "daemon-reload"), check=False),),
            )  # fmt: skip
        if action == "status":
            return ServicePlan(
                platform, action, path, None,
                (Command((*ctl, "show", UNIT_NAME, "--property=LoadState,UnitFileState,ActiveState,SubState,MainPID"), check=False),),
            )
    raise ServiceError(f"unknown service action {action!r} for {platform!r}", code=2)


def _run(command: Command) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(command.argv, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise ServiceError(f"{command.argv[0]} not found: {err}") from err
    if command.check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise ServiceError(f"`{command}` failed ({result.returncode}): {detail[-1] if detail else 'no output'}")
    return result


def _write_atomic(path: Path, content: str) -> None:
    """Write via a temporary file and rename, so launchd/systemd never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def parse_launchctl_print(text: str) -> dict[str, str]:
    """The top-level `key = value` lines of `launchctl print` (state, pid, last exit code)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        # Top-level fields are indented by one tab; nested blocks by more.
        if line.startswith("\t") and not line.startswith("\t\t") and " = " in line:
            key, _, value = line.strip().partition(" = ")
            out.setdefault(key, value)
    return out


def installed_socket(service_plan: ServicePlan) -> str | None:
    """The --socket the installed service was given (None: the default), read back from
    its file so that `status` asks the daemon the service actually runs."""
    try:
        text = service_plan.path.read_text(encoding="utf-8")
    except OSError:
        return None
    if service_plan.platform == "macos":
        try:
            argv = plistlib.loads(text.encode("utf-8")).get("ProgramArguments", [])
        except Exception:  # a hand-edited, broken file: fall back to the default socket
            return None
    else:
        line = next((line for line in text.splitlines() if line.startswith("ExecStart=")), "")
        try:
            argv = shlex.split(line.partition("=")[2].replace("%%", "%").replace("$$", "$"))
        except ValueError:
            return None
    if "--socket" in argv[:-1]:
        return argv[argv.index("--socket") + 1]
    return None


def daemon_status_line(socket: str | None) -> tuple[bool, str]:
    """(answering, one line) from the daemon's own `status`."""
    from nightingale import protocol as p
    from nightingale.client.connection import Connection, DaemonUnavailable

    try:
        with Connection(socket, timeout=3.0) as conn:
            conn.send(p.GetStatus())
            while True:
                event = conn.recv(timeout=3.0)
                if event is None:
                    return False, "daemon: closed the connection"
                if isinstance(event, p.Status):
                    model = event.model.get("source") or event.model.get("path") or "loading"
                    family = f" ({event.model['family']})" if event.model.get("family") else ""
                    return True, (
                        f"daemon: {event.state}, pid {event.pid}, up {event.uptime_s:.0f} s, "
                        f"model {model}{family}, socket {event.socket}"
                    )
    except (DaemonUnavailable, p.ProtocolError, OSError, ValueError) as err:
        return False, f"daemon: not answering ({err})"


def execute(service_plan: ServicePlan, out=sys.stdout) -> int:
    """Carry out a plan on this machine; returns the exit code (status: 0 when the service
    manager runs it and the daemon answers, 1 otherwise)."""
    p = service_plan
    if p.action == "install":
        assert p.content is not None
        if p.log_dir is not None:
            p.log_dir.mkdir(parents=True, exist_ok=True)
        previous = p.path.read_text(encoding="utf-8") if p.path.is_file() else None
        _write_atomic(p.path, p.content)
        try:
            for command in p.commands:
                _run(command)
        except ServiceError as err:  # leave the machine as it was: no unit nobody can start
            if previous is None:
                p.path.unlink(missing_ok=True)
            else:
                _write_atomic(p.path, previous)
            if p.platform == "linux" and NO_USER_BUS.search(str(err)):
                raise ServiceError(
                    f"{err}; there is no systemd user session here (log in to a desktop or over ssh, or run "
                    "`loginctl enable-linger $USER` as root), or start the daemon yourself with `nightingale serve`"
                ) from None
            raise
        print(f"installed {p.path}", file=out)
        if p.log_dir is not None:
            print(f"logs: {p.log_dir}", file=out)
        else:
            print("logs: journalctl --user -u nightingale", file=out)
        return 0
    if p.action == "uninstall":
        for command in p.commands:
            _run(command)
        existed = p.path.exists()
        p.path.unlink(missing_ok=True)
        for command in p.cleanup:
            _run(command)
        print(f"removed {p.path}" if existed else f"not installed ({p.path} absent)", file=out)
        return 0
    # status
    installed = p.path.exists()
    print(f"{'installed' if installed else 'not installed'}: {p.path}", file=out)
    result = _run(p.commands[0])
    running = False
    if p.platform == "macos":
        if result.returncode == 0:
            fields = parse_launchctl_print(result.stdout)
            state = fields.get("state", "unknown")
            running = state == "running"
            extra = f", pid {fields['pid']}" if "pid" in fields else ""
            print(f"launchd: {state}{extra} (last exit code {fields.get('last exit code', 'n/a')})", file=out)
        else:
            print("launchd: not loaded", file=out)
    elif result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        print(f"systemd: unavailable ({detail[-1] if detail else 'no output'})", file=out)
    else:
        props = dict(line.partition("=")[::2] for line in result.stdout.splitlines() if "=" in line)
        running = props.get("ActiveState") == "active"
        print(
            f"systemd: {props.get('ActiveState', 'unknown')} ({props.get('SubState', '?')}), "
            f"unit file {props.get('UnitFileState', '?') or 'absent'}, pid {props.get('MainPID', '0')}",
            file=out,
        )
    answering, line = daemon_status_line(installed_socket(p))
    print(line, file=out)
    return 0 if running and answering else 1


def print_dry_run(service_plan: ServicePlan, out=sys.stdout, err=sys.stderr) -> None:
    """The rendered file alone on stdout (so `--dry-run > file` is the file), the steps in
    order on stderr."""
    p = service_plan

    def show(commands: tuple[Command, ...]) -> None:
        for command in commands:
            print(f"# would run: {command}{'' if command.check else '   (failure ignored)'}", file=err)

    if p.content is not None:
        print(f"# would write {p.path}", file=err)
        out.write(p.content)
        out.flush()
    show(p.commands)
    if p.action == "uninstall":
        print(f"# would remove {p.path}", file=err)
        show(p.cleanup)


def service_main(args: argparse.Namespace) -> int:
    """Handler of `nightingale service ...` (see nightingale/cli.py for the arguments)."""
    from nightingale.cli import CliError  # light module: argparse only

    platform = args.platform or current_platform()
    action = args.service_command
    spec = None
    if action == "install":
        program = nightingale_program()
        spec = ServeSpec(
            program=program,
            serve_args=serve_arguments(
                args.model, args.quantize, args.socket, args.device, getattr(args, "http", None),
                getattr(args, "wyoming", None), getattr(args, "decoder", None), getattr(args, "family", None),
            ),
            environment=service_environment(platform, program),
        )
    try:
        service_plan = plan(action, platform, spec)
        if getattr(args, "dry_run", False):  # status has no --dry-run
            print_dry_run(service_plan)
            return 0
        if platform != current_platform():
            hint = "" if action == "status" else "; add --dry-run to only render it"
            raise ServiceError(f"cannot {action} a {platform} service on {current_platform()}{hint}", code=2)
        return execute(service_plan)
    except ServiceError as err:
        raise CliError(str(err), code=err.code) from None
    except OSError as err:
        raise CliError(f"{action} failed: {err}") from None
