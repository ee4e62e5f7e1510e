"""Every cell of the handler state table (``docs/sdei.md``, "The handler state table"), driven through real calls.

The expected table below is written out by hand from the spec's state machine, independently of
``qmp_sdei.sdei.state``, so a wrong entry there makes these tests fail.
"""

from __future__ import annotations

import pytest

from qmp_sdei.abi.sdei import Result
from qmp_sdei.sdei import Dispatcher, HandlerState
from support.sdei import ARG, ENTRY, PRIVATE, SHARED, F, call, interrupted_regs, make, run_handler

S = HandlerState
OK, DENIED, PENDING = Result.SUCCESS, Result.DENIED, Result.PENDING

STATES = [S.UNREGISTERED, S.REGISTERED, S.ENABLED, S.RUNNING, S.RUNNING_ENABLED, S.UNREGISTER_PENDING]

# call -> {state: (result, next state)}
EXPECTED: dict[str, dict[HandlerState, tuple[int, HandlerState]]] = {
    "register": {
        S.UNREGISTERED: (OK, S.REGISTERED),
        S.REGISTERED: (DENIED, S.REGISTERED),
        S.ENABLED: (DENIED, S.ENABLED),
        S.RUNNING: (DENIED, S.RUNNING),
        S.RUNNING_ENABLED: (DENIED, S.RUNNING_ENABLED),
        S.UNREGISTER_PENDING: (DENIED, S.UNREGISTER_PENDING),
    },
    "enable": {
        S.UNREGISTERED: (DENIED, S.UNREGISTERED),
        S.REGISTERED: (OK, S.ENABLED),
        S.ENABLED: (OK, S.ENABLED),
        S.RUNNING: (OK, S.RUNNING_ENABLED),
        S.RUNNING_ENABLED: (OK, S.RUNNING_ENABLED),
        S.UNREGISTER_PENDING: (DENIED, S.UNREGISTER_PENDING),
    },
    "disable": {
        S.UNREGISTERED: (DENIED, S.UNREGISTERED),
        S.REGISTERED: (OK, S.REGISTERED),
        S.ENABLED: (OK, S.REGISTERED),
        S.RUNNING: (OK, S.RUNNING),
        S.RUNNING_ENABLED: (OK, S.RUNNING),
        S.UNREGISTER_PENDING: (DENIED, S.UNREGISTER_PENDING),
    },
    "unregister": {
        S.UNREGISTERED: (DENIED, S.UNREGISTERED),
        S.REGISTERED: (OK, S.UNREGISTERED),
        S.ENABLED: (OK, S.UNREGISTERED),
        S.RUNNING: (PENDING, S.UNREGISTER_PENDING),
        S.RUNNING_ENABLED: (PENDING, S.UNREGISTER_PENDING),
        S.UNREGISTER_PENDING: (PENDING, S.UNREGISTER_PENDING),
    },
    "routing_set": {
        S.UNREGISTERED: (DENIED, S.UNREGISTERED),
        S.REGISTERED: (OK, S.REGISTERED),
        S.ENABLED: (DENIED, S.ENABLED),
        S.RUNNING: (DENIED, S.RUNNING),
        S.RUNNING_ENABLED: (DENIED, S.RUNNING_ENABLED),
        S.UNREGISTER_PENDING: (DENIED, S.UNREGISTER_PENDING),
    },
    "complete": {
        S.UNREGISTERED: (DENIED, S.UNREGISTERED),
        S.REGISTERED: (DENIED, S.REGISTERED),
        S.ENABLED: (DENIED, S.ENABLED),
        S.RUNNING: (OK, S.REGISTERED),
        S.RUNNING_ENABLED: (OK, S.ENABLED),
        S.UNREGISTER_PENDING: (OK, S.UNREGISTERED),
    },
    "context": {
        S.UNREGISTERED: (DENIED, S.UNREGISTERED),
        S.REGISTERED: (DENIED, S.REGISTERED),
        S.ENABLED: (DENIED, S.ENABLED),
        S.RUNNING: (OK, S.RUNNING),
        S.RUNNING_ENABLED: (OK, S.RUNNING_ENABLED),
        S.UNREGISTER_PENDING: (OK, S.UNREGISTER_PENDING),
    },
}


def put_in_state(d: Dispatcher, event: int, state: HandlerState) -> None:
    """Bring ``event`` on vCPU 0 into ``state`` using only guest calls and deliveries."""
    if state is S.UNREGISTERED:
        return
    assert call(d, 0, F.EVENT_REGISTER, event, ENTRY, ARG, 0, 0) == 0
    if state is S.REGISTERED:
        return
    assert call(d, 0, F.EVENT_ENABLE, event) == 0
    if state is S.ENABLED:
        return
    call(d, 0, F.PE_UNMASK)
    run_handler(d, 0, event)
    if state is S.RUNNING:
        assert call(d, 0, F.EVENT_DISABLE, event) == 0
    elif state is S.UNREGISTER_PENDING:
        assert call(d, 0, F.EVENT_UNREGISTER, event) == PENDING


def status(d: Dispatcher, event: int) -> int:
    return call(d, 0, F.EVENT_STATUS, event)


def do(d: Dispatcher, action: str, event: int) -> int:
    args = {
        "register": (F.EVENT_REGISTER, event, ENTRY, ARG, 0, 0),
        "enable": (F.EVENT_ENABLE, event),
        "disable": (F.EVENT_DISABLE, event),
        "unregister": (F.EVENT_UNREGISTER, event),
        "routing_set": (F.EVENT_ROUTING_SET, event, 0, 0),
        "context": (F.EVENT_CONTEXT, 1),
    }
    if action == "complete":
        regs = interrupted_regs(100)
        regs.x[0] = F.EVENT_COMPLETE
        d.hypercall(0, regs)
        # COMPLETE never returns to the handler: x0 is the restored interrupted x0 on success.
        return OK if regs.x[0] != (DENIED & (2**64 - 1)) else DENIED
    result = call(d, 0, *args[action])
    if action == "context" and result >= 0:
        return OK
    return result


@pytest.mark.parametrize("action", list(EXPECTED))
@pytest.mark.parametrize("state", STATES, ids=lambda s: s.name.lower())
@pytest.mark.parametrize("event", [PRIVATE, SHARED], ids=["private", "shared"])
def test_state_table_cell(action: str, state: HandlerState, event: int) -> None:
    if action == "routing_set" and event == PRIVATE:
        pytest.skip("ROUTING_SET on a private event is an argument error, tested separately")
    d = make()
    put_in_state(d, event, state)
    assert status(d, event) == int(state)
    expected_result, expected_state = EXPECTED[action][state]
    assert do(d, action, event) == expected_result
    assert status(d, event) == int(expected_state)


def test_status_values_match_reference_bits() -> None:
    assert [int(s) for s in STATES] == [0, 1, 3, 5, 7, 4]


def test_dispatch_only_from_registered_enabled() -> None:
    for state in STATES:
        d = make()
        put_in_state(d, PRIVATE, state)
        call(d, 0, F.PE_UNMASK)
        d.trigger(PRIVATE, 0)
        entered = d.deliver(0, interrupted_regs())
        assert entered == (state is S.ENABLED), state
