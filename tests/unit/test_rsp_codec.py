"""Pure parsing tests for the RSP client: framing, checksums, escapes, run-length, stop replies."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmp_sdei.conduit.rsp import (
    Ack,
    CoreRegs,
    Packet,
    PacketDecoder,
    RegisterMap,
    ThreadId,
    checksum,
    decode_body,
    escape,
    frame,
    parse_feature_includes,
    parse_feature_registers,
    parse_stop_reply,
)
from qmp_sdei.errors import ConduitError


def test_checksum_of_known_packets() -> None:
    # Values as QEMU computes them (modulo-256 byte sum).
    assert checksum(b"OK") == 0x9A
    assert checksum(b"g") == 0x67
    assert frame("g") == b"$g#67"
    assert frame("vCont;c") == b"$vCont;c#a8"


def test_frame_escapes_reserved_bytes_and_sums_the_escaped_body() -> None:
    framed = frame(b"a$b#c}d*e")
    body = framed[1:-3]
    assert body == b"a}\x04b}\x03c}]d}\ne"
    assert framed.endswith(f"#{checksum(body):02x}".encode())


def test_escape_is_identity_for_plain_text() -> None:
    data = b"qSupported:multiprocess+"
    assert escape(data) is data


@given(st.binary(max_size=200))
def test_escape_then_decode_roundtrips(data: bytes) -> None:
    assert decode_body(escape(data)) == data


def test_run_length_decoding() -> None:
    # "0* " = '0' plus (0x20 - 29) = 3 more: four zeros (the GDB manual's example).
    assert decode_body(b"0* ") == b"0000"
    assert decode_body(b'ab*"c') == b"abbbbbbc"  # '"' = 0x22: 5 more


def test_run_length_repeats_an_escaped_byte() -> None:
    assert decode_body(b"}]* ") == b"}}}}"


@pytest.mark.parametrize("bad", [b"abc}", b"*x", b"a*"])
def test_malformed_bodies_raise(bad: bytes) -> None:
    with pytest.raises(ConduitError):
        decode_body(bad)


def test_decoder_splits_acks_and_packets_across_chunks() -> None:
    dec = PacketDecoder()
    stream = b"+" + frame("OK") + frame("T05thread:p01.02;") + b"-"
    items: list[Ack | Packet] = []
    for i in range(0, len(stream), 3):  # arbitrary chunking, packets cut in the middle
        items += list(dec.feed(stream[i : i + 3]))
    assert items == [Ack(True), Packet(b"OK"), Packet(b"T05thread:p01.02;"), Ack(False)]


def test_decoder_expands_run_length_and_skips_junk() -> None:
    dec = PacketDecoder()
    assert list(dec.feed(b"\x00junk$0* #" + f"{checksum(b'0* '):02x}".encode())) == [Packet(b"0000")]


def test_decoder_rejects_bad_checksum() -> None:
    with pytest.raises(ConduitError, match="checksum mismatch"):
        list(PacketDecoder().feed(b"$OK#00"))


def test_stop_reply_with_thread() -> None:
    stop = parse_stop_reply(b"T05thread:p01.02;")
    assert (stop.kind, stop.signal, stop.thread) == ("T", 5, ThreadId(1, 2))
    assert stop.thread is not None and stop.thread.vcpu == 1
    assert not stop.exited


def test_stop_reply_kinds() -> None:
    assert parse_stop_reply("T02thread:p01.01;").signal == 2
    assert parse_stop_reply("T18thread:p01.01;").signal == 0x18  # QEMU's FINISH_MIGRATE stop
    assert parse_stop_reply("S05").thread is None
    exited = parse_stop_reply("W00")
    assert exited.exited and exited.signal == 0
    assert parse_stop_reply("T05watch:1000;thread:p01.01;").info == {"watch": "1000", "thread": "p01.01"}


@pytest.mark.parametrize("bad", ["OK", "T", "Tzz", "T05thread"])
def test_bad_stop_replies(bad: str) -> None:
    with pytest.raises(ConduitError):
        parse_stop_reply(bad)


def test_thread_ids() -> None:
    assert ThreadId.parse("p01.0a") == ThreadId(1, 10)
    assert str(ThreadId(1, 2)) == "p01.02"
    assert ThreadId.for_vcpu(0) == ThreadId(1, 1)
    assert ThreadId.parse("2") == ThreadId(1, 2)
    with pytest.raises(ConduitError):
        ThreadId.parse("p1")


def test_core_regs_pack_roundtrip() -> None:
    regs = CoreRegs(list(range(31)), sp=0x4000_0000, pc=0x4008_0804, cpsr=0x3C5)
    raw = regs.pack()
    assert len(raw) == 268
    assert struct.unpack_from("<Q", raw, 32 * 8)[0] == 0x4008_0804
    assert CoreRegs.unpack(raw) == regs
    with pytest.raises(ConduitError, match="268"):
        CoreRegs.unpack(raw[:-4])


TARGET_XML = """<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">
<target><architecture>aarch64</architecture>
<xi:include href="aarch64-core.xml"/><xi:include href='aarch64-fpu.xml'/>
<xi:include href="system-registers.xml"/></target>"""

CORE_XML = "".join(f'<reg name="x{i}" bitsize="64"/>' for i in range(31)) + (
    '<reg name="sp" bitsize="64" type="data_ptr"/><reg name="pc" bitsize="64" type="code_ptr"/>'
    '<reg name="cpsr" bitsize="32" type="cpsr_flags"/>'
)
SYSREG_XML = (
    '<feature name="org.qemu.gdb.arm.sys.regs">'
    '<reg name="SPSR_EL1" bitsize="64" regnum="93" group="cp_regs"/>\n'
    '<reg name="ELR_EL1" bitsize="64" regnum="97" group="cp_regs"/>'
    '<reg name="VBAR" bitsize="64" regnum="104" group="cp_regs"/></feature>'
)


def test_target_description_parsing() -> None:
    assert parse_feature_includes(TARGET_XML) == [
        "aarch64-core.xml",
        "aarch64-fpu.xml",
        "system-registers.xml",
    ]
    core = parse_feature_registers(CORE_XML, 0)
    assert [r.regnum for r in core[-3:]] == [31, 32, 33]
    assert core[33].name == "cpsr" and core[33].bitsize == 32
    regs = RegisterMap(core + parse_feature_registers(SYSREG_XML, 68))
    assert regs["ELR_EL1"].regnum == 97
    assert regs["spsr_el1"].regnum == 93
    assert regs["VBAR_EL1"].regnum == 104  # exposed under the AArch32-style name
    assert "ESR_EL1" not in regs
    with pytest.raises(ConduitError, match="ESR_EL1"):
        regs["ESR_EL1"]
