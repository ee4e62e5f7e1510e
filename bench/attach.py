"""Benchmark: how long attaching takes, and what it costs the sidecar in memory.

For 1 and 64 vCPUs (64 needs ``-M virt,gic-version=3``; GICv2 stops at 8) it starts an idle
``-S`` QEMU, then several times: ``attach`` (connect + greeting + negotiation + query-status),
``discover`` (2 + 2 per vCPU queries, pipelined), and the sidecar's RSS before and after. It then
floods the session with STOP/RESUME pairs from the harness monitor and reports RSS again, to show
event memory stays bounded. Prints one JSON document.

    python bench/attach.py [--repeat N] [--flood PAIRS]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

from qemu.qmp import QMPClient

from qmp_sdei.qemu.facts import discover
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
from qmp_sdei.qemu.qmp import VmEventKind, attach


def rss_kib() -> int:
    """Current resident set size of this process (not the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


async def flood(vm: QemuProcess, pairs: int) -> None:
    host = QMPClient("bench-harness")
    await host.connect(str(vm.harness_socket))
    try:
        for n in range(pairs):
            await host.execute("cont")
            await host.execute("stop")
            if n % 100 == 0:
                # The harness client is a plain qemu.qmp client and would itself keep every
                # event (queue + _history); empty it so the RSS figure is the sidecar's.
                host.events.clear()
                host.events._history.clear()
    finally:
        await host.disconnect()


async def measure(smp: int, repeat: int, pairs: int, workdir: Path) -> dict[str, object]:
    options = {"gic-version": "3"} if smp > 8 else {}
    spec = QemuSpec(smp=smp, machine_options=options)
    async with QemuProcess(spec, workdir / f"smp{smp}") as vm:
        attach_ms, discover_ms, rss_delta = [], [], []
        for _ in range(repeat):
            gc.collect()
            before = rss_kib()
            t0 = time.perf_counter()
            session = await attach(vm.sidecar_socket, listen=False, timeout=60.0)
            t1 = time.perf_counter()
            facts = await discover(session)
            t2 = time.perf_counter()
            gc.collect()
            rss_delta.append(rss_kib() - before)
            attach_ms.append((t1 - t0) * 1000)
            discover_ms.append((t2 - t1) * 1000)
            assert len(facts.vcpus) == smp
            await session.close()

        session = await attach(vm.sidecar_socket, listen=False, timeout=60.0)
        gc.collect()
        before_flood = rss_kib()
        t0 = time.perf_counter()
        with session.subscribe({VmEventKind.STOP}) as stops:
            await flood(vm, pairs)
            for _ in range(pairs):
                await stops.get(60.0)
        flood_s = time.perf_counter() - t0
        gc.collect()
        after_flood = rss_kib()
        history = len(session._client.events._history)
        await session.close()

    return {
        "vcpus": smp,
        "machine": ",".join(["virt", *(f"{k}={v}" for k, v in options.items())]),
        "repeat": repeat,
        "attach_ms_median": round(statistics.median(attach_ms), 2),
        "attach_ms_max": round(max(attach_ms), 2),
        "discover_ms_median": round(statistics.median(discover_ms), 2),
        "discover_ms_max": round(max(discover_ms), 2),
        "attach_plus_discover_ms_median": round(
            statistics.median(a + d for a, d in zip(attach_ms, discover_ms, strict=True)), 2
        ),
        "rss_increase_kib_first": rss_delta[0],
        "rss_increase_kib_median": statistics.median(rss_delta),
        "flood_pairs": pairs,
        "flood_seconds": round(flood_s, 2),
        "rss_change_kib_over_flood": after_flood - before_flood,
        "qemu_qmp_history_len_after_flood": history,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--flood", type=int, default=2000, help="STOP/RESUME pairs")
    args = parser.parse_args()
    gc.collect()
    baseline = rss_kib()
    with tempfile.TemporaryDirectory(prefix="qmp-sdei-bench-") as tmp:
        results = [await measure(smp, args.repeat, args.flood, Path(tmp)) for smp in (1, 64)]
    print(json.dumps({"process_rss_kib_at_start": baseline, "results": results}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
