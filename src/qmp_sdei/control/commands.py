"""The control API's one command layer: JSON requests in, JSON replies out, for every transport.

The local socket and MQTT only move bytes; everything a request means is decided here, so both
transports answer the same request the same way. Requests are validated against the schema shipped
in ``schemas/request.v1.json`` before anything runs, and a request that fails any check gets an
error reply with a machine-readable code and changes nothing.

Commands (version 1):

* ``raise {event, vcpu?, wait?}`` -> what SDEI made of it: ``delivered`` (a handler was entered),
  ``pending`` (with why), or ``refused`` (with why). The only command that changes SDEI state.
* ``status`` -> the sidecar's status document (VM, pins, per-vCPU state, counters).
* ``event {number}`` -> one event's state, per vCPU for a private event.
* ``catalogue`` -> the fixed event set. No command adds or removes events.
* ``migrate {uri, peer?}`` -> migrate the VM there (its destination QEMU listens, its sidecar runs)
  and report the phases, total time and downtime; ``outcome`` is ``completed`` only when the
  destination confirmed. ``peer`` names the destination sidecar's control endpoint when the state
  travels over the control API (the fallback for a QEMU without ``dbus-vmstate``).
* ``incoming-state {state}`` -> a destination sidecar takes the SDEI state of the VM migrating to
  it (base64 of the migration payload) and validates it exactly as QEMU's ``Load`` would: it is
  adopted (``accepted``) or refused (``state_refused``, with why), changing nothing. It is the one
  request allowed to be larger than ``MAX_REQUEST_BYTES`` (up to ``MAX_STATE_REQUEST_BYTES``).

It must not know about sockets or brokers, and it never touches the dispatcher itself: everything
goes through the :class:`~qmp_sdei.owner.SdeiOwner`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import jsonschema

from qmp_sdei import __version__
from qmp_sdei.errors import SdeiError
from qmp_sdei.owner import SdeiOwner

log = logging.getLogger("qmp_sdei.control")

PROTOCOL_VERSION = 1
#: Largest request accepted on any transport, in bytes.
MAX_REQUEST_BYTES = 64 * 1024
#: Largest ``incoming-state`` request: a migration payload of up to 1 MiB (QEMU's dbus-vmstate
#: limit, kept for the control transport too) in base64, with room for the JSON around it.
MAX_STATE_REQUEST_BYTES = 1_500_000 + 4096
#: The command that carries a migration's state (and may be up to MAX_STATE_REQUEST_BYTES).
STATE_COMMAND = "incoming-state"
#: Requests being served at once across all clients; more are answered ``busy`` at once.
MAX_IN_FLIGHT = 64

StatusProvider = Callable[[], dict[str, Any]]
MigrateFn = Callable[[str, str | None], Awaitable[dict[str, Any]]]
ReceiveStateFn = Callable[[bytes, str | None], Awaitable[dict[str, Any]]]


class CommandError(Exception):
    """A request that cannot be served; becomes an error reply with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@cache
def schema(name: str) -> dict[str, Any]:
    """One of the shipped JSON Schemas: ``request``, ``reply`` or ``notification``."""
    text = resources.files("qmp_sdei.control").joinpath(f"schemas/{name}.v1.json").read_text()
    doc: dict[str, Any] = json.loads(text)
    return doc


@cache
def _request_validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema("request"))


def parse_request(raw: bytes | str) -> dict[str, Any]:
    """Decode and validate one request. :raise CommandError: with the reply's error code.

    Only ``incoming-state`` may be larger than ``MAX_REQUEST_BYTES``; the transports read up to
    ``MAX_STATE_REQUEST_BYTES`` and leave the rest of the check to this function.
    """
    if len(raw) > MAX_STATE_REQUEST_BYTES:
        limit = f"the limit is {MAX_REQUEST_BYTES} ({MAX_STATE_REQUEST_BYTES} for {STATE_COMMAND})"
        raise CommandError("too_large", f"request of {len(raw)} bytes; {limit}")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise CommandError("bad_json", f"not JSON: {err}") from None
    except RecursionError:
        raise CommandError("bad_json", "not JSON: nested too deeply") from None
    command = doc.get("command") if isinstance(doc, dict) else None
    if len(raw) > MAX_REQUEST_BYTES and command != STATE_COMMAND:
        raise CommandError("too_large", f"request of {len(raw)} bytes; the limit is {MAX_REQUEST_BYTES}")
    if not isinstance(doc, dict):
        raise CommandError("bad_request", "a request is a JSON object")
    if isinstance(command, str) and command not in schema("request")["properties"]["command"]["enum"]:
        raise CommandError("unknown_command", f"unknown command {command!r}")
    error = jsonschema.exceptions.best_match(_request_validator().iter_errors(doc))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "request"
        raise CommandError("bad_request", f"{where}: {error.message}")
    return doc


def reply(request_id: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}


def error_reply(request_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": {"code": code, "message": message}}


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _request_id(raw: bytes | str) -> Any:
    """The id of a request that failed validation, if one can be read, so the reply can echo it."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    ident = doc.get("id") if isinstance(doc, dict) else None
    return ident if isinstance(ident, str | int) and not isinstance(ident, bool) else None


@dataclass
class ControlStats:
    requests: int = 0
    errors: int = 0
    busy: int = 0


class ControlService:
    """Serves requests for one VM; shared by every transport.

    :param status: builds the status document (the program layer knows the VM and the counters).
    """

    def __init__(
        self,
        owner: SdeiOwner,
        status: StatusProvider,
        *,
        vm_name: str,
        migrate: MigrateFn | None = None,
        receive_state: ReceiveStateFn | None = None,
    ) -> None:
        self.owner = owner
        self._status = status
        self._migrate = migrate
        self._receive_state = receive_state
        self.vm_name = vm_name
        self.stats = ControlStats()
        self._in_flight = 0

    async def handle(self, raw: bytes | str, *, only: Collection[str] | None = None) -> dict[str, Any]:
        """One request to one reply document; never raises for bad input.

        :param only: the commands this transport serves (all when ``None``); any other gets
            ``unknown_command``.
        """
        self.stats.requests += 1
        if self._in_flight >= MAX_IN_FLIGHT:
            self.stats.busy += 1
            return error_reply(_request_id(raw), "busy", f"more than {MAX_IN_FLIGHT} requests in flight; retry later")
        self._in_flight += 1
        try:
            try:
                request = parse_request(raw)
            except CommandError as err:
                self.stats.errors += 1
                return error_reply(_request_id(raw), err.code, str(err))
            request_id = request.get("id")
            if only is not None and request["command"] not in only:
                self.stats.errors += 1
                served = ", ".join(sorted(only))
                return error_reply(request_id, "unknown_command", f"only {served} is served here")
            try:
                return reply(request_id, await self.execute(request))
            except CommandError as err:
                self.stats.errors += 1
                return error_reply(request_id, err.code, str(err))
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a bug: answer, log the traceback, keep serving
                self.stats.errors += 1
                log.exception("control request %s failed", request.get("command"))
                return error_reply(request_id, "internal", f"internal error: {err}")
        finally:
            self._in_flight -= 1

    async def execute(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run a validated request. :raise CommandError:"""
        command = request["command"]
        owner = self.owner
        if command == "raise":
            wait = float(request.get("wait", 5.0))
            outcome = await owner.raise_event(request["event"], request.get("vcpu"), wait=wait)
            return outcome.to_dict()
        if command == "status":
            return await owner.submit(self.status_document)
        if command == "catalogue":
            return await owner.submit(lambda: {"count": len(owner.catalogue()), "events": owner.catalogue()})
        if command == "event":
            number = request["number"]
            if not owner.dispatcher.has_event(number):
                raise CommandError("unknown_event", f"event {number} is not in the catalogue")
            return await owner.submit(lambda: owner.event_view(number))
        if command == "migrate":
            if self._migrate is None:
                raise CommandError("unavailable", "this sidecar cannot drive migrations")
            try:
                return await self._migrate(request["uri"], request.get("peer"))
            except SdeiError as err:
                raise CommandError("migration_refused", str(err)) from err
        if command == STATE_COMMAND:
            if self._receive_state is None:
                raise CommandError("unavailable", "this sidecar cannot take a migration's state")
            try:
                blob = base64.b64decode(request["state"], validate=True)
            except (binascii.Error, ValueError) as err:
                raise CommandError("bad_request", f"state: not base64: {err}") from None
            try:
                return await self._receive_state(blob, request.get("source"))
            except SdeiError as err:
                raise CommandError("state_refused", str(err)) from err
        raise CommandError("unknown_command", f"{command!r} is not served here")

    def status_document(self) -> dict[str, Any]:
        """The status document plus the read-only queries KVM's SDEI series offered its VMM."""
        doc = self._status()
        owner = self.owner
        doc["implementation"] = {"name": "qmp-sdei", "version": __version__}
        doc["exposed"] = {"count": len(owner.catalogue()), "events": [e["number"] for e in owner.catalogue()]}
        doc["registered"] = owner.registered()
        doc["vcpu_state"] = owner.vcpu_views()
        doc.setdefault("vm_name", self.vm_name)
        return doc


def notification_document(item: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, **item}
