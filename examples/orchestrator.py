#!/usr/bin/env python3
"""An orchestrator talking to qmp-sdei sidecars over MQTT: read a VM's status, raise an SDEI event
in it, and follow what the guest does with it.

    examples/orchestrator.py --broker mqtt://127.0.0.1:1883 --vm vm1 status
    examples/orchestrator.py --broker mqtt://127.0.0.1:1883 --vm vm1 raise --event 1000 --vcpu 0
    examples/orchestrator.py --broker mqtts://broker:8883 --ca ca.pem --username orchestrator \\
        --password-file /etc/orchestrator/mqtt.pass --vm vm1 raise --event 1000 --vcpu 0 --watch 5

Every line it prints is one JSON document (a reply, a status, a notification), so its output can be
piped into jq or another program. Exit status: 0 done, 1 the sidecar refused (or the event was
refused), 6 the broker or the sidecar could not be reached.

It uses the package's own client, :class:`qmp_sdei.control.mqtt.MqttControlClient`: it asks for
replies on a topic of its own, matches them by correlation data and turns every broker problem
into a ControlError. The requests are the control API's (docs/control-api.md); a sidecar serves
the same ones on its local socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from qmp_sdei.control.mqtt import MqttControlClient
from qmp_sdei.errors import ControlError

UNREACHABLE = 6


def emit(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, sort_keys=True), flush=True)


async def watch(client: MqttControlClient, seconds: float, until_completed: int | None = None) -> None:
    """Print the VM's notifications for ``seconds`` (or until event ``until_completed`` completes)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for note in client.watch():
                emit({"notification": note})
                completed = str(note.get("kind", "")).startswith("completed")
                if completed and until_completed is not None and note.get("event") == until_completed:
                    return


async def run(args: argparse.Namespace) -> int:
    password = args.password
    if args.password_file is not None:
        password = args.password_file.read_text().strip()
    client = MqttControlClient(
        args.broker,
        args.vm,
        username=args.username,
        password=password,
        ca=args.ca,
        topic_prefix=args.topic_prefix,
        timeout=args.timeout,
    )
    async with client:
        if args.command == "status":
            # The retained status the sidecar publishes (None: it never connected to this broker),
            # then the live one, answered by the sidecar itself.
            emit({"retained_status": await client.status()})
            reply = await client.request({"v": 1, "command": "status"})
            emit({"reply": reply})
            return 0 if reply.get("ok") else 1

        if args.command == "watch":
            await watch(client, args.seconds)
            return 0

        # raise, and with --watch follow the notifications. The watch starts with its subscription,
        # which may reach the broker just after the request: a notification published in between
        # (such as "raised") may be missed; the reply itself says what SDEI made of the raise.
        request: dict[str, Any] = {"v": 1, "command": "raise", "event": args.event, "wait": args.wait}
        if args.vcpu is not None:
            request["vcpu"] = args.vcpu
        watcher = asyncio.create_task(watch(client, args.watch, args.event)) if args.watch > 0 else None
        try:
            reply = await client.request(request, timeout=args.wait + args.timeout)
            emit({"reply": reply})
            if watcher is not None and reply.get("ok") and reply["result"]["result"] != "refused":
                await watcher
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        return 0 if reply.get("ok") and reply["result"]["result"] != "refused" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", required=True, help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    parser.add_argument("--vm", required=True, help="the VM's name (its sidecar's topic level)")
    parser.add_argument("--username")
    parser.add_argument("--password", help="prefer --password-file: arguments are visible in ps")
    parser.add_argument("--password-file", type=Path)
    parser.add_argument("--ca", type=Path, help="CA bundle to verify an mqtts:// broker with")
    parser.add_argument("--topic-prefix", default="qmp-sdei/v1")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker or a reply")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="the VM's retained and live status")
    raise_ = sub.add_parser("raise", help="raise an SDEI event in the guest")
    raise_.add_argument("--event", type=int, required=True)
    raise_.add_argument("--vcpu", type=int, help="for a private event: the vCPU (omit for a shared event)")
    raise_.add_argument("--wait", type=float, default=5.0, help="seconds the sidecar waits for the handler's entry")
    raise_.add_argument("--watch", type=float, default=0.0, help="then print notifications for up to N seconds")
    watch_ = sub.add_parser("watch", help="print the VM's notifications")
    watch_.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except ControlError as err:
        print(f"orchestrator: {err}", file=sys.stderr)
        return UNREACHABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
