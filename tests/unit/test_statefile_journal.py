"""The state journal: per-stop state changes are appended to ``state.journal`` (no rename), and the
newest whole record wins over ``state.json`` when a sidecar restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qmp_sdei import statefile
from qmp_sdei.errors import IncompatibleState, StateDirError
from qmp_sdei.sdei import Dispatcher, EventSpec
from qmp_sdei.statefile import StateStore, StoredState, VmIdentity
from qmp_sdei.versions import VersionPins

PINS = VersionPins((1, 1), 0, (1, 0))


def snapshot() -> bytes:
    return Dispatcher(events=[EventSpec(1000)], mpidrs=[0], version=(1, 1), profile="tf-a").snapshot()


def state(n: int) -> StoredState:
    """Distinct states, told apart by the VM name."""
    return StoredState(VmIdentity(None, f"vm{n}"), PINS, snapshot())


def name_in(path: Path) -> str | None:
    loaded = StateStore(path).load()
    return None if loaded is None else loaded.identity.name


def test_first_record_writes_state_json_then_appends(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.record(state(0))
    full = (tmp_path / "state.json").read_bytes()
    assert (tmp_path / "state.journal").stat().st_size == 0
    for n in range(1, 4):
        store.record(state(n))
    assert (tmp_path / "state.json").read_bytes() == full  # no rename per change
    assert name_in(tmp_path) == "vm3"  # the journal's last record wins


def test_an_opened_journal_takes_the_first_record_without_writing_state_json(tmp_path: Path) -> None:
    earlier = StateStore(tmp_path)
    earlier.record(state(0))  # state.json
    earlier.record(state(1))  # journal
    assert earlier._journal_fd is not None
    os.close(earlier._journal_fd)  # a sidecar that died without release()
    full = (tmp_path / "state.json").read_bytes()
    store = StateStore(tmp_path)
    store.open_journal()
    store.record(state(2))
    assert (tmp_path / "state.json").read_bytes() == full  # an append, not a full write
    assert name_in(tmp_path) == "vm2"  # after the record already there, and it wins
    store.release()
    assert json.loads((tmp_path / "state.json").read_text())["vm"]["name"] == "vm2"


def test_opening_the_journal_cuts_a_torn_record_that_would_hide_the_next(tmp_path: Path) -> None:
    earlier = StateStore(tmp_path)
    for n in range(3):
        earlier.record(state(n))
    journal = tmp_path / "state.journal"
    journal.write_bytes(journal.read_bytes() + b"QSJ1\x40\0\0\0torn")  # a crash in the middle of a write
    store = StateStore(tmp_path)
    store.open_journal()
    store.record(state(3))
    assert name_in(tmp_path) == "vm3"  # without the cut, reading would stop at the torn bytes: vm2


def test_a_journal_that_cannot_be_opened_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.journal").mkdir()
    store = StateStore(tmp_path)
    with pytest.raises(StateDirError, match=r"state\.journal: cannot open the journal"):
        store.open_journal()


def test_release_leaves_a_complete_state_json(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.record(state(0))
    store.record(state(1))
    store.release()
    assert (tmp_path / "state.journal").stat().st_size == 0
    assert json.loads((tmp_path / "state.json").read_text())["vm"]["name"] == "vm1"


def test_a_record_cut_short_is_ignored(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for n in range(3):
        store.record(state(n))
    journal = tmp_path / "state.journal"
    whole = journal.read_bytes()
    store.record(state(3))
    cut = journal.read_bytes()[: len(whole) + 40]  # the fourth record, torn
    journal.write_bytes(cut)
    assert name_in(tmp_path) == "vm2"
    journal.write_bytes(whole + b"\0" * 64)  # zeros where a crash left the file longer
    assert name_in(tmp_path) == "vm2"


def test_a_damaged_record_ends_the_journal(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for n in range(3):
        store.record(state(n))
    journal = tmp_path / "state.journal"
    data = bytearray(journal.read_bytes())
    data[-5] ^= 0xFF  # the last record's payload no longer matches its CRC
    journal.write_bytes(bytes(data))
    assert name_in(tmp_path) == "vm1"


def test_a_damaged_state_json_is_refused_even_with_a_journal(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.record(state(0))
    store.record(state(1))
    (tmp_path / "state.json").write_text('{"format": 1, "vm": {}, "pins": "x"}')
    with pytest.raises(IncompatibleState, match=r"state\.json"):
        StateStore(tmp_path).load()


def test_a_whole_record_that_is_not_a_state_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.record(state(0))
    payload = b'{"format": 99}'
    record = statefile._RECORD_HEAD.pack(statefile.JOURNAL_MAGIC, len(payload), statefile.zlib.crc32(payload))
    with (tmp_path / "state.journal").open("ab") as f:
        f.write(record + payload)
    with pytest.raises(IncompatibleState, match=r"state\.journal"):
        StateStore(tmp_path).load()


def test_the_journal_is_folded_into_state_json_at_its_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statefile, "JOURNAL_LIMIT", 3000)
    store = StateStore(tmp_path)
    sizes = []
    for n in range(12):
        store.record(state(n))
        sizes.append((tmp_path / "state.journal").stat().st_size)
    assert max(sizes) < 3000 + 2000 and 0 in sizes[1:]  # emptied again, by a full write
    assert name_in(tmp_path) == "vm11"


def test_a_sigkilled_writer_loses_nothing_it_recorded(tmp_path: Path) -> None:
    """The guarantee the conduit relies on: what record() returned from is there after SIGKILL."""
    child = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_statefile_journal import state
        from qmp_sdei.statefile import StateStore
        store = StateStore(__import__("pathlib").Path({str(tmp_path)!r}))
        for n in range(200):
            store.record(state(n))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", child], env=env, check=False, timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert name_in(tmp_path) == "vm199"
