"""Dispatcher throughput and snapshot cost. Prints one JSON document.

* hypercalls per second for a mix a Linux guest produces (status, context, get_info, enable/disable,
  register/unregister, signal, complete) on a 4-vCPU VM, with handlers entered along the way;
* snapshot and restore time and size for 8, 64 and 512 vCPUs, each vCPU with registered events and
  a nested (normal + critical) dispatch in progress: the worst case the state file and a migration
  carry. Measured for the format ``snapshot()`` writes and, beside it, for format version 1 (still
  read), so one run shows what the current format gained.

Usage: python bench/dispatcher.py [--seconds N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from qmp_sdei.abi.sdei import Function as F
from qmp_sdei.sdei import Dispatcher, EventSpec, VcpuRegs
from qmp_sdei.sdei.snapshot import FORMAT_VERSION, encode_v1

EVENTS = [EventSpec(1000), EventSpec(1001, critical=True), EventSpec(2000, shared=True)]


def mpidrs(n: int) -> list[int]:
    return [((i // 16) << 8) | (i % 16) for i in range(n)]


def call(d: Dispatcher, vcpu: int, regs: VcpuRegs, fid: int, *args: int) -> int:
    regs.x[0] = fid
    regs.x[1 : 1 + len(args)] = args
    d.hypercall(vcpu, regs)
    return regs.x[0]


def hypercall_rate(seconds: float) -> dict[str, float]:
    d = Dispatcher(events=EVENTS, mpidrs=mpidrs(4), bind_slots=(3, 3))
    regs = [VcpuRegs() for _ in range(4)]
    for v in range(4):
        call(d, v, regs[v], F.EVENT_REGISTER, 0, 0x4000_1000, 0, 0, 0)
        call(d, v, regs[v], F.EVENT_ENABLE, 0)
        call(d, v, regs[v], F.PE_UNMASK)
    mix = [
        (F.EVENT_STATUS, 0), (F.EVENT_GET_INFO, 1000, 2), (F.EVENT_REGISTER, 1000, 0x4000_2000, 1, 0, 0),
        (F.EVENT_ENABLE, 1000), (F.EVENT_DISABLE, 1000), (F.EVENT_UNREGISTER, 1000), (F.VERSION,),
        (F.PE_MASK,), (F.PE_UNMASK,), (F.FEATURES, 0),
    ]  # fmt: skip
    calls = 0
    deliveries = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for v in range(4):
            r = regs[v]
            for fid, *args in mix:
                call(d, v, r, fid, *args)
            call(d, v, r, F.EVENT_SIGNAL, 0, v)  # event 0 to itself
            calls += len(mix) + 1
            if d.deliver(v, r):
                deliveries += 1
                for i in range(4):
                    call(d, v, r, F.EVENT_CONTEXT, i)
                call(d, v, r, F.EVENT_COMPLETE, 0)
                calls += 5
    elapsed = time.perf_counter() - start
    return {"hypercalls_per_second": round(calls / elapsed), "deliveries_per_second": round(deliveries / elapsed)}


def busy_dispatcher(n: int) -> Dispatcher:
    d = Dispatcher(events=EVENTS, mpidrs=mpidrs(n), bind_slots=(3, 3))
    regs = VcpuRegs()
    for v in range(n):
        for event in (0, 1000, 1001):
            call(d, v, regs, F.EVENT_REGISTER, event, 0x4000_1000 + event, v, 0, 0)
            call(d, v, regs, F.EVENT_ENABLE, event)
        call(d, v, regs, F.PE_UNMASK)
        ctx = VcpuRegs(
            x=[(v << 32) | (i * 0x1111_1111) for i in range(31)], pc=0xFFFF_8000_0801_0000 + v, pstate=0x6000_0005
        )
        d.trigger(1000, v)
        d.deliver(v, ctx)
        d.trigger(1001, v)
        d.deliver(v, ctx)
    return d


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


def snapshot_cost(n: int, repeats: int = 20) -> dict[str, float]:
    d = busy_dispatcher(n)
    target = Dispatcher(events=EVENTS, mpidrs=mpidrs(n), bind_slots=(3, 3))
    result: dict[str, float] = {"vcpus": n}
    for label, encode in (("", Dispatcher.snapshot), ("v1_", encode_v1)):
        save, load = [], []
        blob = b""
        for _ in range(repeats):
            t0 = time.perf_counter()
            blob = encode(d)
            t1 = time.perf_counter()
            target.restore(blob)
            t2 = time.perf_counter()
            save.append(t1 - t0)
            load.append(t2 - t1)
            assert target == d
            target.reset()
        result |= {
            f"{label}bytes": len(blob),
            f"{label}snapshot_ms_median": _median_ms(save),
            f"{label}snapshot_ms_max": round(max(save) * 1e3, 3),
            f"{label}restore_ms_median": _median_ms(load),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="how long to run the hypercall mix")
    args = parser.parse_args()
    result = {
        "benchmark": "dispatcher",
        "hypercall_mix": hypercall_rate(args.seconds),
        "snapshot_format_version": FORMAT_VERSION,
        "snapshot": [snapshot_cost(n) for n in (8, 64, 512)],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
