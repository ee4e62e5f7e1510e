"""SDEI events to an idle Linux guest (WFI, the kernel's default) through the EL2 stub. Prints JSON.

Boots the Linux event guest (tests/support/linux_guest.py: stock Debian kernel, KASLR on, no
``nohlt``) through the EL2 stub, lets it settle into idle, then raises ``--events`` events with
``--gap`` seconds between them, so each one finds its vCPU halted in a trapped WFI. Reports, in
milliseconds from the raise: handler entered (the dispatcher wrote the handler's registers) and
the handler's COMPLETE answered (the interrupted context resumed), plus the stub's idle counters.

bench/conduit.py runs it too (``--idle-events``).

``--ab R``: the three ways of reaching an idle vCPU, same code, same run, R boots each (their
order rotating), the events' medians per way:

* ``poll``: kick it, wait until it notices at the stub's next poll (1 ms), enter the handler at
  its stop at the wake site (the way before the GIC wake-up);
* ``gic_wake``: the same, but the kick also wakes it through its GICv3 redistributor;
* ``enter``: enter the handler from the stop that found it halted, and wake it through the GIC
  (the conduit's default).

Usage: python bench/idle_delivery.py [--events 20] [--gap 0.5] [--smp 1] [--cpu cortex-a57] [--ab R]
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

from qmp_sdei.conduit.el2 import El2Conduit
from support.linux_guest import booted_linux, prepare_linux_event_guest

TIMEOUT = 60.0
WAYS = {"poll": (False, False), "gic_wake": (False, True), "enter": (True, True)}  # (enter_from_idle, GIC)


def _summary(samples_ns: list[int]) -> dict[str, float]:
    ms = sorted(s / 1e6 for s in samples_ns)
    return {
        "median_ms": round(statistics.median(ms), 3),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3),
        "max_ms": round(ms[-1], 3),
    }


IDLE_COUNTERS = ("idle_kicks", "idle_wakes", "idle_gic_wakes", "idle_entries")


async def _one_boot(
    guest: Any, *, events: int, gap: float, smp: int, cpu: str
) -> tuple[list[int], list[int], dict[str, int], int]:
    """One boot: (raise -> entered, raise -> resumed, the conduit's idle counters, deferrals)."""
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
            idle = {name: getattr(stats, name, 0) for name in IDLE_COUNTERS}
            return entered, resumed, idle, stats.deferred_deliveries


async def measure(*, events: int, gap: float, smp: int, cpu: str) -> dict[str, Any]:
    """Boot, raise ``events`` events ``gap`` seconds apart into the idle guest; the JSON document."""
    guest = await asyncio.to_thread(prepare_linux_event_guest)
    entered, resumed, idle, deferred = await _one_boot(guest, events=events, gap=gap, smp=smp, cpu=cpu)
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


async def measure_ways(*, events: int, gap: float, smp: int, cpu: str, reps: int) -> dict[str, Any]:
    """:data:`WAYS` side by side (``--ab``): ``reps`` boots each, the order rotating every round."""
    guest = await asyncio.to_thread(prepare_linux_event_guest)
    original_start = El2Conduit.start
    names = list(WAYS)
    samples: dict[str, dict[str, Any]] = {
        name: {"entered": [], "resumed": [], "counters": dict.fromkeys(IDLE_COUNTERS, 0)} for name in names
    }
    try:
        for rep in range(reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                enter, gic = WAYS[name]

                async def start(self: El2Conduit, enter: bool = enter, gic: bool = gic) -> None:
                    await original_start(self)
                    self.enter_from_idle, self.wake_through_gic = enter, gic

                El2Conduit.start = start  # type: ignore[method-assign]
                entered, resumed, idle, _ = await _one_boot(guest, events=events, gap=gap, smp=smp, cpu=cpu)
                got = samples[name]
                got["entered"] += entered
                got["resumed"] += resumed
                for counter, value in idle.items():
                    got["counters"][counter] += value
    finally:
        El2Conduit.start = original_start  # type: ignore[method-assign]
    return {
        "bench": "idle_delivery_ab",
        "events_per_boot": events,
        "boots_per_way": reps,
        "gap_s": gap,
        "smp": smp,
        "cpu": cpu,
        **{
            name: {
                "raise_to_handler_entry": _summary(got["entered"]),
                "raise_to_resumed": _summary(got["resumed"]),
                **got["counters"],
            }
            for name, got in samples.items()
        },
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--gap", type=float, default=0.5, help="seconds of idle before each event")
    parser.add_argument("--smp", type=int, default=1)
    parser.add_argument("--cpu", default="cortex-a57")
    parser.add_argument("--ab", type=int, default=0, metavar="R", help="compare the ways in, R boots each")
    args = parser.parse_args()
    if args.ab > 0:
        result = await measure_ways(events=args.events, gap=args.gap, smp=args.smp, cpu=args.cpu, reps=args.ab)
    else:
        result = await measure(events=args.events, gap=args.gap, smp=args.smp, cpu=args.cpu)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
