"""``check-config`` against random TOML documents that break the schema in one place.

Each document starts valid and gets one fault: a key holding a value of another TOML type, a value
of the right type outside what the key allows, a section that is not a table, or an unknown key.
Whatever the fault, ``check-config`` must exit 2 with exactly one line on stderr and no traceback.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import logging
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmp_sdei.cli import main
from qmp_sdei.errors import ExitCode

# -- writing TOML ------------------------------------------------------------------------------------


def toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or char == "\x7f":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def toml_document(doc: dict[str, Any]) -> str:
    scalars = [f"{toml_string(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    tables = []
    for name, table in doc.items():
        if isinstance(table, dict):
            tables.append(f"[{toml_string(name)}]")
            tables.extend(f"{toml_string(k)} = {toml_value(v)}" for k, v in table.items())
    return "\n".join(scalars + tables) + "\n"


# -- the schema: a valid document, and what breaks each key ------------------------------------------

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
TEXT = st.text(max_size=12)
DATES = st.one_of(
    st.datetimes(timezones=st.just(datetime.UTC)),
    st.datetimes(),
    st.dates(),
    st.times(),
)
SCALARS: dict[str, st.SearchStrategy[Any]] = {
    "str": TEXT,
    "int": INT64,
    "float": FLOATS,
    "bool": st.booleans(),
    "date": DATES,
}
ANY_VALUE = st.recursive(
    st.one_of(*SCALARS.values()),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def other_types(*allowed: str) -> st.SearchStrategy[Any]:
    """Any TOML value whose type is not one of ``allowed`` ("str", "int", "float", "bool", "list", "table")."""
    options = [s for name, s in SCALARS.items() if name not in allowed]
    if "list" not in allowed:
        options.append(st.lists(ANY_VALUE, max_size=3))
    if "table" not in allowed:
        options.append(st.dictionaries(st.text(max_size=5), ANY_VALUE, max_size=3))
    return st.one_of(*options)


def text_except(*good: str) -> st.SearchStrategy[str]:
    return TEXT.filter(lambda s: s not in good)


WITH_NUL = st.builds(lambda a, b: f"{a}\0{b}", TEXT, TEXT)


def valid_document(tmp: Path) -> dict[str, Any]:
    return {
        "vm": {"name": "vm1", "state_dir": str(tmp / "state")},
        "qmp": {"socket": str(tmp / "qmp.sock"), "mode": "connect", "timeout": 5},
        "sdei": {
            "version": "1.1",
            "vendor": 0,
            "profile": "tf-a",
            "bind_slots": [1, 1],
            "events": [{"number": 1000, "type": "private", "priority": "normal", "name": "ras"}],
        },
        "psci": {"version": "auto"},
        "conduit": {"enabled": False, "gdb": "", "trap_sites": [0x1000], "start_vm": False},
        "log": {"level": "info", "format": "text"},
    }


#: (section, key) -> values that are wrong for it: other types, then bad values of the right type.
BAD_VALUES: dict[tuple[str, str], st.SearchStrategy[Any]] = {
    ("vm", "name"): other_types("str") | WITH_NUL,
    ("vm", "state_dir"): other_types("str")
    | WITH_NUL
    | st.sampled_from(["/proc/qmp-sdei", "/sys/qmp-sdei", "{tmp}/a-file", "{tmp}/a-file/below"]),
    ("qmp", "socket"): other_types("str")
    | WITH_NUL
    | st.sampled_from(
        ["", "unix:", "tcp:", "tcp:host", "tcp::1", "tcp:h:0", "tcp:h:65536", "tcp:h:x", "/" + "s" * 200]
    ),
    ("qmp", "mode"): other_types("str") | text_except("connect", "listen"),
    ("qmp", "timeout"): other_types("int", "float")
    | st.floats(max_value=0)
    | st.integers(max_value=0)
    | st.sampled_from([math.inf, -math.inf, math.nan]),
    ("sdei", "version"): other_types("str") | text_except("latest", "1.0", "1.1"),
    ("sdei", "vendor"): other_types("int") | st.integers(max_value=-1) | st.integers(min_value=2**32),
    ("sdei", "profile"): other_types("str") | text_except("tf-a", "kvm"),
    ("sdei", "bind_slots"): other_types("list")
    | st.lists(st.integers(0, 9), max_size=5).filter(lambda v: len(v) != 2)
    | st.tuples(st.integers(), st.integers()).map(list).filter(lambda v: not all(0 <= n <= 0xFFFF for n in v))
    | st.tuples(other_types("int"), st.integers(0, 3)).map(list),
    ("sdei", "events"): other_types("list")
    | st.lists(other_types("table"), min_size=1, max_size=2)
    | st.sampled_from(
        [
            [{}],
            [{"number": -1}],
            [{"number": 2**31}],
            [{"number": 0x4000_0000}],
            [{"number": 0x4001_FFFF}],
            [{"number": 7}, {"number": 7}],
            [{"number": 0, "type": "shared"}],
            [{"number": 0, "priority": "critical"}],
            [{"number": 5, "type": "global"}],
            [{"number": 5, "priority": "high"}],
            [{"number": 5, "colour": "blue"}],
            [{"number": True}],
            [{"number": 5, "name": 5}],
        ]
    ),
    ("psci", "version"): other_types("str") | text_except("auto", "0.2", "1.0", "1.1"),
    ("conduit", "enabled"): other_types("bool"),
    ("conduit", "gdb"): other_types("str")
    | WITH_NUL
    | st.sampled_from(["1234", "tcp:", "tcp:host", "tcp::1234", "tcp:h:0", "tcp:h:70000", "udp:h:1", "tcp:h:1x"]),
    ("conduit", "elf"): other_types("str") | WITH_NUL | st.sampled_from(["{tmp}/missing.elf", "{tmp}/a-file", "{tmp}"]),
    ("conduit", "kernel"): other_types("str") | WITH_NUL | st.sampled_from(["{tmp}/missing-Image", "{tmp}"]),
    ("conduit", "trap_sites"): other_types("list")
    | st.lists(
        st.integers(min_value=-(2**63), max_value=-1) | st.integers(0, 2**40).filter(lambda a: a % 4), min_size=1
    )
    | st.lists(other_types("int"), min_size=1, max_size=2),
    ("conduit", "start_vm"): other_types("bool"),
    ("log", "level"): other_types("str") | text_except("debug", "info", "warning", "error"),
    ("log", "format"): other_types("str") | text_except("text", "json"),
}
SECTIONS = ("vm", "qmp", "sdei", "psci", "conduit", "log")


@st.composite
def broken_documents(draw: st.DrawFn) -> tuple[str, Any]:
    """A fault to apply: ("key", (section, key, value)) | ("section", (section, value)) | ("unknown", ...)."""
    kind = draw(st.sampled_from(["key", "key", "key", "section", "unknown"]))
    if kind == "key":
        section, key = draw(st.sampled_from(sorted(BAD_VALUES)))
        return kind, (section, key, draw(BAD_VALUES[(section, key)]))
    if kind == "section":
        return kind, (draw(st.sampled_from(SECTIONS)), draw(other_types("table")))
    where = draw(st.sampled_from(("", *SECTIONS)))
    known = {"", *SECTIONS} if where == "" else set(valid_document(Path("/"))[where]) | {"elf", "kernel"}
    return kind, (where, draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in known)), draw(ANY_VALUE))


def apply_fault(doc: dict[str, Any], fault: tuple[str, Any], tmp: Path) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    kind, what = fault
    if kind == "key":
        section, key, value = what
        if isinstance(value, str):
            value = value.replace("{tmp}", str(tmp))
        doc[section][key] = value
        if section == "conduit" and key in ("elf", "kernel"):
            doc["conduit"]["enabled"] = True  # images are read only for an enabled conduit
    elif kind == "section":
        section, value = what
        doc[section] = value
    else:
        section, key, value = what
        (doc if section == "" else doc[section])[key] = value
    return doc


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qmp-sdei-fuzz-") as name:
        tmp = Path(name)
        (tmp / "a-file").write_text("not a directory, not an ELF")
        yield tmp


@pytest.fixture(autouse=True)
def keep_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def check_config(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check-config", str(path)])
    return code, out.getvalue(), err.getvalue()


def test_the_valid_document_is_valid() -> None:
    """The fuzz starts from a document check-config accepts: every fault below is what fails."""
    with scratch() as tmp:
        path = tmp / "vm.toml"
        path.write_text(toml_document(valid_document(tmp)))
        code, out, err = check_config(path)
        assert (code, err) == (ExitCode.OK, ""), err
        assert "ok (2 event(s)" in out


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(fault=broken_documents())
def test_check_config_refuses_every_broken_document(fault: tuple[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    with scratch() as tmp:
        path = tmp / "vm.toml"
        path.write_text(toml_document(apply_fault(valid_document(tmp), fault, tmp)), encoding="utf-8")
        caplog.clear()
        code, out, err = check_config(path)
    assert "Traceback" not in err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "an internal error was logged"
    assert code == ExitCode.CONFIG, (code, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qmp-sdei: ")
