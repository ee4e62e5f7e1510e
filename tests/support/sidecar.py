"""Helpers for tests that run the sidecar: a config for a test QEMU, an in-process sidecar, and the
``qmp-sdei`` command line as a subprocess (exit codes, signals, one-line errors).

* :func:`until` waits for a readiness signal unless the sidecar's task ends first, so a sidecar that
  dies during start-up fails the test at once with its reason instead of after the timeout.
* :func:`serving` (a ready sidecar for an ``async with`` block) and :class:`RunningSidecar` (one the
  test starts, restarts or kills itself; the ``sidecars`` fixture in ``tests/conftest.py`` stops
  what is left) both build on it.
* :func:`to_toml` / :func:`write_config` turn a config dict into the TOML file the CLI reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

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


T = TypeVar("T")


async def until(awaitable: Awaitable[T], sidecar_task: asyncio.Task[Any], timeout: float, what: str) -> T:
    """Wait for ``awaitable`` unless the sidecar's task ends first (then fail with how it ended)."""
    waiter = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({waiter, sidecar_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not waiter.done():
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await waiter
    if waiter in done:
        return waiter.result()  # re-raises a failed wait (QEMU exited, console timeout)
    if sidecar_task in done:
        raise AssertionError(f"the sidecar ended while waiting for {what}: {sidecar_task!r}")
    raise TimeoutError(f"no {what} within {timeout}s")


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[tuple[Sidecar, asyncio.Task[ExitCode]]]:
    """A Sidecar running in this event loop, ready; shut down and awaited on exit."""
    sidecar = Sidecar(config)
    task = asyncio.create_task(sidecar.run(), name="sidecar")
    try:
        await until(sidecar.ready.wait(), task, SLOW, "the sidecar to be ready")
        yield sidecar, task
    finally:
        if not task.done():
            sidecar.request_shutdown("test over")
        await asyncio.wait_for(task, SLOW)


class RunningSidecar:
    """An in-process sidecar task the test starts (and may stop) itself.

    Put it in the ``sidecars`` fixture's list so that it is shut down whatever the test did.
    """

    def __init__(self, config: Config) -> None:
        self.sidecar = Sidecar(config)
        self.task = asyncio.create_task(self.sidecar.run(), name="test.sidecar")

    async def ready(self) -> Sidecar:
        await until(self.sidecar.ready.wait(), self.task, SLOW, "the sidecar to be ready")
        return self.sidecar

    async def conduit_attached(self) -> Any:
        """The conduit, once attached and serving (resumed or holding the VM)."""
        await self.ready()
        await until(self.sidecar.conduit_ready.wait(), self.task, SLOW, "the conduit to attach")
        await asyncio.wait_for(self.sidecar.conduit.serving.wait(), SLOW)
        return self.sidecar.conduit

    async def stop(self) -> ExitCode:
        self.sidecar.request_shutdown("test finished")
        return await asyncio.wait_for(self.task, SLOW)


def to_toml(doc: dict[str, Any]) -> str:
    """Just enough TOML for the tests' configs (tables of scalars, lists, lists of inline tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(v)

    return "\n".join(
        f"[{table}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in body.items()) for table, body in doc.items()
    )


def write_config(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "vm.toml"
    path.write_text(to_toml(doc))
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
