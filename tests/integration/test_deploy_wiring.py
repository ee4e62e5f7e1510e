"""The deployment pieces inside a running sidecar, against real QEMU: systemd's notify socket and
the metrics exporter.

These tests switch themselves on: until the daemon calls :mod:`qmp_sdei.sdnotify` and the config
reads ``[metrics]``, they report xfail with the reason, and once both are wired they must pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import qmp_sdei.config
import qmp_sdei.daemon
from qmp_sdei.config import parse
from qmp_sdei.daemon import ExitCode, Sidecar
from support.mosquitto import free_port
from support.qemu import SLOW, requires_qemu, running_qemu
from support.sidecar import until

pytestmark = [pytest.mark.qemu, requires_qemu, pytest.mark.asyncio]

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, socket_path: Path, **tables: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "vm": {"name": "wired", "state_dir": str(tmp_path / "state")},
        "qmp": {"socket": str(socket_path), "timeout": SLOW},
        "sdei": {"events": [{"number": 1000}]},
        **tables,
    }
    return doc


def _toml(doc: dict[str, Any]) -> str:
    lines = []
    for table, values in doc.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            if isinstance(value, list):
                items = ", ".join("{ " + ", ".join(f"{k} = {v}" for k, v in item.items()) + " }" for item in value)
                lines.append(f"{key} = [{items}]")
            elif isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            else:
                lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


async def _messages(sock: socket.socket, until: str) -> list[str]:
    """Datagrams from the notify socket, one message per entry, up to the one containing ``until``."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    async with asyncio.timeout(SLOW):
        while not any(until in message.split("\n") for message in seen):
            seen.append((await loop.sock_recv(sock, 4096)).decode())
    return seen


async def test_systemd_hears_ready_status_and_stopping(tmp_path: Path) -> None:
    if not hasattr(qmp_sdei.daemon, "sdnotify"):
        pytest.xfail("daemon.py does not call qmp_sdei.sdnotify yet (lead's wiring)")
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.setblocking(False)
        async with running_qemu(tmp_path) as vm:
            config = tmp_path / "wired.toml"
            config.write_text(_toml(_config(tmp_path, vm.sidecar_socket)))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "qmp_sdei", "run", "--config", str(config),
                env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "NOTIFY_SOCKET": str(notify_path)},
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                before = await _messages(notify, "READY=1")
                ready = next(m for m in before if "READY=1" in m.split("\n"))
                assert any(line.startswith("STATUS=") and "wired" in line for line in ready.split("\n")), ready
                proc.send_signal(signal.SIGTERM)
                after = await _messages(notify, "STOPPING=1")
                assert any("STOPPING=1" in m.split("\n") for m in after)
                assert await asyncio.wait_for(proc.wait(), SLOW) == ExitCode.OK
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def test_a_configured_sidecar_serves_metrics(tmp_path: Path) -> None:
    if "metrics" not in qmp_sdei.config.Config.__dataclass_fields__:
        pytest.xfail("config.py does not read [metrics] yet (lead's wiring)")
    port = free_port()
    async with running_qemu(tmp_path) as vm:
        doc = _config(tmp_path, vm.sidecar_socket, metrics={"listen": f"127.0.0.1:{port}"})
        sidecar = Sidecar(parse(doc))
        task = asyncio.create_task(sidecar.run(), name="sidecar")
        try:
            await until(sidecar.ready.wait(), task, SLOW, "the sidecar to be ready")
            assert sidecar.owner is not None
            await sidecar.owner.raise_event(1000, 0)  # refused: the guest registered nothing

            def scrape() -> str:
                url = f"http://127.0.0.1:{port}/metrics"
                with urllib.request.urlopen(url, timeout=SLOW) as response:
                    body: bytes = response.read()
                    return body.decode()

            text = await asyncio.to_thread(scrape)  # READY means the exporter is listening
            assert 'qmp_sdei_sidecar_info{version="' in text or 'vm="wired"' in text
            assert "qmp_sdei_owner_refused_total 1.0" in text
            assert "qmp_sdei_events_pending 0.0" in text
        finally:
            sidecar.request_shutdown("test over")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, SLOW)
