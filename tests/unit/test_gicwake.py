"""Finding each vCPU's GIC redistributor from what the frames say (pure: no QEMU here; the real
frames are read in the Linux event tests, which assert that idle vCPUs were woken through them)."""

from __future__ import annotations

from qmp_sdei.conduit.gicwake import VIRT_REDIST_BASE, redistributor_map

V3, V4 = 0x20000, 0x40000


def pidr2(arch: int) -> bytes:
    return (0x0B | arch << 4).to_bytes(4, "little")


def typer(processor: int, *, last: bool = False, affinity: int = 0) -> bytes:
    return (affinity << 32 | processor << 8 | (1 << 4 if last else 0)).to_bytes(8, "little")


def test_gicv3_frames_map_processor_numbers_to_their_bases() -> None:
    frames = [typer(0), typer(1, affinity=1), typer(2, affinity=2, last=True)]
    assert redistributor_map(pidr2(3), frames, V3) == {n: VIRT_REDIST_BASE + n * V3 for n in range(3)}


def test_gicv4_frames_are_twice_as_far_apart() -> None:
    frames = [typer(0), typer(1, last=True)]
    assert redistributor_map(pidr2(4), frames, V4) == {0: VIRT_REDIST_BASE, 1: VIRT_REDIST_BASE + V4}


def test_the_frame_marked_last_ends_the_map() -> None:
    frames = [typer(0, last=True), typer(1)]  # what lies beyond is not a redistributor of this GIC
    assert redistributor_map(pidr2(3), frames, V3) == {0: VIRT_REDIST_BASE}


def test_an_unreadable_frame_ends_the_map() -> None:
    assert redistributor_map(pidr2(3), [typer(0), None, typer(2)], V3) == {0: VIRT_REDIST_BASE}


def test_nothing_is_found_without_a_gicv3_or_v4() -> None:
    # A GICv2 machine has nothing at that address (reads as zeros): nothing may be written there.
    assert redistributor_map((0).to_bytes(4, "little"), [bytes(8)], V3) == {}
    assert redistributor_map(None, [typer(0)], V3) == {}
    assert redistributor_map(pidr2(2), [typer(0)], V3) == {}
    assert redistributor_map(pidr2(3), [typer(0)], V4) == {}  # a stride that is not this version's
