"""examples/qmp-sdei@.service passes systemd-analyze verify and keeps its hardening."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "examples" / "qmp-sdei@.service"
INSTALLED_BINARY = "/opt/qmp-sdei/.venv/bin/qmp-sdei"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package: systemd)"
)


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found[key].append(value)
    return found


def instance_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit as instance vm1, its ExecStart pointing at an executable that exists here.

    verify checks that every Exec*= command exists; the example names where the install guide puts
    it (/opt/qmp-sdei), so the copy points at the interpreter running the tests instead.
    """
    text = UNIT.read_text() if text is None else text
    assert INSTALLED_BINARY in text
    unit_dir = tmp_path / "units"
    unit_dir.mkdir(exist_ok=True)
    (unit_dir / "qmp-sdei@.service").write_text(text.replace(INSTALLED_BINARY, sys.executable))
    instance = unit_dir / "qmp-sdei@vm1.service"
    shutil.copy(unit_dir / "qmp-sdei@.service", instance)
    return instance


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    result = verify(instance_copy(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == ""


@needs_systemd_analyze
def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt directive and a missing binary are reported."""
    broken = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict")
    result = verify(instance_copy(tmp_path, broken))
    assert "ProtectSytem" in result.stderr
    missing = tmp_path / "missing"
    missing.mkdir()
    text = UNIT.read_text().replace(INSTALLED_BINARY, "/nonexistent/qmp-sdei")
    (missing / "qmp-sdei@vm1.service").write_text(text)
    result = verify(missing / "qmp-sdei@vm1.service")
    assert result.returncode != 0 and "/nonexistent/qmp-sdei" in result.stderr


@needs_systemd_analyze
def test_offline_security_exposure_is_low(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(instance_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze has no offline security analysis: {result.stderr.strip()}")
    # 0 is a perfect sandbox, 10 none; systemd calls below 2 "OK" (1.4 when written).
    assert float(match.group(1)) < 2.0, result.stdout


def test_the_unit_is_notify_type_and_hardened() -> None:
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["ExecStart"] == [f"{INSTALLED_BINARY} run --config /etc/qmp-sdei/%i.toml"]
    assert d["ExecStartPre"] == [f"{INSTALLED_BINARY} check-config /etc/qmp-sdei/%i.toml"]
    assert d["StateDirectory"] == ["qmp-sdei/%i"]  # the config's default state_dir for VM %i
    assert d["RestartPreventExitStatus"] == ["2 4"]  # config and state errors need a person
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet": "",
        "MemoryDenyWriteExecute": "yes",
    }.items():
        assert d[key] == [value], key
    assert "@system-service" in d["SystemCallFilter"]
    assert d["User"] == ["qmp-sdei"]
