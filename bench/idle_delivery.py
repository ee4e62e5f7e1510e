"""SDEI events to an idle Linux guest (WFI, the kernel's default) through the EL2 stub. Prints JSON.

Boots the Linux event guest (tests/support/linux_guest.py: stock Debian kernel, KASLR on, no
``nohlt``) through the EL2 stub, lets it settle into idle, then raises ``--events`` events with
``--gap`` seconds between them, so each one finds its vCPU halted in a trapped WFI. Reports, in
milliseconds from the raise: handler entered (the dispatcher wrote the handler's registers) and
the handler's COMPLETE answered (the interrupted context resumed), plus the stub's idle counters.

bench/conduit.py runs it too (``--idle-events``).

Usage: python bench/idle_delivery.py [--events 20] [--gap 0.5] [--smp 1] [--cpu cortex-a57]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.linux_guest import booted_linux, prepare_linux_event_guest

TIMEOUT = 60.0


def _summary(samples_ns: list[int]) -> dict[str, float]:
    ms = sorted(s / 1e6 for s in samples_ns)
    return {
        "median_ms": round(statistics.median(ms), 3),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3),
        "max_ms": round(ms[-1], 3),
    }


async def measure(*, events: int, gap: float, smp: int, cpu: str) -> dict[str, Any]:
    """Boot, raise ``events`` events ``gap`` seconds apart into the idle guest; the JSON document."""
    guest = await asyncio.to_thread(prepare_linux_event_guest)
    entered: list[int] = []
    resumed: list[int] = []
    with tempfile.TemporaryDirectory(prefix="qmp-sdei-bench-idle-") as scratch:
        async with booted_linux(guest, Path(scratch), smp=smp, timeout=TIMEOUT, conduit="el2", cpu=cpu) as linux:
            for n in range(events):
                await asyncio.sleep(gap)  # the guest idles: that is what is measured
                d = await linux.raise_event(n % smp, TIMEOUT)
                assert d.entered_ns is not None
                entered.append(d.entered_ns)
                resumed.append(d.resumed_ns)
            stats = linux.sidecar.conduit.stats
            idle = {name: getattr(stats, name, 0) for name in ("idle_kicks", "idle_wakes", "idle_gic_wakes")}
            deferred = stats.deferred_deliveries
    return {
        "bench": "idle_delivery",
        "events": events,
        "gap_s": gap,
        "smp": smp,
        "cpu": cpu,
        "raise_to_handler_entry": _summary(entered),
        "raise_to_resumed": _summary(resumed),
        "deferred_deliveries": deferred,
        **idle,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--gap", type=float, default=0.5, help="seconds of idle before each event")
    parser.add_argument("--smp", type=int, default=1)
    parser.add_argument("--cpu", default="cortex-a57")
    args = parser.parse_args()
    result = await measure(events=args.events, gap=args.gap, smp=args.smp, cpu=args.cpu)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
