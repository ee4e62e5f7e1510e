"""The sidecar's state directory: what must survive a sidecar restart, and what ``status`` reads.

Files (all replaced atomically: written to a temporary file in the same directory, then renamed, so a
reader or a restarted sidecar sees either the old or the new version, never a torn one):

* ``state.json``: authoritative. The VM's identity (UUID, name), the pinned SDEI/PSCI versions, and
  the dispatcher snapshot (base64 of the format in ``sdei/snapshot.py``). Written after every state
  change, before the guest is let go, so a SIGKILLed sidecar loses nothing.
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
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmp_sdei.errors import IncompatibleState, SdeiError, StateDirBusy, VersionError
from qmp_sdei.versions import VersionPins

STATE_FILE = "state.json"
STATUS_FILE = "status.json"
LOCK_FILE = "lock"
STATE_FORMAT = 1


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


class StateStore:
    """One VM's state directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock_fd: int | None = None

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    @property
    def status_path(self) -> Path:
        return self.directory / STATUS_FILE

    def acquire(self) -> None:
        """Create the directory and take its lock. :raise StateDirBusy: another sidecar runs."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise SdeiError(f"state directory {self.directory}: {err.strerror}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirBusy(f"state directory {self.directory} is in use by another qmp-sdei") from None
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def writer_alive(self) -> bool:
        """True if some process holds the lock (a sidecar is serving this VM)."""
        try:
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def load(self) -> StoredState | None:
        """The saved state, or None if there is none. :raise IncompatibleState: unreadable/damaged."""
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise IncompatibleState(f"{self.state_path}: cannot read: {err.strerror}") from err
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
                raise IncompatibleState(f"{self.state_path}: unknown state file format {doc.get('format')!r}")
            vm = doc["vm"]
            identity = VmIdentity(uuid=vm.get("uuid"), name=vm.get("name"))
            pins = VersionPins.from_dict(doc["pins"])
            snapshot = base64.b64decode(doc["dispatcher"], validate=True)
        except IncompatibleState:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error, VersionError) as err:
            raise IncompatibleState(f"{self.state_path}: damaged state file ({err})") from err
        return StoredState(identity, pins, snapshot)

    def save(self, state: StoredState) -> None:
        doc = {
            "format": STATE_FORMAT,
            "vm": {"uuid": state.identity.uuid, "name": state.identity.name},
            "pins": state.pins.to_dict(),
            "dispatcher": base64.b64encode(state.snapshot).decode(),
        }
        _atomic_write(self.state_path, json.dumps(doc, indent=1).encode())

    def write_status(self, status: dict[str, Any]) -> None:
        _atomic_write(self.status_path, json.dumps(status, indent=2, sort_keys=True).encode())

    def read_status(self) -> dict[str, Any]:
        """:raise SdeiError: no status (the sidecar never ran here) or an unreadable one."""
        try:
            doc = json.loads(self.status_path.read_text())
        except FileNotFoundError:
            raise SdeiError(f"no sidecar status in {self.directory} (has qmp-sdei run here?)") from None
        except (OSError, ValueError) as err:
            raise SdeiError(f"{self.status_path}: unreadable status ({err})") from err
        if not isinstance(doc, dict):
            raise SdeiError(f"{self.status_path}: unreadable status")
        return doc
