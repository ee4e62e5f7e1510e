"""Helpers for tests that run the sidecar: a config for a test QEMU, an in-process sidecar, and the
``qmp-sdei`` command line as a subprocess (exit codes, signals, one-line errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qmp_sdei.config import Config
from qmp_sdei.daemon import ExitCode, Sidecar
from qmp_sdei.qemu.launch import QemuProcess
from support.qemu import SLOW


def config_for(tmp_path: Path, vm: QemuProcess | Path, **sections: dict[str, Any]) -> dict[str, Any]:
    socket = vm.sidecar_socket if isinstance(vm, QemuProcess) else vm
    doc: dict[str, Any] = {
        "vm": {"state_dir": str(tmp_path / "state")},
        "qmp": {"socket": str(socket), "timeout": SLOW},
        "sdei": {"events": [{"number": 1000}, {"number": 2000, "type": "shared"}], "bind_slots": [2, 2]},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return doc


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[tuple[Sidecar, asyncio.Task[ExitCode]]]:
    """A Sidecar running in this event loop, ready; shut down and awaited on exit."""
    sidecar = Sidecar(config)
    task = asyncio.create_task(sidecar.run(), name="sidecar")
    ready = asyncio.create_task(sidecar.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=SLOW, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        code = await task if task in done else None
        raise AssertionError(f"sidecar did not become ready (exit {code})")
    try:
        yield sidecar, task
    finally:
        sidecar.request_shutdown("test over")
        await asyncio.wait_for(task, SLOW)


def write_config(tmp_path: Path, doc: dict[str, Any]) -> Path:
    lines = []
    for section, values in doc.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items() if key != "events")
        if "events" in values:
            events = ", ".join(
                "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in e.items()) + " }" for e in values["events"]
            )
            lines.append(f"events = [{events}]")
    path = tmp_path / "vm.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def start_cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmp_sdei", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


async def read_until(stream: asyncio.StreamReader, needle: str, seen: list[str]) -> None:
    async def read() -> None:
        while line := await stream.readline():
            seen.append(line.decode())
            if needle in seen[-1]:
                return
        raise AssertionError(f"stream ended before {needle!r}: {''.join(seen)}")

    await asyncio.wait_for(read(), SLOW)


def run_cli(*args: str, timeout: float = SLOW) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmp_sdei", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert result.returncode == code, result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line or line.startswith("qmp-sdei:")]
    assert len(errors) == 1, result.stderr
    assert words in errors[0]
    assert "Traceback" not in result.stderr
