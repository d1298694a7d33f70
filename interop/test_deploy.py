"""The systemd units of ``deploy/systemd`` (docs/deploy.md): each is a unit systemd accepts, and
each command line is one our binaries accept.

``systemd-analyze verify`` reads a unit as systemd would (unknown keys, bad values, a missing
executable); the units point at ``/opt/rcelery/bin``, so the check reads copies pointed at the
binaries under test. The command lines are then run with ``--help`` appended, with the example
environment files' values: clap refuses an unknown flag before it prints help.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from interop_helpers import rust_binary

UNITS_DIR = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
UNITS = ["rcelery-worker@.service", "rcelery-web.service", "rcelery-beat.service"]
INSTALL_DIR = "/opt/rcelery/bin"


def _bin_dir() -> str:
    return str(Path(rust_binary("worker")).parent)


def _example_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for example in sorted(UNITS_DIR.glob("*.env.example")):
        for line in example.read_text().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.partition("=")
                env[name] = value
    return env


def _exec_start(unit: str) -> list[str]:
    """The unit's ExecStart as argv, with the instance ``default``, systemd's ``%%`` escapes
    undone and ``${VAR}`` taken from the example environment files."""
    text = (UNITS_DIR / unit).read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    command = line.removeprefix("ExecStart=").replace("%i", "default").replace("%%", "%")
    env = _example_env()
    command = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], command)
    return shlex.split(command.replace(INSTALL_DIR, _bin_dir()))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_each_unit(tmp_path):
    copies = []
    for unit in UNITS:
        copy = tmp_path / unit.replace("@.service", "@default.service")
        copy.write_text((UNITS_DIR / unit).read_text().replace(INSTALL_DIR, _bin_dir()))
        copies.append(str(copy))
    checked = subprocess.run(["systemd-analyze", "verify", *copies], capture_output=True, text=True, timeout=60)
    output = (checked.stdout + checked.stderr).strip()
    assert checked.returncode == 0 and not output, output


@pytest.mark.parametrize("unit", UNITS)
def test_each_command_line_is_one_our_binary_accepts(unit):
    argv = _exec_start(unit)
    assert Path(argv[0]).name in {"worker", "web", "beat"}, argv
    run = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, f"{shlex.join(argv)}\n{run.stderr}"
