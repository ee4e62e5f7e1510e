"""The in-band migration channel: what it costs. Prints one JSON document.

* ``dbus``: for dispatchers of 1, 8, 64 and 512 vCPUs in the worst case ``bench/dispatcher.py``
  builds (every vCPU with registrations and a nested dispatch in progress): the snapshot size, and
  the time of a ``Save`` and of a ``Load`` call over a private ``dbus-daemon``, made by a plain
  D-Bus client the way QEMU's dbus-vmstate makes them (the round trip, and inside it the time in
  ``snapshot()`` / ``restore()``).
* ``migration``: real live migrations between two ``qemu-system-aarch64 -M virt`` on loopback (a
  running 2-vCPU machine with no guest image; both QEMUs are fresh for every repetition), driven
  as the sidecar does (``events`` and ``pause-before-switchover``, continuing as soon as the pause
  is reached), for:

  - ``plain``: no dbus-vmstate object, no return path (the floor);
  - ``plain_return_path``: no dbus-vmstate object, ``return-path`` on both sides;
  - ``helper_2``: dbus-vmstate object, a VMState1 service per side, ``return-path``; the state of
    a busy 2-vCPU dispatcher;
  - ``helper_512``: the same with the state of a busy 512-vCPU dispatcher (the dispatchers need
    not match QEMU's vCPU count here: only the bytes and the restore work matter);
  - ``plain_return_path_unix``, ``helper_2_unix``, ``helper_512_unix``: as above over a unix
    socket instead of TCP (on loopback TCP the return path alone adds about 40 ms of downtime).

  Each reports the source's ``total-time`` and ``downtime`` (``query-migrate``), our wall time
  from ``migrate`` to the destination's ``completed``, medians and ranges; then the ratio of the
  helper cases' median downtime to the same setup without the helper, and to ``plain``.

Usage: python bench/migration.py [--repeats N] [--dbus-repeats N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from qmp_sdei.qemu import migration
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
from qmp_sdei.qemu.qmp import VmEventKind, attach
from qmp_sdei.sdei import Dispatcher
from qmp_sdei.vmstate import PrivateBus, VmstateService
from qmp_sdei.vmstate.service import INTERFACE, OBJECT_PATH

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dispatcher import EVENTS, busy_dispatcher, mpidrs  # a sibling script, not a package

TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spread(samples: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(samples), 3),
        "min": round(min(samples), 3),
        "max": round(max(samples), 3),
    }


# -- Save / Load over D-Bus ---------------------------------------------------------------------------


async def call(
    client: MessageBus, owner: str | None, member: str, signature: str = "", body: list[Any] | None = None
) -> Message:
    message = Message(destination=owner, path=OBJECT_PATH, interface=INTERFACE, member=member,
                      signature=signature, body=body or [])  # fmt: skip
    reply = await asyncio.wait_for(client.call(message), TIMEOUT)
    if reply is None or reply.message_type is not MessageType.METHOD_RETURN:
        raise RuntimeError(f"{member} failed: {reply.body if reply else 'no reply'}")
    return reply


async def dbus_cost(vcpus: int, workdir: Path, repeats: int) -> dict[str, Any]:
    source = busy_dispatcher(vcpus)
    target = Dispatcher(events=EVENTS, mpidrs=mpidrs(vcpus), bind_slots=(3, 3))
    async with (
        PrivateBus(workdir / f"bus-{vcpus}") as bus,
        VmstateService(bus.address, save=source.snapshot, load=lambda blob: None, state_id="src") as src,
        VmstateService(bus.address, save=lambda: b"", load=target.restore, state_id="dst") as dst,
    ):
        client = await MessageBus(bus_address=bus.address).connect()
        try:
            # QEMU finds helpers by listing the name's queue and reading Ids; here they are known.
            owners = {"src": src.unique_name, "dst": dst.unique_name}
            save_ms, load_ms, save_cb, load_cb = [], [], [], []
            blob = b""
            for _ in range(repeats):
                t0 = time.perf_counter()
                blob = bytes((await call(client, owners["src"], "Save")).body[0])
                t1 = time.perf_counter()
                await call(client, owners["dst"], "Load", "ay", [blob])
                t2 = time.perf_counter()
                save_ms.append((t1 - t0) * 1e3)
                load_ms.append((t2 - t1) * 1e3)
                save_cb.append(src.stats.last_save_ms)
                load_cb.append(dst.stats.last_load_ms)
                assert target == source
                target.reset()
        finally:
            client.disconnect()
    return {
        "vcpus": vcpus,
        "bytes": len(blob),
        "save_call_ms": spread(save_ms),
        "load_call_ms": spread(load_ms),
        "snapshot_ms_median": round(statistics.median(save_cb), 3),
        "restore_ms_median": round(statistics.median(load_cb), 3),
    }


# -- live migrations -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def vm_side(
    workdir: Path, spec: QemuSpec, *, state: Callable[[], bytes] | None, load: Callable[[bytes], None] | None
) -> AsyncIterator[Any]:
    async with contextlib.AsyncExitStack() as stack:
        vm = QemuProcess(spec, workdir / "qemu")
        stack.push_async_callback(vm.stop)
        await vm.start()
        qmp = await attach(vm.sidecar_socket, listen=False, timeout=TIMEOUT, name=workdir.name)
        stack.push_async_callback(qmp.close)
        if state is not None and load is not None:
            bus = await stack.enter_async_context(PrivateBus(workdir / "bus"))
            await stack.enter_async_context(VmstateService(bus.address, save=state, load=load))
            await migration.add_dbus_vmstate(qmp, bus.address)
        yield qmp


async def one_migration(
    workdir: Path, *, helper_vcpus: int | None, return_path: bool, transport: str = "tcp"
) -> dict[str, float]:
    source_state = busy_dispatcher(helper_vcpus) if helper_vcpus else None
    target = Dispatcher(events=EVENTS, mpidrs=mpidrs(helper_vcpus), bind_slots=(3, 3)) if helper_vcpus else None
    with_helper = source_state is not None and target is not None
    source_spec = QemuSpec(smp=2, paused=False)
    destination_spec = QemuSpec(smp=2, paused=True, extra_args=("-incoming", "defer"))
    async with (
        vm_side(workdir / "src", source_spec, state=source_state.snapshot if with_helper else None,
                load=(lambda blob: None) if with_helper else None) as src,
        vm_side(workdir / "dst", destination_spec, state=(lambda: b"") if with_helper else None,
                load=target.restore if with_helper else None) as dst,
    ):  # fmt: skip
        with dst.subscribe({VmEventKind.MIGRATION}) as incoming:
            await migration.prepare_destination(dst, return_path=return_path)
            uri = f"tcp:127.0.0.1:{free_port()}" if transport == "tcp" else f"unix:{workdir / 'migration.sock'}"
            await migration.migrate_incoming(dst, uri)
            await migration.prepare_source(src, return_path=return_path)
            started = time.perf_counter()
            info = await migration.run_source_migration(src, uri, timeout=TIMEOUT)
            await migration.wait_for_migration(incoming, {"completed"}, TIMEOUT)
            wall_ms = (time.perf_counter() - started) * 1e3
        if with_helper:
            assert target == source_state
    assert info.total_time_ms is not None and info.downtime_ms is not None
    return {"total_ms": float(info.total_time_ms), "downtime_ms": float(info.downtime_ms), "wall_ms": wall_ms}


async def migration_cost(workdir: Path, repeats: int) -> dict[str, Any]:
    cases: dict[str, dict[str, Any]] = {
        "plain": {"helper_vcpus": None, "return_path": False},
        "plain_return_path": {"helper_vcpus": None, "return_path": True},
        "helper_2": {"helper_vcpus": 2, "return_path": True},
        "helper_512": {"helper_vcpus": 512, "return_path": True},
        "plain_return_path_unix": {"helper_vcpus": None, "return_path": True, "transport": "unix"},
        "helper_2_unix": {"helper_vcpus": 2, "return_path": True, "transport": "unix"},
        "helper_512_unix": {"helper_vcpus": 512, "return_path": True, "transport": "unix"},
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for repetition in range(repeats):
        for name, kwargs in cases.items():  # interleaved, so load changes hit every case alike
            runs[name].append(await one_migration(workdir / f"{name}-{repetition}", **kwargs))
    result: dict[str, Any] = {}
    for name, samples in runs.items():
        result[name] = {key: spread([s[key] for s in samples]) for key in ("total_ms", "downtime_ms", "wall_ms")} | {
            "repeats": len(samples)
        }

    def ratio(case: str, base: str) -> float | None:
        below = result[base]["downtime_ms"]["median"]
        return round(result[case]["downtime_ms"]["median"] / below, 2) if below else None

    pairs = [
        ("helper_2", "plain_return_path"), ("helper_512", "plain_return_path"),
        ("helper_2", "plain"), ("helper_512", "plain"),
        ("helper_2_unix", "plain_return_path_unix"), ("helper_512_unix", "plain_return_path_unix"),
    ]  # fmt: skip
    result["downtime_ratio"] = {f"{case}/{base}": ratio(case, base) for case, base in pairs}
    return result


async def main_async(repeats: int, dbus_repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="qmp-sdei-bench-") as tmp:
        workdir = Path(tmp)
        dbus = [await dbus_cost(n, workdir, dbus_repeats) for n in (1, 8, 64, 512)]
        migrations = await migration_cost(workdir, repeats)
    return {"benchmark": "migration", "dbus": dbus, "migration": migrations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="migrations per case")
    parser.add_argument("--dbus-repeats", type=int, default=20, help="Save/Load calls per size")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args.repeats, args.dbus_repeats)), indent=2))


if __name__ == "__main__":
    main()
