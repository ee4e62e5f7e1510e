"""The console lines the Linux event tests wait for (tests/support/linux_guest.py), against lines
the test module printed in real runs."""

from __future__ import annotations

import re

import pytest

from support.linux_guest import DELIVERY_ANY, DELIVERY_LINE


@pytest.mark.parametrize(
    ("line", "pc", "module"),
    [
        (
            "[    3.120007] sdei_test: event 1000 #4 on CPU 1 arg_ok=1 pc=default_idle_call+0x3c/0x160 "
            "pstate=60000005\r\n",
            "default_idle_call+0x3c/0x160",
            None,
        ),
        # interrupted inside the module's own init, right after it said it was ready
        (
            "[    1.729800] sdei_test: event 1000 #4 on CPU 0 arg_ok=1 pc=sdei_test_init+0xe8/0x1000 [sdei_test] "
            "pstate=60000005\n",
            "sdei_test_init+0xe8/0x1000",
            "sdei_test",
        ),
    ],
)
def test_a_delivery_line_is_matched_wherever_the_event_interrupted(line: str, pc: str, module: str | None) -> None:
    match = re.search(DELIVERY_LINE.format(n=4), line)
    assert match is not None
    assert (match["event"], match["cpu"], match["pc"], match["module"], match["pstate"]) == (
        "1000", line.split("CPU ")[1][0], pc, module, "60000005",
    )  # fmt: skip
    assert re.search(DELIVERY_LINE.format(n=5), line) is None  # another delivery's number
    any_match = DELIVERY_ANY.search(line)
    assert any_match is not None and any_match["n"] == "4"


def test_a_line_cut_short_is_not_matched() -> None:
    line = "[    3.1] sdei_test: event 1000 #4 on CPU 1 arg_ok=1 pc=default_idle_call+0x3c/0x160 psta"
    assert re.search(DELIVERY_LINE.format(n=4), line) is None
