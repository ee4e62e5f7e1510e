"""The whole sidecar process: attach time and resident memory, for 1 and 64 vCPUs. Prints JSON.

Runs ``python -m qmp_sdei run`` against a fresh ``qemu-system-aarch64 -M virt -S`` (GICv3 for more
than 8 vCPUs), reads the attach time from the sidecar's own log line (connect + discovery +
negotiation + first state write), and its RSS from /proc once attached and again after the host
has stopped and resumed the VM 1000 times (every gdbstub trap causes such a pair, so memory must
not grow with them).

Usage: python bench/sidecar.py [--repeats N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import statistics
import sys
import tempfile
from pathlib import Path

from qemu.qmp import QMPClient

from qmp_sdei.qemu.launch import QemuProcess, QemuSpec

ATTACHED = re.compile(rb"attached to QEMU .* ([0-9.]+) ms")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def one_run(smp: int, workdir: Path) -> dict[str, float]:
    machine = {"gic-version": "3"} if smp > 8 else {}
    async with QemuProcess(QemuSpec(smp=smp, machine_options=machine), workdir / "vm") as vm:
        config = workdir / "vm.toml"
        config.write_text(f'[vm]\nstate_dir = "{workdir / "state"}"\n[qmp]\nsocket = "{vm.sidecar_socket}"\n')
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qmp_sdei", "run", "--config", str(config), stderr=asyncio.subprocess.PIPE
        )
        assert proc.stderr is not None
        attach_ms = None
        while attach_ms is None:
            line = await asyncio.wait_for(proc.stderr.readline(), 60)
            if not line:
                raise RuntimeError("sidecar exited before attaching")
            if match := ATTACHED.search(line):
                attach_ms = float(match.group(1))
        rss_attached = rss_kib(proc.pid)
        host = QMPClient("bench")
        await host.connect(str(vm.harness_socket))
        for _ in range(1000):
            await host.execute("cont")
            await host.execute("stop")
        host.events._history.clear()  # our own client keeps every event; not the sidecar
        await host.disconnect()
        rss_after = rss_kib(proc.pid)
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    return {"attach_ms": attach_ms, "rss_kib": rss_attached, "rss_after_1000_stop_cont_kib": rss_after}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = []
    for smp in (1, 64):
        runs = []
        for i in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix=f"qmp-sdei-bench-{smp}-{i}-") as tmp:
                runs.append(await one_run(smp, Path(tmp)))
        results.append(
            {
                "vcpus": smp,
                "attach_ms_median": statistics.median(r["attach_ms"] for r in runs),
                "attach_ms_max": max(r["attach_ms"] for r in runs),
                "rss_mib_median": round(statistics.median(r["rss_kib"] for r in runs) / 1024, 1),
                "rss_growth_kib_after_1000_stop_cont": statistics.median(
                    r["rss_after_1000_stop_cont_kib"] - r["rss_kib"] for r in runs
                ),
            }
        )
    print(json.dumps({"benchmark": "sidecar", "results": results}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
