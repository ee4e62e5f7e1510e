"""Pure checks of the vmstate adapter's names: helper Ids and D-Bus address escaping."""

from __future__ import annotations

import pytest

from qmp_sdei.errors import VmstateError
from qmp_sdei.vmstate import VmstateService
from qmp_sdei.vmstate.bus import escape_address_value


@pytest.mark.parametrize("bad", ["", "a,b", "x" * 256])
def test_bad_ids_are_refused(bad: str) -> None:
    with pytest.raises(VmstateError, match="Id"):
        VmstateService(None, save=lambda: b"", load=lambda blob: None, state_id=bad)


def test_escape_address_value() -> None:
    assert escape_address_value("/run/qmp-sdei/vm_1.x/bus.sock") == "/run/qmp-sdei/vm_1.x/bus.sock"
    assert escape_address_value("/tmp/a+b c,d=e") == "/tmp/a%2bb%20c%2cd%3de"
