"""Running the console scripts in tests: `nightingale` and `nsay` as the installed entry
points (or their modules when not installed), and a fake `systemctl` for the service commands."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

_SCRIPTS = Path(sysconfig.get_path("scripts"))
NSAY = [str(_SCRIPTS / "nsay")] if (_SCRIPTS / "nsay").is_file() else [
    sys.executable, "-c", "import sys; from nightingale.client.nsay import main; sys.exit(main())"
]  # fmt: skip
NIGHTINGALE = [str(_SCRIPTS / "nightingale")] if (_SCRIPTS / "nightingale").is_file() else [
    sys.executable, "-c", "import sys; from nightingale.cli import main; sys.exit(main())"
]  # fmt: skip


def nsay(daemon, *args: str, input: bytes | None = None, timeout: float = 60, env=None):
    """Run nsay against `daemon` (anything with a `socket` path; None: nsay's default socket)."""
    sock = ["--socket", str(daemon.socket)] if daemon else []
    return subprocess.run([*NSAY, *sock, *args], input=input, capture_output=True, timeout=timeout, env=env)


def run_cli(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "nightingale.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def nightingale(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # Not `-m nightingale.cli`: that runs cli.py as __main__, a second copy whose
        # CliError class is not the one the handlers raise.
        [sys.executable, "-c", "import sys; from nightingale.cli import main; sys.exit(main())", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def make_fake_systemctl(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A `systemctl` that records its arguments and answers `show` like systemd does, first
    on PATH, with HOME and XDG_CONFIG_HOME inside tmp_path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "systemctl.log"
    script = bin_dir / "systemctl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        'case "$*" in *" show "*) printf "LoadState=loaded\\nUnitFileState=enabled\\nActiveState=active\\nSubState=running\\nMainPID=99\\n";; esac\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "home" / ".config"))
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env, log
