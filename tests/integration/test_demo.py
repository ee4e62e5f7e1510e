"""The README's first command, ``quickstart.sh demo``, minus the installs: every step real, fewer events."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.guest, pytest.mark.linux]

REPO = Path(__file__).resolve().parents[2]


def test_the_main_job_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--events", "3", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert out.count("  ok  ") == 6 and "FAIL" not in out, out
    assert "versions the guest saw at boot            SDEI 1.1, PSCI 1.0" in out, out
    assert "versions after the migration              SDEI 1.1, PSCI 1.0" in out, out
    assert "events raised / delivered                 6 / 6" in out, out
