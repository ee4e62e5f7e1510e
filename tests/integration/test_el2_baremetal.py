"""Events raised back to back into a bare-metal guest through the EL2 stub (the loop guest,
``tests/guests/loop``: it spins with interrupts unmasked and takes no exception of its own).

Each event is raised as soon as the previous handler's COMPLETE was served, so the interrupt
stop finds the vCPU at ``stub_resume`` with that COMPLETE's return still pending in its area:
the handler is entered on top of it. Two faults lived here: the delivery was retried 2 ms later
instead, and that retry was dropped when it fired during another stop, which left the event
undelivered for good (the guest never reaches the vector breakpoints it then waited at).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qmp_sdei.conduit.el2 import El2Stats
from qmp_sdei.owner import NotificationKind, RaiseResult, SdeiOwner
from qmp_sdei.sdei import Dispatcher, EventSpec
from qmp_sdei.versions import VersionPins
from support.guests import build_loop_guest_el2, conduit_on_gdbstub, el2_conduit, el2_spec

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio]

TIMEOUT = 60.0
EVENTS = 100  # as compiled into tests/guests/loop/loop.c: it powers off after that many handlers


async def test_events_raised_right_after_each_complete_are_all_entered(tmp_path: Path) -> None:
    image = build_loop_guest_el2(tmp_path / "guest")
    spec = el2_spec(image)
    owner = SdeiOwner(
        Dispatcher(events=[EventSpec(1000), EventSpec(1001)], mpidrs=[0], version=(1, 1), profile="tf-a"),
        pins=VersionPins((1, 1), 0, (1, 1)),
    )
    # Every call at a stop: the case needs an interrupt stop to land right behind a COMPLETE's, and
    # the mailbox's watcher thread shifts that timing (tests/integration/test_el2_mailbox.py).
    el2 = el2_conduit(owner, TIMEOUT, mailbox=False)

    async with conduit_on_gdbstub(spec, tmp_path, owner, [], TIMEOUT, build=el2) as (vm, conduit, run):
        await vm.wait_for_console(r"WAIT events\r?\n", TIMEOUT)
        with owner.subscribe() as notifications:
            for n in range(EVENTS):
                event = 1001 if n % 2 else 1000  # 1001's handler makes an EVENT_CONTEXT call first
                result = await owner.raise_event(event, 0, wait=TIMEOUT)
                assert result.result is RaiseResult.DELIVERED, (n, result)
                async with asyncio.timeout(TIMEOUT):
                    async for note in notifications:
                        if note.kind is NotificationKind.COMPLETED and note.event == event:
                            break  # the next raise goes out right behind the COMPLETE's resume
        await vm.wait_for_console(rf"EVENTS {EVENTS}\r?\n", TIMEOUT)
        assert await vm.wait(TIMEOUT) == 0
        await asyncio.wait_for(run, TIMEOUT)
    stats = conduit.stats
    assert isinstance(stats, El2Stats)
    assert stats.deliveries == EVENTS
    assert stats.entries_over_request >= 1, stats  # the case under test came up
