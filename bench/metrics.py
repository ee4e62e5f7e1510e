"""What the Prometheus metrics cost the sidecar. Prints one JSON document.

* per trapped SDEI call: ``observe_sdei_call`` runs inside the conduit's stop, so it adds to the
  guest-visible time of every call (compare with the ~190 us a trapped call costs in all);
* per owner notification counted by the metrics' subscriber;
* per latency sample (the conduit's tapped deques);
* one scrape: rendering the exposition text, and a full HTTP GET on loopback, for a sidecar with
  a 64-event catalogue that has seen every function/result pair.

Usage: python bench/metrics.py [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import urllib.request
from collections.abc import Callable

from qmp_sdei.abi.sdei import Function
from qmp_sdei.conduit.gdbstub import ConduitStats
from qmp_sdei.metrics import MetricsExporter, SidecarMetrics
from qmp_sdei.owner import Notification, NotificationKind
from qmp_sdei.sdei import Completion


def per_call_ns(action: Callable[[int], None], count: int) -> float:
    start = time.perf_counter_ns()
    for i in range(count):
        action(i)
    return (time.perf_counter_ns() - start) / count


def loaded_metrics(events: int) -> SidecarMetrics:
    metrics = SidecarMetrics("bench", version="bench")
    for fid in Function:
        for x0 in (0, 0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFE):
            metrics.observe_sdei_call(fid, x0)
    for number in range(1000, 1000 + events):
        for kind in (NotificationKind.RAISED, NotificationKind.ENTERED, NotificationKind.COMPLETED):
            metrics.observe_notification(Notification(kind, 0, number, {"handler_us": 42.0}))
    stats = ConduitStats()
    metrics.tap_conduit(stats)
    for ns in range(10_000, 1_000_000, 10_000):
        stats.trap_handling_ns.append(ns)
    return metrics


async def scrape_ms(metrics: SidecarMetrics, rounds: int) -> list[float]:
    exporter = MetricsExporter(metrics.render, "127.0.0.1", 0)
    await exporter.start()
    host, port = exporter.address
    url = f"http://{host}:{port}/metrics"

    def get() -> float:
        start = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read()
        return (time.perf_counter() - start) * 1e3

    try:
        return [await asyncio.to_thread(get) for _ in range(rounds)]
    finally:
        await exporter.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    metrics = SidecarMetrics("bench")
    calls = [(int(f), 0) for f in Function]
    sdei_ns = per_call_ns(lambda i: metrics.observe_sdei_call(*calls[i % len(calls)]), 200_000)
    complete_ns = per_call_ns(
        lambda i: metrics.observe_sdei_call(Function.EVENT_COMPLETE, 0, Completion.COMPLETE), 100_000
    )
    notes = [
        Notification(NotificationKind.ENTERED, 0, 1000),
        Notification(NotificationKind.COMPLETED, 0, 1000, {"handler_us": 120.0}),
        Notification(NotificationKind.RAISED, 0, 1000),
    ]
    note_ns = per_call_ns(lambda i: metrics.observe_notification(notes[i % 3]), 200_000)
    stats = ConduitStats()
    metrics.tap_conduit(stats)
    sample_ns = per_call_ns(lambda i: stats.trap_handling_ns.append(150_000 + i), 200_000)

    loaded = loaded_metrics(64)
    renders = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        body = loaded.render()
        renders.append((time.perf_counter() - start) * 1e3)
    http = asyncio.run(scrape_ms(loaded, args.rounds))
    print(
        json.dumps(
            {
                "observe_sdei_call_ns": round(sdei_ns),
                "observe_sdei_call_complete_ns": round(complete_ns),
                "notification_ns": round(note_ns),
                "latency_sample_ns": round(sample_ns),
                "scrape": {
                    "events": 64,
                    "bytes": len(body),
                    "render_ms_median": round(statistics.median(renders), 3),
                    "http_get_ms_median": round(statistics.median(http), 3),
                    "http_get_ms_p95": round(sorted(http)[int(0.95 * len(http)) - 1], 3),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
