"""The control API over the local unix socket: a real socket, a real owner and dispatcher.

The bare-metal guest test at the end runs the whole sidecar under QEMU and raises the guest's host
events through the socket (and once through the ``qmp-sdei raise`` command), watching the
notifications the guest's calls produce.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmp_sdei.control.commands import MAX_REQUEST_BYTES, ControlService, schema
from qmp_sdei.control.local import MAX_CLIENTS, LocalControlClient, LocalControlServer
from qmp_sdei.errors import ControlError
from qmp_sdei.owner import SdeiOwner
from qmp_sdei.versions import VersionPins
from support.sdei import PRIVATE, SHARED, make, register

pytestmark = pytest.mark.asyncio

REPLY = jsonschema.Draft202012Validator(schema("reply"))
NOTIFICATION = jsonschema.Draft202012Validator(schema("notification"))
TIMEOUT = 30.0


@contextlib.asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[tuple[LocalControlServer, SdeiOwner]]:
    owner = SdeiOwner(make(), pins=VersionPins((1, 1), 0, (1, 0)))
    service = ControlService(owner, lambda: {"sidecar": {"pid": os.getpid()}}, vm_name="unit-vm")
    server = LocalControlServer(service, tmp_path / "control.sock")
    task = asyncio.create_task(server.serve(), name="test.control")
    try:
        await asyncio.wait_for(server.ready.wait(), TIMEOUT)
        yield server, owner
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert not server.path.exists(), "the socket is removed when the server stops"


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[LocalControlServer, SdeiOwner]]:
    async with serving(tmp_path) as pair:
        yield pair


async def raw_exchange(path: Path, payload: bytes, replies: int = 1) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
    try:
        writer.write(payload)
        await writer.drain()
        docs = [json.loads(await asyncio.wait_for(reader.readline(), TIMEOUT)) for _ in range(replies)]
    finally:
        writer.close()
    for doc in docs:
        REPLY.validate(doc)
    return docs


async def test_socket_is_owner_only(server: tuple[LocalControlServer, SdeiOwner]) -> None:
    mode = stat.S_IMODE(server[0].path.stat().st_mode)
    assert mode == 0o600, oct(mode)


async def test_queries_and_raises(server: tuple[LocalControlServer, SdeiOwner]) -> None:
    srv, owner = server
    register(owner.dispatcher, 1, PRIVATE, unmask=False)
    async with LocalControlClient(srv.path) as client:
        catalogue = await client.request({"v": 1, "id": 1, "command": "catalogue"})
        assert catalogue["id"] == 1 and catalogue["ok"]
        assert [e["number"] for e in catalogue["result"]["events"]] == [0, 1000, 1001, 2000, 2001]
        status = (await client.request({"v": 1, "command": "status"}))["result"]
        assert status["implementation"]["name"] == "qmp-sdei"
        assert status["exposed"]["count"] == 5
        assert status["registered"] == {"count": 1, "shared": [], "private": {"0": [], "1": [PRIVATE]}}
        assert status["vcpu_state"][1] == {"index": 1, "mpidr": 1, "masked": True, "running": [], "depth": 0}
        event = (await client.request({"v": 1, "command": "event", "number": PRIVATE}))["result"]
        assert [v["state"] for v in event["vcpus"]] == ["unregistered", "enabled"]
        raised = await client.request({"v": 1, "command": "raise", "event": PRIVATE, "vcpu": 1})
        assert raised["result"] == {
            "result": "pending", "event": PRIVATE, "vcpu": 1, "code": "masked", "reason": "target vCPU is masked",
        }  # fmt: skip
        refused = await client.request({"v": 1, "command": "raise", "event": SHARED})
        assert refused["result"]["code"] == "not_registered"
        unknown = await client.request({"v": 1, "id": "x", "command": "event", "number": 7})
        assert unknown == {
            "v": 1,
            "id": "x",
            "ok": False,
            "error": {"code": "unknown_event", "message": unknown["error"]["message"]},
        }
    assert owner.dispatcher.pending == {(1, PRIVATE)}


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"not json\n", "bad_json"),
        (b"[1, 2]\n", "bad_request"),
        (b'{"v": 1, "command": "reboot"}\n', "unknown_command"),
        (b'{"v": 2, "command": "status"}\n', "bad_request"),
        (b'{"v": 1, "command": "raise"}\n', "bad_request"),
        (b'{"v": 1, "command": "raise", "event": "1000"}\n', "bad_request"),
        (b'{"v": 1, "command": "raise", "event": 1000, "vcpu": -1}\n', "bad_request"),
        (b'{"v": 1, "command": "raise", "event": 1000, "extra": 1}\n', "bad_request"),
        (b'{"v": 1, "command": "status", "event": 1000}\n', "bad_request"),
        (b"\xff\xfe\n", "bad_json"),
    ],
)
async def test_bad_requests_get_error_codes_and_change_nothing(
    server: tuple[LocalControlServer, SdeiOwner], line: bytes, code: str
) -> None:
    srv, owner = server
    before = owner.dispatcher.snapshot()
    [reply] = await raw_exchange(srv.path, line)
    assert reply["ok"] is False and reply["error"]["code"] == code, reply
    assert owner.dispatcher.snapshot() == before


async def test_an_oversized_line_is_refused_and_the_connection_stays_usable(
    server: tuple[LocalControlServer, SdeiOwner],
) -> None:
    srv, _ = server
    huge = b'{"v": 1, "command": "status", "pad": "' + b"x" * (2 * MAX_REQUEST_BYTES) + b'"}\n'
    too_large, status = await raw_exchange(srv.path, huge + b'{"v": 1, "id": 2, "command": "status"}\n', replies=2)
    assert too_large["error"]["code"] == "too_large"
    assert status["ok"] and status["id"] == 2


async def test_many_requests_on_one_connection_are_answered_in_order(
    server: tuple[LocalControlServer, SdeiOwner],
) -> None:
    srv, _ = server
    lines = b"".join(b'{"v": 1, "id": %d, "command": "catalogue"}\n' % i for i in range(200))
    replies = await raw_exchange(srv.path, lines, replies=200)
    assert [r["id"] for r in replies] == list(range(200))


async def test_a_client_flood_is_refused_not_fatal(server: tuple[LocalControlServer, SdeiOwner]) -> None:
    srv, _ = server
    held = [await asyncio.open_unix_connection(str(srv.path)) for _ in range(MAX_CLIENTS)]
    try:
        # Each held client has been accepted once it answers a request.
        for reader, writer in held:
            writer.write(b'{"v": 1, "command": "catalogue"}\n')
            await writer.drain()
            assert json.loads(await asyncio.wait_for(reader.readline(), TIMEOUT))["ok"]
        [busy] = await raw_exchange(srv.path, b'{"v": 1, "command": "status"}\n')
        assert busy["error"]["code"] == "busy"
    finally:
        for _, writer in held:
            writer.close()
    async with LocalControlClient(srv.path) as client:  # healthy once they are gone
        for _ in range(100):
            reply = await client.request({"v": 1, "command": "status"})
            if reply["ok"]:
                break
            assert reply["error"]["code"] == "busy"
            await asyncio.sleep(0.01)  # the server notices closed clients asynchronously
        assert reply["ok"]


async def test_watch_streams_notifications(server: tuple[LocalControlServer, SdeiOwner]) -> None:
    srv, owner = server
    register(owner, 0, PRIVATE, unmask=False)  # type: ignore[arg-type]  # published at once (no stop)
    async with LocalControlClient(srv.path) as watcher, LocalControlClient(srv.path) as client:
        await watcher.start_watch()
        stream = watcher.notifications()
        first = asyncio.ensure_future(anext(stream))
        raised = await client.request({"v": 1, "command": "raise", "event": PRIVATE, "vcpu": 0})
        assert raised["result"]["result"] == "pending"
        items = [await asyncio.wait_for(first, TIMEOUT), await asyncio.wait_for(anext(stream), TIMEOUT)]
    for item in items:
        NOTIFICATION.validate(item)
    assert [(i["kind"], i["event"], i["vcpu"]) for i in items] == [("raised", PRIVATE, 0), ("pending", PRIVATE, 0)]
    assert items[1]["reason"] == "target vCPU is masked"


async def test_no_sidecar_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no sidecar is listening"):
        async with LocalControlClient(tmp_path / "nothing.sock", timeout=2):
            pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payload=st.one_of(
        st.binary(min_size=1, max_size=300).filter(lambda b: b"\n" not in b and b.strip()),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
            max_leaves=12,
        ).map(lambda doc: json.dumps(doc).encode()),
        st.fixed_dictionaries(
            {"v": st.sampled_from([1, 2, "1"]), "command": st.sampled_from(["raise", "event", "status", "x"])},
            optional={
                "event": st.integers(-5, 1 << 33) | st.text(max_size=4),
                "vcpu": st.integers(-3, 10) | st.none(),
                "number": st.integers(-5, 3000),
                "id": st.integers() | st.text(max_size=5),
            },
        ).map(lambda doc: json.dumps(doc).encode()),
    )
)
async def test_fuzzed_payloads_get_schema_valid_replies(tmp_path: Path, payload: bytes) -> None:
    async with serving(tmp_path) as (srv, owner):
        before = owner.dispatcher.snapshot()
        [reply] = await raw_exchange(srv.path, payload.replace(b"\n", b" ") + b"\n")
        if not reply["ok"] or ("result" in reply["result"] and reply["result"]["result"] == "refused"):
            assert owner.dispatcher.snapshot() == before


# -- the whole sidecar and the bare-metal guest ------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.guest
async def test_host_events_through_the_socket_and_the_cli(tmp_path: Path, guest_elf: Path) -> None:
    from integration.test_baremetal_guest import HOST_EVENTS, check_all_steps  # noqa: PLC0415
    from qmp_sdei.config import parse  # noqa: PLC0415
    from qmp_sdei.control.local import socket_path  # noqa: PLC0415
    from support.guests import config_doc, elf_symbols, guest_vm  # noqa: PLC0415
    from support.sidecar import RunningSidecar, to_toml  # noqa: PLC0415

    async with guest_vm(tmp_path, guest_elf) as vm:
        doc = config_doc(vm, tmp_path / "state", guest_elf, start_vm=True)
        config_file = tmp_path / "vm.toml"
        config_file.write_text(to_toml(doc))
        running = RunningSidecar(parse(doc))
        try:
            await running.ready()
            sock = socket_path(tmp_path / "state")
            notes: list[dict[str, Any]] = []

            async def watch() -> None:
                async with LocalControlClient(sock) as watcher:
                    async for item in watcher.watch():
                        notes.append(item)

            watching = asyncio.create_task(watch())
            tags = list(HOST_EVENTS)
            async with LocalControlClient(sock) as client:
                for n, tag in enumerate(tags):
                    event, vcpu = HOST_EVENTS[tag]
                    await vm.wait_for_console(rf"WAIT {tag} {event}\r?\n", TIMEOUT)
                    if n == 0:  # once through the command line, as an operator would
                        args = ["raise", "--config", str(config_file), "--event", str(event), "--json"]
                        if vcpu is not None:
                            args += ["--vcpu", str(vcpu)]
                        result = await asyncio.to_thread(
                            subprocess.run, [sys.executable, "-m", "qmp_sdei", *args], capture_output=True, text=True
                        )
                        assert result.returncode == 0, result.stderr
                        reply = json.loads(result.stdout)
                    else:
                        request: dict[str, Any] = {"v": 1, "command": "raise", "event": event, "vcpu": vcpu}
                        reply = await client.request(request, timeout=TIMEOUT)
                    REPLY.validate(reply)
                    outcome = reply["result"]
                    assert outcome["result"] == "delivered" or outcome.get("code") == "busy", (tag, reply)
                await vm.wait_for_console(r"DONE\r?\n", TIMEOUT)
                status = await client.request({"v": 1, "command": "status"})
            check_all_steps(vm.console, elf_symbols(guest_elf))
            assert status["result"]["vm"]["name"] == "sidecar-conduit-test"
            assert status["result"]["counters"]["delivered"] >= len(tags)
            assert await vm.wait(TIMEOUT) == 0
            await asyncio.wait_for(running.task, TIMEOUT)
            await asyncio.wait_for(watching, TIMEOUT)  # the stream ends with the sidecar
        finally:
            if not running.task.done():
                await running.stop()
    for item in notes:
        NOTIFICATION.validate(item)
    kinds = [n["kind"] for n in notes]
    host_entries = [n for n in notes if n["kind"] == "entered" and n["event"] in (1000, 1001, 2000)]
    assert len(host_entries) >= len(tags), kinds
    assert kinds.count("completed") + kinds.count("completed_and_resumed") >= len(tags)
    assert "registered" in kinds and "unmasked" in kinds
