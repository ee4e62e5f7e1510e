"""The SDEI per-event handler state machine, as a table to read beside the spec.

Each event instance (per vCPU for private events, per VM for shared ones) is in one of six states
built from three bits: Running, Enabled, reGistered. The enum values are exactly what
SDEI_EVENT_STATUS returns (bit0 registered, bit1 enabled, bit2 running), so 2 and 6 (enabled but
not registered) cannot be represented at all.

The transition table is TF-A's ``sdei_state.c`` (SDEI v1.0 section 6.1), which TFTF exercises cell
by cell. A missing cell means the call is refused; the refusal code is DENIED except where
``REFUSAL_OVERRIDES`` says otherwise (UNREGISTER while already unregister-pending answers PENDING).
This module must stay pure data plus lookups: no dispatcher logic creeps in here.
"""

from __future__ import annotations

from enum import Enum, IntEnum

from qmp_sdei.abi.sdei import Result


class HandlerState(IntEnum):
    """State of one event instance; the value is its EVENT_STATUS bitmap."""

    UNREGISTERED = 0  # reg
    REGISTERED = 1  # reG: registered, disabled
    ENABLED = 3  # rEG: registered, enabled: the only state an event can be dispatched from
    RUNNING = 5  # ReG: handler running, registered, disabled
    RUNNING_ENABLED = 7  # REG: handler running, registered, enabled
    UNREGISTER_PENDING = 4  # Reg: handler running, unregistration completes at COMPLETE

    @property
    def registered(self) -> bool:
        return bool(self & 1)

    @property
    def enabled(self) -> bool:
        return bool(self & 2)

    @property
    def running(self) -> bool:
        return bool(self & 4)


class Action(Enum):
    """What happens to an event instance: guest calls plus the dispatcher's own dispatch."""

    REGISTER = "register"
    ENABLE = "enable"
    DISABLE = "disable"
    UNREGISTER = "unregister"
    ROUTING_SET = "routing_set"
    INTERRUPT_RELEASE = "interrupt_release"
    CONTEXT = "context"
    COMPLETE = "complete"  # also COMPLETE_AND_RESUME
    DISPATCH = "dispatch"


_S = HandlerState
_UNREG, _REG, _EN = _S.UNREGISTERED, _S.REGISTERED, _S.ENABLED
_RUN, _RUN_EN, _UNREG_PEND = _S.RUNNING, _S.RUNNING_ENABLED, _S.UNREGISTER_PENDING

#: TRANSITIONS[action][state] -> next state. Absent cell: refused (see REFUSAL_OVERRIDES).
#:
#: ============ ===== ===== ===== ===== ===== =====
#: action        reg   reG   rEG   ReG   REG   Reg
#: ============ ===== ===== ===== ===== ===== =====
#: REGISTER      reG    -     -     -     -     -
#: ENABLE         -    rEG   nop   REG   nop    -
#: DISABLE        -    nop   reG   nop   ReG    -
#: UNREGISTER     -    reg   reg   Reg*  Reg*   -     (* answers PENDING)
#: ROUTING_SET    -    nop    -     -     -     -
#: INT_RELEASE   nop    -     -     -     -     -
#: CONTEXT        -     -     -    nop   nop   nop
#: COMPLETE       -     -     -    reG   rEG   reg
#: DISPATCH       -     -    REG    -     -     -
#: ============ ===== ===== ===== ===== ===== =====
TRANSITIONS: dict[Action, dict[HandlerState, HandlerState]] = {
    Action.REGISTER: {_UNREG: _REG},
    Action.ENABLE: {_REG: _EN, _EN: _EN, _RUN: _RUN_EN, _RUN_EN: _RUN_EN},
    Action.DISABLE: {_REG: _REG, _EN: _REG, _RUN: _RUN, _RUN_EN: _RUN},
    Action.UNREGISTER: {_REG: _UNREG, _EN: _UNREG, _RUN: _UNREG_PEND, _RUN_EN: _UNREG_PEND},
    Action.ROUTING_SET: {_REG: _REG},
    Action.INTERRUPT_RELEASE: {_UNREG: _UNREG},
    Action.CONTEXT: {_RUN: _RUN, _RUN_EN: _RUN_EN, _UNREG_PEND: _UNREG_PEND},
    Action.COMPLETE: {_RUN: _REG, _RUN_EN: _EN, _UNREG_PEND: _UNREG},
    Action.DISPATCH: {_EN: _RUN_EN},
}

#: Refusals that answer something other than DENIED.
REFUSAL_OVERRIDES: dict[tuple[Action, HandlerState], Result] = {
    (Action.UNREGISTER, _UNREG_PEND): Result.PENDING,
}


def transition(action: Action, state: HandlerState) -> HandlerState | Result:
    """The state after ``action`` in ``state``, or the error code that refuses it."""
    nxt = TRANSITIONS[action].get(state)
    if nxt is None:
        return REFUSAL_OVERRIDES.get((action, state), Result.DENIED)
    return nxt
