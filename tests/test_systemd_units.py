"""The units in deploy/ load cleanly (`systemd-analyze verify`) and are sandboxed: `systemd-analyze
security` rates each below 5 (0 is the safest; before hardening they rated 9.2). Needs
systemd-analyze (systemd 250 or later, for --offline), not a running systemd (issue 24)."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

DEPLOY = pathlib.Path(__file__).resolve().parent.parent / "deploy"
UNITS = sorted(DEPLOY.glob("*.service"))
INSTALLED = "/opt/semipd/venv/bin/semipd"  # the units' ExecStart; the README says how to change it
MPS_CONTROL = "/usr/bin/nvidia-cuda-mps-control"  # from NVIDIA's driver: absent on a CPU machine
MAX_EXPOSURE = 5.0


def analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60)


pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or "--offline" not in analyze("--help").stdout,
    reason="needs systemd-analyze with --offline (systemd 250 or later)")


@pytest.fixture
def installed_units(tmp_path) -> list[pathlib.Path]:
    """The units as the README installs them: ExecStart pointed at this environment's semipd."""
    semipd = os.path.join(os.path.dirname(sys.executable), "semipd")
    if not os.access(semipd, os.X_OK):
        pytest.skip(f"no semipd script beside {sys.executable} (pip install -e .)")
    for unit in UNITS:
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED, semipd))
    return [tmp_path / unit.name for unit in UNITS]


def test_units_verify_cleanly(installed_units):
    result = analyze("verify", *map(str, installed_units))
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if line and not (f"Command {MPS_CONTROL} is not executable" in line and not os.path.exists(MPS_CONTROL))]
    assert not complaints, "\n".join(complaints)


@pytest.mark.parametrize("unit", [u.name for u in UNITS])
def test_unit_exposure_is_below_five(installed_units, unit):
    result = analyze("security", "--offline=true", str(installed_units[0].parent / unit))
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) < MAX_EXPOSURE, result.stdout


def test_notify_units_let_only_the_main_process_notify():
    """semipd serve and semipd scm notify from their main process; a worker or gateway child
    never does (sd_notify.Notifier.from_env takes NOTIFY_SOCKET out of their environment)."""
    for unit in UNITS:
        text = unit.read_text()
        if "Type=notify" in text:
            assert "NotifyAccess=main" in text and re.search(r"^WatchdogSec=\d+", text, re.M), unit.name
            assert re.search(rf"^ExecStart={re.escape(INSTALLED)} ", text, re.M), unit.name
