"""boot-test's console matching and the /chosen block it gives a stub-booted kernel."""

from __future__ import annotations

import pytest

from qmp_sdei.boottest import PSCI_LINE, SDEI_LINE
from qmp_sdei.errors import ConfigError
from qmp_sdei.qemu.dtb import chosen_overlay


def test_half_a_line_is_not_a_line() -> None:
    # The console had printed "-9" of "-95" when the old pattern matched at the end of the buffer.
    assert SDEI_LINE.search("[    0.28] sdei: Failed to get SDEI version: -9") is None
    match = SDEI_LINE.search("[    0.28] sdei: Failed to get SDEI version: -95\r\n")
    assert match is not None and match["failed"] == "Failed to get SDEI version: -95"
    assert PSCI_LINE.search("psci: PSCIv1.0 detected in firm") is None


def test_whole_lines_match_with_and_without_timestamps() -> None:
    match = SDEI_LINE.search("x\n[    0.257000] sdei: SDEIv1.1 (0x0) detected in firmware.\r\nmore")
    assert match is not None and (match["major"], match["minor"], match["vendor"]) == ("1", "1", "0")
    assert match["ts"] == "0.257000"
    assert PSCI_LINE.search("psci: PSCIv1.0 detected in firmware.\n") is not None


def test_chosen_overlay_carries_cmdline_initrd_and_seed() -> None:
    text = chosen_overlay("console=ttyAMA0 panic=-1", (0x4900_0000, 0x4910_0000), 0x1122334455667788)
    assert 'bootargs = "console=ttyAMA0 panic=-1";' in text
    assert "linux,initrd-start = <0x0 0x49000000>;" in text
    assert "linux,initrd-end = <0x0 0x49100000>;" in text
    assert "kaslr-seed = <0x11223344 0x55667788>;" in text
    assert "initrd" not in chosen_overlay("quiet", None, None)


def test_chosen_overlay_refuses_what_a_dts_string_cannot_hold() -> None:
    with pytest.raises(ConfigError, match="command line"):
        chosen_overlay('init="/bin/sh"', None, None)


def test_chosen_overlay_reserves_the_stub() -> None:
    text = chosen_overlay("quiet", None, None, (0x4010_0000, 0x2_0000))
    assert "qmp-sdei-el2-stub@40100000 {" in text
    assert "reg = <0x0 0x40100000 0x0 0x20000>;" in text and "no-map;" in text
