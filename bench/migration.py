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

* ``sidecar``: the whole sidecar, with the call-forever test guest (``tests/guests/forever``) and
  migrations started by a third party on QEMU's other monitor, as libvirt would:

  - ``cost``: the same migration of an 8-vCPU VM (the guest at about 10 SDEI calls per second)
    with QEMU's defaults and no sidecar (``plain``), with the sidecar's capabilities (``events``,
    ``pause-before-switchover``, ``return-path``) and no sidecar (the harness answers the pause
    itself), and with a sidecar on each side; each over QEMU's own TCP connection and over one the
    harness connects with ``TCP_NODELAY`` (``_nodelay``: what ``qmp-sdei migrate`` does), all
    interleaved. Each gives QEMU's ``downtime`` and the guest's own (source ``STOP`` to destination
    ``RESUME``, from the events' timestamps). On QEMU's TCP connection the return path adds about
    40 ms (``docs/migration.md``).
  - ``retries``: switchover attempts per completed migration with the guest at about 10, 100 and
    1000 SDEI calls per second. An attempt is cancelled when the VM sat at one of the conduit's
    breakpoints as QEMU began its switchover; each needs a new destination (QEMU 7.2's exits).

* ``fallback``: the same 8-vCPU migration as ``cost`` (guest at about 10 calls per second, third
  party on QEMU's other monitor), interleaved: no sidecar; sidecars carrying the state in band
  (``dbus-vmstate``); sidecars carrying it over the control API (``migration.transport =
  "control"``), with the destination's local socket as the peer and, when ``mosquitto`` is
  installed, through a private broker (peer ``mqtt``). Besides the times, the source sidecar's own
  measure of the hand-over (snapshot, send, the destination's validation and adoption, the reply).
  Over a connection the harness makes with ``TCP_NODELAY``, as ``qmp-sdei migrate`` does.

Usage: python bench/migration.py [--repeats N] [--dbus-repeats N] [--sidecar-repeats N] [--migrations N]
       [--only dbus,migration,sidecar,fallback]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from dispatcher import EVENTS, busy_dispatcher, mpidrs  # a sibling script, not a package

from qmp_sdei.config import parse
from qmp_sdei.daemon import Sidecar
from support.guests import GUEST_DIR, build_guest_dir  # the test guests' builder (cached)
from support.mosquitto import running_mosquitto

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


# -- the whole sidecar ----------------------------------------------------------------------------------

FOREVER_NAME = "bench-migration"


def forever_spec(elf: Path, smp: int, period_us: int, *extra: str) -> QemuSpec:
    loader = f"loader,addr=0x4ff00000,data={period_us},data-len=4"  # the guest's call period
    return QemuSpec(smp=smp, kernel=elf, paused=True, name=FOREVER_NAME, extra_args=("-device", loader, *extra))


def sidecar_config(
    vm: QemuProcess, state_dir: Path, elf: Path, migration_table: dict[str, Any] | None = None
) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if migration_table:
        table = dict(migration_table)
        if "mqtt" in table:
            extra["mqtt"] = {"url": table.pop("mqtt")}
        extra["migration"] = table
    return extra | {
        "vm": {"name": FOREVER_NAME, "state_dir": str(state_dir)},
        "qmp": {"socket": str(vm.sidecar_socket), "mode": "connect", "timeout": TIMEOUT},
        "sdei": {"version": "1.1", "events": [{"number": 1000}, {"number": 1001}]},
        "psci": {"version": "1.0"},
        "conduit": {"enabled": True, "elf": str(elf), "start_vm": True},
        "log": {"level": "error", "format": "text"},
    }


class Side:
    """One QEMU of a pair, its harness monitor and, optionally, its sidecar; all stopped by close()."""

    def __init__(self, workdir: Path, spec: QemuSpec, migration_table: dict[str, Any] | None = None) -> None:
        self.vm = QemuProcess(spec, workdir / "qemu")
        self.migration_table = migration_table
        self.state_dir = workdir / "state"
        self.workdir = workdir
        self.harness: Any = None
        self.sidecar: Sidecar | None = None
        self.task: asyncio.Task[Any] | None = None

    async def start(self, elf: Path | None) -> Side:
        await asyncio.wait_for(self.vm.start(), TIMEOUT)
        self.harness = await self.vm.connect_harness(TIMEOUT, f"bench-{self.workdir.name}")
        if elf is not None:
            self.sidecar = Sidecar(parse(sidecar_config(self.vm, self.state_dir, elf, self.migration_table)))
            self.task = asyncio.create_task(self.sidecar.run())
            await asyncio.wait_for(self.sidecar.ready.wait(), TIMEOUT)
            assert self.sidecar.migration is not None
            await asyncio.wait_for(self.sidecar.migration.ready.wait(), TIMEOUT)
        return self

    async def close(self) -> None:
        self.vm.kill()
        if self.sidecar is not None and self.task is not None:
            self.sidecar.request_shutdown("bench over")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, TIMEOUT)
        if self.harness is not None:
            with contextlib.suppress(Exception):
                await self.harness.disconnect()
        await self.vm.stop()


def event_time(event: Any) -> float:
    """A QMP event's own timestamp (QEMU's host clock, so comparable between two QEMUs here)."""
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


async def harness_migration(
    src: Side, dst: Side, uri: str, *, answer_pause: bool, nodelay: bool = False
) -> tuple[str, float | None]:
    """``migrate`` on the source's harness monitor; the final status and the downtime the guest saw.

    ``answer_pause``: no sidecar drives the pause, so the harness continues at once (what the sidecar
    does when it is safe). The guest's downtime runs from the source's last ``STOP`` (the switchover's)
    to the destination's first ``RESUME``, from the events' own timestamps. QEMU's ``downtime`` cannot
    tell it: it ends when the source is done, which without a return path is before the destination
    has the whole stream, and it never covers what happens on the destination between ``completed``
    and running the guest. Without a sidecar the harness resumes the destination at its ``completed``,
    as libvirt resumes a destination started paused. ``nodelay``: the harness connects to the
    destination with ``TCP_NODELAY`` and hands QEMU the socket, as the sidecar's own ``migrate``
    does (``qmp_sdei.qemu.migration.migrate``).
    """
    with (
        src.harness.listener(("MIGRATION", "STOP")) as listener,
        dst.harness.listener(("MIGRATION", "RESUME")) as arrivals,
    ):
        target = migration.plain_tcp_target(uri) if nodelay else None
        if target is not None:
            sock = await migration.connect_nodelay(*target, TIMEOUT)
            try:
                src.harness.send_fd_scm(sock.fileno())
                await src.harness.execute("getfd", {"fdname": "bench-migration"})
            finally:
                sock.close()
            uri = "fd:bench-migration"
        await src.harness.execute("migrate", {"uri": uri})

        async def follow() -> tuple[str, float | None]:
            last_stop: float | None = None
            async for event in listener:
                if event["event"] == "STOP":
                    last_stop = event_time(event)
                    continue
                status = str(event["data"]["status"])
                if status == "pre-switchover" and answer_pause:
                    await src.harness.execute("migrate-continue", {"state": "pre-switchover"})
                if status in migration.FINAL_STATUSES:
                    return status, last_stop
            raise RuntimeError("the harness monitor closed")

        async def resumed() -> float:
            async for event in arrivals:
                if event["event"] == "RESUME":
                    return event_time(event)
                if event["data"]["status"] == "completed" and dst.sidecar is None:
                    await dst.harness.execute("cont")
            raise RuntimeError("the destination's harness monitor closed")

        arrival = asyncio.create_task(resumed())
        try:
            status, stopped = await asyncio.wait_for(follow(), TIMEOUT * 2)
            if status != "completed" or stopped is None:
                return status, None
            return status, round((await asyncio.wait_for(arrival, TIMEOUT) - stopped) * 1000, 1)
        finally:
            arrival.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await arrival


async def settled_times(src: Side) -> tuple[float, float]:
    """``total-time`` and ``downtime`` once QEMU has filled them in (see completed_info)."""
    deadline = time.monotonic() + 2.0
    while True:
        info = await src.harness.execute("query-migrate")
        if info.get("total-time") or time.monotonic() > deadline:
            return float(info.get("total-time", 0)), float(info.get("downtime", 0))
        await asyncio.sleep(0.002)  # QEMU gives no signal for "times computed"


async def migrate_with_retries(
    workdir: Path,
    elf: Path,
    *,
    smp: int,
    period_us: int,
    with_sidecar: bool,
    plain: bool = False,
    nodelay: bool = False,
    transport: dict[str, Any] | None = None,
) -> dict[str, float]:
    """One source, fresh destinations until a migration completes; its times and the attempts.

    ``plain`` (without a sidecar): QEMU's defaults, no ``pause-before-switchover`` and no return path.

    ``transport``: the sidecars' ``[migration]`` table (plus ``mqtt``: a broker URL for both); with
    the control transport the source's peer is each new destination's local socket unless it is
    ``mqtt``.
    """
    sides: list[Side] = []
    src_table = dict(transport) if transport else None
    dst_table = {k: v for k, v in transport.items() if k != "peer"} if transport else None
    try:
        src = Side(workdir / "src", forever_spec(elf, smp, period_us), src_table)
        sides.append(src)
        await src.start(elf if with_sidecar else None)
        if not with_sidecar:
            caps = {"events": True, "pause-before-switchover": not plain, "return-path": not plain}
            await src.harness.execute(
                "migrate-set-capabilities", {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]}
            )
            await src.harness.execute("cont")
        await src.vm.wait_for_console(r"READY version=", TIMEOUT)
        attempts = 0
        while True:
            attempts += 1
            if attempts > 200:
                raise RuntimeError("200 switchovers in a row were cancelled")
            port = free_port()
            dst = Side(
                workdir / f"dst{attempts}",
                forever_spec(elf, smp, period_us, "-incoming", f"tcp:127.0.0.1:{port}"),
                dst_table,
            )
            sides.append(dst)
            await dst.start(elf if with_sidecar else None)
            if src_table is not None and src_table.get("peer") != "mqtt" and src.sidecar is not None:
                # The destination changes with each attempt: name its control socket as the peer.
                src.sidecar.migration.use_peer(f"unix:{dst.state_dir / 'control.sock'}")  # type: ignore[union-attr]
            if not with_sidecar:
                caps = {"events": True, "return-path": not plain}
                await dst.harness.execute(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
                )
            uri = f"tcp:127.0.0.1:{port}"
            outcome, guest_downtime = await harness_migration(
                src, dst, uri, answer_pause=not with_sidecar, nodelay=nodelay
            )
            if outcome == "completed":
                total, downtime = await settled_times(src)
                times = {"total_ms": total, "downtime_ms": downtime, "attempts": float(attempts)}
                if guest_downtime is not None:
                    times["guest_downtime_ms"] = guest_downtime
                if src.sidecar is not None and src.sidecar.migration is not None:
                    handover = src.sidecar.migration.last_state_ms
                    if handover is not None and src.sidecar.migration.counters.states_sent:
                        times["handover_ms"] = handover
                return times
            await dst.close()
    finally:
        for side in sides:
            await side.close()


async def sidecar_cost(workdir: Path, elf: Path, repeats: int, smp: int = 8) -> dict[str, Any]:
    """One 8-vCPU migration three ways, interleaved: QEMU's defaults without a sidecar (``plain``),
    the sidecar's capabilities without a sidecar (``without_sidecar``: the harness answers the
    pause), and a sidecar on each side; each over QEMU's own TCP connection and over one connected
    with ``TCP_NODELAY`` (``_nodelay``, what ``qmp-sdei migrate`` uses)."""
    cases: dict[str, dict[str, Any]] = {}
    for suffix, nodelay in (("", False), ("_nodelay", True)):
        cases[f"plain{suffix}"] = {"with_sidecar": False, "plain": True, "nodelay": nodelay}
        cases[f"without_sidecar{suffix}"] = {"with_sidecar": False, "nodelay": nodelay}
        cases[f"with_sidecar{suffix}"] = {"with_sidecar": True, "nodelay": nodelay}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for repetition in range(repeats):
        for name, kwargs in cases.items():  # interleaved, so load changes hit every case alike
            runs[name].append(
                await migrate_with_retries(
                    workdir / f"cost-{name}-{repetition}", elf, smp=smp, period_us=100_000, **kwargs
                )
            )
    result: dict[str, Any] = {"vcpus": smp, "guest_calls_per_s": 10, "repeats": repeats}
    keys = ("total_ms", "downtime_ms", "guest_downtime_ms", "attempts")
    for name, samples in runs.items():
        result[name] = {key: spread([s[key] for s in samples if key in s]) for key in keys}
    ratios: dict[str, float | None] = {}
    for suffix in ("", "_nodelay"):
        for key in keys[:3]:
            for base in ("without_sidecar", "plain"):
                base_median = result[base + suffix][key]["median"]
                with_median = result["with_sidecar" + suffix][key]["median"]
                label = f"with_sidecar{suffix}/{base}{suffix}:{key.removesuffix('_ms')}"
                ratios[label] = round(with_median / base_median, 2) if base_median else None
    result["ratios"] = ratios
    return result


async def fallback_cost(workdir: Path, elf: Path, repeats: int, smp: int = 8, nodelay: bool = True) -> dict[str, Any]:
    """Downtime without a sidecar, with the in-band path, and with the control transport; by
    default over a connection with ``TCP_NODELAY``, as ``qmp-sdei migrate`` makes it."""
    cases: dict[str, dict[str, Any] | None] = {
        "without_sidecar": None,
        "dbus_vmstate": {"transport": "dbus-vmstate"},
        "control_unix": {"transport": "control", "peer": "unix:/placeholder"},  # replaced per destination
    }
    with contextlib.ExitStack() as stack:
        if shutil.which("mosquitto"):
            broker = stack.enter_context(running_mosquitto(workdir / "broker"))
            cases["control_mqtt"] = {"transport": "control", "peer": "mqtt", "mqtt": broker.url}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
        for repetition in range(repeats):
            for name, table in cases.items():  # interleaved, so load changes hit every case alike
                runs[name].append(
                    await migrate_with_retries(
                        workdir / f"fallback-{name}-{repetition}", elf, smp=smp, period_us=100_000,
                        with_sidecar=table is not None, transport=table, nodelay=nodelay,
                    )
                )  # fmt: skip
    result: dict[str, Any] = {"vcpus": smp, "guest_calls_per_s": 10, "repeats": repeats, "nodelay": nodelay}
    for name, samples in runs.items():
        keys = ["total_ms", "downtime_ms", "guest_downtime_ms", "attempts"]
        keys += ["handover_ms"] if name.startswith("control") else []
        result[name] = {key: spread([s[key] for s in samples if key in s]) for key in keys}
    base = result["without_sidecar"]["downtime_ms"]["median"]
    result["downtime_ratio"] = {
        name: round(result[name]["downtime_ms"]["median"] / base, 2) if base else None
        for name in cases
        if name != "without_sidecar"
    }
    return result


async def retry_rounds(workdir: Path, elf: Path, migrations: int) -> list[dict[str, Any]]:
    rows = []
    for rate in (10, 100, 1000):
        samples = [
            await migrate_with_retries(
                workdir / f"rate{rate}-{i}", elf, smp=1, period_us=1_000_000 // rate, with_sidecar=True
            )
            for i in range(migrations)
        ]
        attempts = [int(s["attempts"]) for s in samples]
        rows.append(
            {
                "guest_calls_per_s": rate,
                "migrations": migrations,
                "attempts": attempts,
                "cancelled_per_migration": round((sum(attempts) - migrations) / migrations, 2),
                "downtime_ms": spread([s["downtime_ms"] for s in samples]),
            }
        )
    return rows


async def main_async(
    repeats: int, dbus_repeats: int, sidecar_repeats: int, migrations: int, only: set[str]
) -> dict[str, Any]:
    result: dict[str, Any] = {"benchmark": "migration"}
    with tempfile.TemporaryDirectory(prefix="qmp-sdei-bench-") as tmp:
        workdir = Path(tmp)
        if "dbus" in only:
            result["dbus"] = [await dbus_cost(n, workdir, dbus_repeats) for n in (1, 8, 64, 512)]
        if "migration" in only:
            result["migration"] = await migration_cost(workdir, repeats)
        if "sidecar" in only:
            elf = build_guest_dir(GUEST_DIR.parent / "forever", workdir / "guest")
            result["sidecar"] = {
                "cost": await sidecar_cost(workdir, elf, sidecar_repeats),
                "retries": await retry_rounds(workdir, elf, migrations),
            }
        if "fallback" in only:
            elf = build_guest_dir(GUEST_DIR.parent / "forever", workdir / "guest")
            result["fallback"] = await fallback_cost(workdir, elf, sidecar_repeats)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="migrations per case")
    parser.add_argument("--dbus-repeats", type=int, default=20, help="Save/Load calls per size")
    parser.add_argument("--sidecar-repeats", type=int, default=5, help="migrations with and without the sidecar")
    parser.add_argument("--migrations", type=int, default=5, help="completed migrations per guest call rate")
    parser.add_argument("--only", default="dbus,migration,sidecar,fallback", help="comma-separated parts to run")
    args = parser.parse_args()
    only = set(args.only.split(","))
    result = asyncio.run(main_async(args.repeats, args.dbus_repeats, args.sidecar_repeats, args.migrations, only))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
