"""Benchmark: the control API. Prints one JSON document.

The whole sidecar runs in-process beside QEMU with the bare-metal loop guest (``tests/guests/loop``,
1 vCPU): the guest registers private events 1000 and 1001, unmasks and spins. Then, over the local
unix socket (newline-delimited JSON, one client):

* **request -> reply** for ``catalogue`` (served from memory at a safe point) and ``status`` (the
  whole status document), sequentially: what a query costs an orchestrator on the same host;
* **raise -> handler entry**: sequential ``raise`` of event 1000, each after the previous handler's
  ``completed`` notification (a ``watch`` on a second connection); the reply comes once the owner
  has entered the handler (``latency_us`` in the reply, measured inside the sidecar) and the
  client's own request -> reply time (adds the socket and JSON);
* **sustained raises/s**: open-loop raises at increasing offered rates (a burst of requests on
  parallel connections spread evenly over the interval); per rate the median request -> reply time
  and how many were delivered at once versus left pending behind a running handler. The knee is the
  first rate whose median is more than twice the lowest rate's.

With ``--mqtt`` (needs ``mosquitto``), the same request -> reply over MQTT v5 through a private
broker on loopback is added when ``bench/control_mqtt.py`` is present.

    python bench/control.py [--queries N] [--raises N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qmp_sdei.config import parse
from qmp_sdei.control.local import LocalControlClient, socket_path
from qmp_sdei.daemon import Sidecar
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
from conduit import build_loop_guest, summary_us  # noqa: E402

TIMEOUT = 120.0
RATES = (10, 20, 50, 100, 200, 500)  # offered raises per second
PER_RATE = 10  # the loop guest takes 100 events before it powers off


def sidecar_config(vm: QemuProcess, elf: Path, state_dir: Path) -> dict[str, Any]:
    return {
        "vm": {"name": "bench-control", "state_dir": str(state_dir)},
        "qmp": {"socket": str(vm.sidecar_socket), "mode": "connect", "timeout": TIMEOUT},
        "sdei": {"version": "1.1", "events": [{"number": 1000}, {"number": 1001}]},
        "psci": {"version": "1.1"},
        "conduit": {"enabled": True, "elf": str(elf), "start_vm": True},
        "log": {"level": "warning", "format": "text"},
    }


async def timed_requests(client: LocalControlClient, request: dict[str, Any], count: int) -> list[int]:
    samples = []
    for _ in range(count):
        t0 = time.perf_counter_ns()
        reply = await client.request(request, timeout=TIMEOUT)
        samples.append(time.perf_counter_ns() - t0)
        if not reply["ok"]:
            raise RuntimeError(f"{request['command']} failed: {reply}")
    return samples


async def sequential_raises(client: LocalControlClient, sock: Path, count: int) -> dict[str, Any]:
    """Raise, then wait for the guest's COMPLETE (a notification) before the next raise."""
    client_ns, inside_us, results = [], [], []
    async with LocalControlClient(sock, timeout=TIMEOUT) as watcher:
        await watcher.start_watch()
        notes = watcher.notifications()
        for _ in range(count):
            t0 = time.perf_counter_ns()
            reply = await client.request({"v": 1, "command": "raise", "event": 1000, "vcpu": 0}, timeout=TIMEOUT)
            client_ns.append(time.perf_counter_ns() - t0)
            result = reply["result"]
            results.append(result["result"] if result["result"] == "delivered" else result.get("code"))
            if result.get("latency_us") is not None:
                inside_us.append(result["latency_us"])
            while (await asyncio.wait_for(anext(notes), TIMEOUT))["kind"] != "completed":
                pass
    return {
        "request_to_reply": summary_us(client_ns),
        "raise_to_entry_inside_sidecar_us": round(statistics.median(inside_us), 1) if inside_us else None,
        "outcomes": {r: results.count(r) for r in sorted(set(results))},
    }


async def offered_rate(sock: Path, rate: int, count: int) -> dict[str, Any]:
    """``count`` raises at ``rate``/s, each on its own connection, not waiting for earlier replies."""
    clients = [LocalControlClient(sock, timeout=TIMEOUT) for _ in range(count)]
    for c in clients:
        await c.__aenter__()
    try:

        async def one(i: int, client: LocalControlClient) -> tuple[int, str]:
            await asyncio.sleep(i / rate)  # the offered schedule, not synchronisation
            t0 = time.perf_counter_ns()
            reply = await client.request({"v": 1, "command": "raise", "event": 1000, "vcpu": 0}, timeout=TIMEOUT)
            result = reply["result"]
            return time.perf_counter_ns() - t0, result["result"] if result["result"] == "delivered" else result["code"]

        started = time.perf_counter()
        done = await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))
        elapsed = time.perf_counter() - started
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)
    outcomes = [o for _, o in done]
    return {
        "offered_per_s": rate,
        "achieved_per_s": round(count / elapsed, 1),
        "request_to_reply": summary_us([ns for ns, _ in done]),
        "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
    }


async def bench_local(workdir: Path, queries: int, raises: int) -> dict[str, Any]:
    elf = build_loop_guest(workdir / "guest")
    spec = QemuSpec(smp=1, kernel=elf, paused=True, name="bench-control")
    async with QemuProcess(spec, workdir / "vm") as vm:
        sidecar = Sidecar(parse(sidecar_config(vm, elf, workdir / "state")))
        task = asyncio.create_task(sidecar.run(), name="bench.sidecar")
        try:
            await asyncio.wait_for(sidecar.ready.wait(), TIMEOUT)
            await vm.wait_for_console(r"WAIT events\r?\n", TIMEOUT)
            sock = socket_path(workdir / "state")
            async with LocalControlClient(sock, timeout=TIMEOUT) as client:
                catalogue = await timed_requests(client, {"v": 1, "command": "catalogue"}, queries)
                status = await timed_requests(client, {"v": 1, "command": "status"}, queries)
                sequential = await sequential_raises(client, sock, raises)
            sweep = [await offered_rate(sock, rate, PER_RATE) for rate in RATES]
        finally:
            sidecar.request_shutdown("benchmark done")
            await asyncio.wait_for(task, TIMEOUT)
    base = sweep[0]["request_to_reply"]["median_us"]
    knee = next((s["offered_per_s"] for s in sweep if s["request_to_reply"]["median_us"] > 2 * base), None)
    return {
        "catalogue": summary_us(catalogue),
        "status": summary_us(status),
        "raise": sequential,
        "sustained": {"rates": sweep, "median_doubles_at_per_s": knee, "raises_per_rate": PER_RATE},
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-control-") as tmp:
        result: dict[str, Any] = {"local_socket": await bench_local(Path(tmp), args.queries, args.raises)}
        if args.mqtt:
            try:
                from control_mqtt import bench_mqtt  # type: ignore[import-not-found]  # noqa: PLC0415
            except ImportError:
                result["mqtt"] = {"skipped": "bench/control_mqtt.py is not present"}
            else:
                result["mqtt"] = await bench_mqtt(Path(tmp) / "mqtt", queries=args.queries)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=300, help="sequential catalogue and status requests")
    parser.add_argument("--raises", type=int, default=30, help="sequential raises (the guest takes 100 in all)")
    parser.add_argument("--mqtt", action="store_true", help="also measure over MQTT (bench/control_mqtt.py)")
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
