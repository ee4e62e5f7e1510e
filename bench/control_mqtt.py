"""The MQTT control transport's speed: request-to-reply latency and sustained raise rate. Prints JSON.

A real mosquitto is started on a free loopback port (or ``--url`` names a broker), a sidecar's MQTT
bridge serves a control service over a real SdeiOwner and Dispatcher, and a stand-in guest takes
every deliverable event at once (no QEMU: this measures the transport and the command layer).

* latency: ``status`` and ``raise`` requests one after the other through :class:`MqttControlClient`,
  median / p90 / p99 in microseconds, next to the same requests given to the service directly;
* sustained raises: open-loop load at doubling rates, each for ``--step-seconds``; the highest rate
  whose median latency stays within twice the unloaded median (and with every request answered).

Usage: python bench/control_mqtt.py [--requests N] [--url mqtt://host:port]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the broker fixture and the guest stand-in live with the tests

from qmp_sdei.config import MqttSettings, parse_mqtt_url  # noqa: E402
from qmp_sdei.control.commands import ControlService, encode  # noqa: E402
from qmp_sdei.control.mqtt import MqttBridge, MqttControlClient  # noqa: E402
from qmp_sdei.errors import ControlError  # noqa: E402
from support.mosquitto import running_mosquitto  # noqa: E402
from support.sdei import PRIVATE  # noqa: E402
from support.standin import control_service  # noqa: E402

VCPUS = 4


def summary(samples_ns: list[int]) -> dict[str, float]:
    us = sorted(s / 1e3 for s in samples_ns)
    q = statistics.quantiles(us, n=100) if len(us) > 1 else us * 99
    return {"n": len(us), "median_us": round(statistics.median(us), 1), "p90_us": round(q[89], 1),
            "p99_us": round(q[98], 1)}  # fmt: skip


def raise_doc(i: int) -> dict[str, Any]:
    return {"v": 1, "command": "raise", "event": PRIVATE, "vcpu": i % VCPUS, "wait": 5}


async def sequential(client: MqttControlClient, docs: list[dict[str, Any]]) -> list[int]:
    samples = []
    for doc in docs:
        start = time.perf_counter_ns()
        reply = await client.request(doc)
        samples.append(time.perf_counter_ns() - start)
        assert reply["ok"], reply
    return samples


async def direct(service: ControlService, docs: list[dict[str, Any]]) -> list[int]:
    samples = []
    for doc in docs:
        payload = encode(doc)
        start = time.perf_counter_ns()
        reply = await service.handle(payload)
        samples.append(time.perf_counter_ns() - start)
        assert reply["ok"], reply
    return samples


async def open_loop(client: MqttControlClient, rate: float, seconds: float) -> dict[str, Any]:
    """Send raises at ``rate``/s for ``seconds`` without waiting for replies; latency of each."""
    samples: list[int] = []
    failures = 0

    async def one(i: int) -> None:
        nonlocal failures
        start = time.perf_counter_ns()
        try:
            reply = await client.request(raise_doc(i), timeout=10)
        except ControlError:
            failures += 1
            return
        if reply["ok"]:
            samples.append(time.perf_counter_ns() - start)
        else:
            failures += 1

    count = int(rate * seconds)
    tasks = []
    began = time.perf_counter()
    for i in range(count):
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the load generator
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    result: dict[str, Any] = {"rate_per_s": rate, "sent": count, "failed": failures}
    if samples:
        result.update(summary(samples))
    return result


async def bench_mqtt(
    url: str | None = None, *, requests: int = 300, step_seconds: float = 2.0, max_rate: float = 25600
) -> dict[str, Any]:
    """Run the benchmark (starting a mosquitto unless ``url`` is given) and return the results."""
    with contextlib.ExitStack() as stack:
        if url is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qmp-sdei-bench-mqtt-")))
            url = stack.enter_context(running_mosquitto(tmp)).url
        host, port, tls = parse_mqtt_url(url)
        service, _guest = control_service("bench", vcpus=VCPUS)
        bridge = MqttBridge(service, MqttSettings(host=host, port=port, tls=tls), vm_name="bench",
                            status=service._status)  # fmt: skip
        ready = asyncio.Event()
        task = asyncio.create_task(bridge.run(ready))
        try:
            await asyncio.wait_for(ready.wait(), 30)
            async with MqttControlClient(url, "bench") as client:
                status_docs = [{"v": 1, "command": "status"}] * requests
                raises = [raise_doc(i) for i in range(requests)]
                await sequential(client, status_docs[:20])  # warm up both ends
                latency = {
                    "status": summary(await sequential(client, status_docs)),
                    "raise": summary(await sequential(client, raises)),
                }
                in_process = {
                    "status": summary(await direct(service, status_docs)),
                    "raise": summary(await direct(service, raises)),
                }
                baseline = latency["raise"]["median_us"]
                steps = []
                sustained = 0.0
                rate = 100.0
                while rate <= max_rate:
                    step = await open_loop(client, rate, step_seconds)
                    steps.append(step)
                    if step["failed"] or step.get("median_us", float("inf")) > 2 * baseline:
                        break
                    sustained = rate
                    rate *= 2
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return {
        "broker": url,
        "latency_mqtt": latency,
        "latency_in_process": in_process,
        "sustained_raises_per_s": sustained,
        "sustained_rule": "highest doubling rate whose median raise latency stays within 2x the unloaded median",
        "load_steps": steps,
        "bridge": vars(bridge.stats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--step-seconds", type=float, default=2.0)
    parser.add_argument("--url", help="an existing broker (default: start a mosquitto on loopback)")
    args = parser.parse_args()
    result = asyncio.run(bench_mqtt(args.url, requests=args.requests, step_seconds=args.step_seconds))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
