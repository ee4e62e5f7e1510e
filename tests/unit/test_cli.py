"""The command line against bad input, in process: one-line errors with documented exit codes.

Each case here came from the fault sweep of the operator-facing surface (configs, state and status
files); none may end in a traceback, and none may change anything on disk.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmp_sdei.cli import main
from qmp_sdei.errors import ExitCode
from qmp_sdei.sdei import Dispatcher, EventSpec
from qmp_sdei.statefile import StateStore, StoredState, VmIdentity
from qmp_sdei.versions import VersionPins


@pytest.fixture(autouse=True)
def keep_root_logging() -> Iterator[None]:
    """``run`` reconfigures the root logger; later tests must not inherit that."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def write_config(tmp_path: Path, text: str, name: str = "vm.toml") -> Path:
    path = tmp_path / name
    path.write_text(f'[qmp]\nsocket = "{tmp_path / "qmp.sock"}"\ntimeout = 0.2\n{text}')
    return path


def one_line_error(capsys: pytest.CaptureFixture[str], code: int, expected: int, *words: str) -> str:
    err = capsys.readouterr().err
    assert code == expected, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qmp-sdei: ")
    for word in words:
        assert word in lines[0]
    return lines[0]


def check_and_run(tmp_path: Path, capsys: pytest.CaptureFixture[str], config: Path, *words: str) -> None:
    """``check-config`` and ``run`` both refuse ``config`` with exit 2 and the same message."""
    checked = one_line_error(capsys, main(["check-config", str(config)]), ExitCode.CONFIG, *words)
    ran = one_line_error(capsys, main(["run", "--config", str(config)]), ExitCode.CONFIG, *words)
    assert checked == ran


# -- config files -------------------------------------------------------------------------------------


def test_config_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "vm.toml"
    path.write_bytes(b'[vm]\nname = "\xff\xfe"\n')
    check_and_run(tmp_path, capsys, path, "vm.toml: not UTF-8 text (byte 0xff at offset 13)")


def test_nul_in_a_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, '[vm]\nstate_dir = "/tmp/x\\u0000y"\n')
    check_and_run(tmp_path, capsys, config, "vm.state_dir: contains a NUL character")


def test_gdb_address_without_a_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, '[conduit]\nenabled = true\ngdb = "tcp:nohost"\ntrap_sites = [0x1000]\n')
    check_and_run(tmp_path, capsys, config, "conduit.gdb: must be tcp:HOST:PORT")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[sdei]\nevents = [{ number = 0x40010002 }]\n", "reserved for INTERRUPT_BIND"),
        ("[sdei]\nversion = ' 1.1'\n", "sdei.version: SDEI version ' 1.1' is not of the form MAJOR.MINOR"),
    ],
)
def test_config_checks_run_would_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, words: str
) -> None:
    check_and_run(tmp_path, capsys, write_config(tmp_path, text), words)


def test_infinite_timeout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "vm.toml"
    path.write_text(f'[qmp]\nsocket = "{tmp_path / "qmp.sock"}"\ntimeout = inf\n')
    check_and_run(tmp_path, capsys, path, "qmp.timeout: must be a finite number of seconds")


def test_guest_elf_missing_or_not_elf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = write_config(tmp_path, f'[conduit]\nenabled = true\nelf = "{tmp_path / "nope.elf"}"\n')
    check_and_run(tmp_path, capsys, missing, "nope.elf", "No such file")
    not_elf = write_config(tmp_path, f'[conduit]\nenabled = true\nelf = "{missing}"\n', "other.toml")
    check_and_run(tmp_path, capsys, not_elf, f"{missing}: not an ELF file")


def test_listen_socket_in_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "vm.toml"
    path.write_text(f'[qmp]\nsocket = "{tmp_path / "no" / "q.sock"}"\nmode = "listen"\ntimeout = 0.2\n')
    check_and_run(tmp_path, capsys, path, "qmp.socket: cannot listen at", "is not a directory")


# -- the state directory -----------------------------------------------------------------------------


def state_dir_config(tmp_path: Path, state_dir: Path | str) -> Path:
    return write_config(tmp_path, f'[vm]\nstate_dir = "{state_dir}"\n')


@pytest.mark.parametrize(
    ("state_dir", "words"),
    [
        ("{tmp}/afile", "state directory {tmp}/afile: is not a directory"),
        ("{tmp}/afile/sub", "state directory {tmp}/afile/sub: cannot be created: {tmp}/afile is not a directory"),
        ("/proc/qmp-sdei", "state directory /proc/qmp-sdei: is under /proc"),
        ("/proc/self", "is under /proc"),
        ("/sys/fs/qmp-sdei", "state directory /sys/fs/qmp-sdei: is under /sys"),
    ],
)
def test_unusable_state_dir_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], state_dir: str, words: str
) -> None:
    (tmp_path / "afile").write_text("not a directory")
    config = state_dir_config(tmp_path, state_dir.format(tmp=tmp_path))
    check_and_run(tmp_path, capsys, config, words.format(tmp=tmp_path))
    assert (tmp_path / "afile").read_text() == "not a directory"


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a read-only tmpfs (needs root, or the test is skipped)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "qmp-sdei-test", str(mount)], capture_output=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_state_dir_on_a_read_only_file_system(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], read_only_dir: Path
) -> None:
    check_and_run(tmp_path, capsys, state_dir_config(tmp_path, read_only_dir), "is on a read-only file system")
    below = read_only_dir / "vm1"
    check_and_run(
        tmp_path, capsys, state_dir_config(tmp_path, below), f"{below} (its nearest existing parent {read_only_dir})"
    )


def test_check_config_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "new" / "state"
    assert main(["check-config", str(state_dir_config(tmp_path, state))]) == ExitCode.OK
    assert "ok (1 event(s), state in" in capsys.readouterr().out
    assert not (tmp_path / "new").exists()


def _saved_state(directory: Path, blob: bytes | None = None) -> Path:
    dispatcher = Dispatcher(events=[EventSpec(1000)], mpidrs=[0])
    store = StateStore(directory)
    directory.mkdir(parents=True, exist_ok=True)
    store.save(StoredState(VmIdentity("u", "vm"), VersionPins((1, 1), 0, (1, 0)), blob or dispatcher.snapshot()))
    return store.state_path


def test_corrupt_snapshot_names_the_state_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    path = _saved_state(state)
    doc = json.loads(path.read_text())
    blob = bytearray(base64.b64decode(doc["dispatcher"]))
    blob[-1] ^= 0x40
    doc["dispatcher"] = base64.b64encode(bytes(blob)).decode()
    path.write_text(json.dumps(doc))
    before = path.read_bytes()
    config = state_dir_config(tmp_path, state)
    words = (f"{path}: damaged dispatcher snapshot", "checksum")
    one_line_error(capsys, main(["check-config", str(config)]), ExitCode.STATE, *words)
    one_line_error(capsys, main(["run", "--config", str(config)]), ExitCode.STATE, *words)
    assert path.read_bytes() == before


def test_good_state_passes_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _saved_state(tmp_path / "state")
    assert main(["check-config", str(state_dir_config(tmp_path, tmp_path / "state"))]) == ExitCode.OK


# -- status ---------------------------------------------------------------------------------------------


def test_status_without_a_status_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["status", "--state-dir", str(tmp_path)])
    one_line_error(capsys, code, ExitCode.NO_STATUS, f"no sidecar status in {tmp_path}")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"[1, 2]", "damaged status file (not a JSON object)"),
        (b"{", "damaged status file"),
        (b"\xff\xfe\x00", "damaged status file"),
    ],
)
def test_status_file_damaged(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, words: str) -> None:
    (tmp_path / "status.json").write_bytes(content)
    for extra in ([], ["--json"]):
        code = main(["status", "--state-dir", str(tmp_path), *extra])
        one_line_error(capsys, code, ExitCode.STATE, str(tmp_path / "status.json"), words)


WRONG_SHAPES = [
    {"sidecar": 5},
    {"sidecar": {"pid": "x"}, "updated": "yesterday"},
    {"vm": [], "pins": {"sdei": 1, "sdei_vendor": "x"}},
    {"sdei": {"vcpus": [3, {"index": "x", "mpidr": None, "events": {"1": 5}}]}},
    {"sdei": {"vcpus": {"0": 1}, "shared": {"2": {"state": 9}}, "pending": "x"}},
    {"sdei": "x", "counters": 7},
    {"sdei": {"vcpus": [{"index": 0, "mpidr": 0, "masked": "yes", "running": 1, "events": []}]}},
]


@pytest.mark.parametrize("doc", WRONG_SHAPES)
def test_status_of_the_wrong_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: dict[str, object]) -> None:
    (tmp_path / "status.json").write_text(json.dumps(doc))
    code = main(["status", "--state-dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == ExitCode.STATE, captured.err
    assert captured.out.startswith("sidecar   not running")  # what could be read is still shown
    (line,) = captured.err.splitlines()
    assert line.startswith(f"qmp-sdei: {tmp_path / 'status.json'}: unexpected content: ")
    assert main(["status", "--state-dir", str(tmp_path), "--json"]) == ExitCode.OK  # JSON passes it on


def test_status_of_the_right_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = {
        "sidecar": {"pid": 42},
        "updated": 0,
        "shutdown_reason": "SIGTERM",
        "vm": {"name": "vm1", "uuid": None, "runstate": "running", "qemu": "7.2.0", "machine": "virt"},
        "pins": {"sdei": "1.1", "sdei_vendor": 0, "psci": "1.0"},
        "sdei": {
            "profile": "tf-a",
            "vcpus": [{"index": 0, "mpidr": 0, "masked": False, "running": [], "events": {"1000": {"state": "x"}}}],
            "shared": {},
            "pending": [],
        },
        "counters": {"resets": 1},
    }
    (tmp_path / "status.json").write_text(json.dumps(doc))
    assert main(["status", "--state-dir", str(tmp_path)]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "not running (pid 42" in out and "last: SIGTERM" in out
    assert "vcpu 0    mpidr 0x0 unmasked; 1000:x" in out
    assert "counters  resets=1" in out


# -- bugs ---------------------------------------------------------------------------------------------


def test_internal_error_logs_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(path: object) -> None:
        raise RuntimeError("a bug in the loader")

    monkeypatch.setattr("qmp_sdei.cli.load", broken)
    assert main(["check-config", str(tmp_path / "vm.toml")]) == ExitCode.INTERNAL
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "internal error" in record.getMessage()
    assert record.exc_info is not None and "a bug in the loader" in str(record.exc_info[1])


def test_exit_codes_are_distinct() -> None:
    assert len({int(code) for code in ExitCode}) == len(ExitCode)
    assert os.EX_OK == ExitCode.OK
