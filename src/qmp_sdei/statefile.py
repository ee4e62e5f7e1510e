"""The sidecar's state directory: what must survive a sidecar restart, and what ``status`` reads.

Files (the JSON files are replaced atomically: written to a temporary file in the same directory,
then renamed, so a reader or a restarted sidecar sees either the old or the new version, never a torn
one):

* ``state.json``: authoritative, together with ``state.journal``. The VM's identity (UUID, name), the
  pinned SDEI/PSCI versions, and the dispatcher snapshot (base64 of the format in
  ``sdei/snapshot.py``). Written in full at attach, when the journal has grown to
  :data:`JOURNAL_LIMIT`, and when the store is released.
* ``state.journal``: every state change between those full writes, appended (one ``write`` of a
  record with its length and CRC-32) before the guest is let go, so a SIGKILLed sidecar loses
  nothing. The newest state is the journal's last whole record, else ``state.json``; a record cut
  short by a crash is ignored. An append costs a few microseconds where a rename over
  ``state.json`` costs ext4 a writeback of the new file (~0.3 ms). A migration destination opens
  the journal at attach and appends from its first change on (:meth:`StateStore.open_journal`).
* ``status.json``: informational, what a running sidecar knows (QEMU, topology, runstate, counters,
  the dispatcher summary) for ``qmp-sdei status``.
* ``lock``: held (flock) by the running sidecar, so two sidecars never serve one VM and ``status``
  can tell whether the writer is alive.

No asyncio here; the files are small (kilobytes) and written synchronously on purpose.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import logging
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmp_sdei.errors import IncompatibleState, NoStatus, StateDirBusy, StateDirError, VersionError
from qmp_sdei.sdei import peek
from qmp_sdei.versions import VersionPins

STATE_FILE = "state.json"
JOURNAL_FILE = "state.journal"
JOURNAL_MAGIC = b"QSJ1"
_RECORD_HEAD = struct.Struct("<4sII")  # magic, payload length, CRC-32 of the payload
JOURNAL_LIMIT = 1 << 20
"""Bytes of journal after which the next change is written to ``state.json`` in full instead."""
STATUS_FILE = "status.json"
LOCK_FILE = "lock"
STATE_FORMAT = 1
#: Pseudo file systems: nothing written there is a file that survives (or can be written at all).
PSEUDO_FS_ROOTS = (Path("/proc"), Path("/sys"))

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VmIdentity:
    """What ties a state file to one VM. QEMU without ``-uuid`` reports none; then the name counts."""

    uuid: str | None
    name: str | None

    def matches(self, other: VmIdentity) -> bool:
        if self.uuid is not None or other.uuid is not None:
            return self.uuid == other.uuid
        return self.name == other.name

    def __str__(self) -> str:
        return f"uuid={self.uuid or '-'} name={self.name or '-'}"


@dataclass(frozen=True)
class StoredState:
    identity: VmIdentity
    pins: VersionPins
    snapshot: bytes


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _encode(state: StoredState) -> bytes:
    doc = {
        "format": STATE_FORMAT,
        "vm": {"uuid": state.identity.uuid, "name": state.identity.name},
        "pins": state.pins.to_dict(),
        "dispatcher": base64.b64encode(state.snapshot).decode(),
    }
    return json.dumps(doc, indent=1).encode()


def journal_records(data: bytes) -> tuple[list[bytes], int]:
    """The whole records of a journal, and how many bytes after them are not one (a record cut
    short by a crash, or anything else: reading stops at the first record that does not check)."""
    records: list[bytes] = []
    at = 0
    while at + _RECORD_HEAD.size <= len(data):
        magic, length, crc = _RECORD_HEAD.unpack_from(data, at)
        start, end = at + _RECORD_HEAD.size, at + _RECORD_HEAD.size + length
        if magic != JOURNAL_MAGIC or end > len(data) or zlib.crc32(data[start:end]) != crc:
            break
        records.append(data[start:end])
        at = end
    return records, len(data) - at


class StateStore:
    """One VM's state directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock_fd: int | None = None
        self._journal_fd: int | None = None  # open (append) once this process has written state.json
        self._journal_bytes = 0
        self._unsaved: StoredState | None = None  # the newest state, when it is only in the journal

    @property
    def journal_path(self) -> Path:
        return self.directory / JOURNAL_FILE

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    @property
    def status_path(self) -> Path:
        return self.directory / STATUS_FILE

    def check_usable(self) -> None:
        """Check, changing nothing, that the directory is (or can be created as) a writable one.

        :raise StateDirError: it is under ``/proc`` or ``/sys``, is not a directory, or cannot be
            written (permissions, read-only file system); the message names the path.
        """
        directory = Path(os.path.abspath(self.directory))
        resolved = directory.resolve()
        for root in PSEUDO_FS_ROOTS:
            if resolved == root or root in resolved.parents:
                raise StateDirError(f"state directory {self.directory}: is under {root}, which cannot keep files")
        existing = directory
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        where = "" if existing == directory else f" (its nearest existing parent {existing})"
        if not existing.is_dir():
            problem = (
                "is not a directory" if existing == directory else f"cannot be created: {existing} is not a directory"
            )
            raise StateDirError(f"state directory {self.directory}: {problem}")
        if not os.access(existing, os.W_OK | os.X_OK):
            try:
                read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
            except OSError:
                read_only = False
            problem = "is on a read-only file system" if read_only else "is not writable"
            raise StateDirError(f"state directory {self.directory}{where}: {problem}")

    def acquire(self) -> None:
        """Create the directory and take its lock.

        :raise StateDirError: the directory cannot be used (see :meth:`check_usable`).
        :raise StateDirBusy: another sidecar runs.
        """
        self.check_usable()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise StateDirError(f"state directory {self.directory}: {err.strerror or err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirBusy(f"state directory {self.directory} is in use by another qmp-sdei") from None
        self._lock_fd = fd

    def release(self) -> None:
        """Write the newest state to ``state.json`` in full if it is only in the journal (so a
        stopped sidecar leaves a complete ``state.json``), and let the directory go."""
        if self._unsaved is not None:
            try:
                self.save(self._unsaved)
            except StateDirError as err:  # the journal still has it; the next sidecar reads both
                log.warning("%s", err)
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def writer_alive(self) -> bool:
        """True if some process holds the lock (a sidecar is serving this VM).

        :raise StateDirError: the lock file exists but cannot be opened.
        """
        try:
            fd = os.open(self.directory / LOCK_FILE, os.O_RDONLY)  # flock needs no write access
        except FileNotFoundError:
            return False
        except OSError as err:
            raise StateDirError(f"{self.directory / LOCK_FILE}: cannot open: {err.strerror or err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def load(self) -> StoredState | None:
        """The saved state, or None if there is none.

        The dispatcher snapshot's envelope (format, checksum) is checked here, so a damaged file is
        refused by name whether or not the snapshot would be restored.

        :raise IncompatibleState: unreadable or damaged (the message names the file).
        """
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            raw = None
        except OSError as err:
            raise IncompatibleState(f"{self.state_path}: cannot read: {err.strerror}") from err
        try:
            journal = self.journal_path.read_bytes()
        except FileNotFoundError:
            journal = b""
        except OSError as err:
            raise IncompatibleState(f"{self.journal_path}: cannot read: {err.strerror}") from err
        # state.json is checked even when the journal has a newer state: a damaged file is refused.
        stored = self._parse(raw, self.state_path) if raw is not None else None
        records, rest = journal_records(journal)
        if rest:
            log.warning("%s: ignoring %d byte(s) after its last whole record", self.journal_path, rest)
        return self._parse(records[-1], self.journal_path) if records else stored

    @staticmethod
    def _parse(raw: bytes, where: Path) -> StoredState:
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
                raise IncompatibleState(f"{where}: unknown state file format {doc.get('format')!r}")
            vm = doc["vm"]
            identity = VmIdentity(uuid=vm.get("uuid"), name=vm.get("name"))
            pins = VersionPins.from_dict(doc["pins"])
            snapshot = base64.b64decode(doc["dispatcher"], validate=True)
        except IncompatibleState:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error, VersionError) as err:
            raise IncompatibleState(f"{where}: damaged state file ({err})") from err
        try:
            peek(snapshot)
        except IncompatibleState as err:
            raise IncompatibleState(f"{where}: damaged dispatcher snapshot: {err}") from err
        return StoredState(identity, pins, snapshot)

    def save(self, state: StoredState) -> None:
        """Replace ``state.json`` and empty the journal.

        :raise StateDirError: it cannot be written (disk full, read-only).
        """
        try:
            _atomic_write(self.state_path, _encode(state))
        except OSError as err:
            raise StateDirError(f"{self.state_path}: cannot write the state: {err.strerror or err}") from err
        # Only now: until state.json has this state, the journal's last record is the newest one.
        try:
            if self._journal_fd is None:
                self._journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.ftruncate(self._journal_fd, 0)
        except OSError as err:
            raise StateDirError(f"{self.journal_path}: cannot empty the journal: {err.strerror or err}") from err
        self._journal_bytes = 0
        self._unsaved = None

    def open_journal(self) -> None:
        """Open the journal now, so that this process's first :meth:`record` is an append rather
        than a full write of ``state.json`` (~0.5 ms). For a migration destination, whose first
        record comes inside the migration's downtime (the incoming state, adopted in ``Load``).

        Whole records already in the journal stay (the new ones come after them, and the last
        wins); bytes after them (a record cut short by a crash) are cut off, since a reader stops
        there and would never see what follows. The lock must be held.

        :raise StateDirError: the journal cannot be opened or mended.
        """
        if self._journal_fd is not None:
            return
        try:
            fd = os.open(self.journal_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as err:
            raise StateDirError(f"{self.journal_path}: cannot open the journal: {err.strerror or err}") from err
        try:
            with open(fd, "rb", closefd=False) as journal:
                data = journal.read()
            _, rest = journal_records(data)
            if rest:
                log.warning("%s: cutting %d byte(s) after its last whole record", self.journal_path, rest)
                os.ftruncate(fd, len(data) - rest)
        except OSError as err:
            os.close(fd)
            raise StateDirError(f"{self.journal_path}: cannot read the journal: {err.strerror or err}") from err
        self._journal_fd = fd
        self._journal_bytes = len(data) - rest

    def record(self, state: StoredState) -> None:
        """Make ``state`` the saved state, cheaply: one record appended to the journal.

        The first call of a process (the journal is then not open yet) and the first once the
        journal has reached :data:`JOURNAL_LIMIT` write ``state.json`` in full instead.

        :raise StateDirError: it cannot be written (disk full, read-only).
        """
        if self._journal_fd is None or self._journal_bytes >= JOURNAL_LIMIT:
            self.save(state)
            return
        payload = _encode(state)
        data = _RECORD_HEAD.pack(JOURNAL_MAGIC, len(payload), zlib.crc32(payload)) + payload
        try:
            written = os.write(self._journal_fd, data)
        except OSError as err:
            raise StateDirError(f"{self.journal_path}: cannot write the state: {err.strerror or err}") from err
        self._journal_bytes += written
        if written != len(data):  # a full disk: the cut record is ignored when read; say so now
            raise StateDirError(f"{self.journal_path}: cannot write the state: wrote {written} of {len(data)} bytes")
        self._unsaved = state

    def write_status(self, status: dict[str, Any]) -> None:
        _atomic_write(self.status_path, json.dumps(status, indent=2, sort_keys=True).encode())

    def read_status(self) -> dict[str, Any]:
        """The last status a sidecar wrote here (a JSON object; its shape is not checked).

        :raise NoStatus: no sidecar has written one here.
        :raise StateDirError: the file exists but cannot be read.
        :raise IncompatibleState: it is not a JSON object.
        """
        try:
            raw = self.status_path.read_bytes()
        except FileNotFoundError:
            raise NoStatus(f"no sidecar status in {self.directory} (has qmp-sdei run here?)") from None
        except OSError as err:
            raise StateDirError(f"{self.status_path}: cannot read: {err.strerror or err}") from err
        try:
            doc = json.loads(raw)
        except ValueError as err:  # also UnicodeDecodeError
            raise IncompatibleState(f"{self.status_path}: damaged status file ({err})") from err
        if not isinstance(doc, dict):
            raise IncompatibleState(f"{self.status_path}: damaged status file (not a JSON object)")
        return doc
