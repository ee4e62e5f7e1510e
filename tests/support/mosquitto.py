"""A real mosquitto broker for the MQTT tests: free loopback port, temp config, always stopped.

Plain, TLS (certificates made here with the openssl CLI) and password + ACL brokers. Readiness is a
real signal: the listening port accepts a TCP connection (checked with a deadline, while the
process is alive). The broker can be killed and started again on the same port mid-test.
"""

from __future__ import annotations

import contextlib
import getpass
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
requires_mosquitto = pytest.mark.skipif(
    not Path(MOSQUITTO).exists() or shutil.which("openssl") is None,
    reason="mosquitto (Debian package mosquitto) and openssl are needed",
)

#: the ACL the repository ships, used as is by the access tests
EXAMPLE_ACL = Path(__file__).resolve().parents[2] / "examples" / "mosquitto" / "acl"
START_TIMEOUT = 15.0


@dataclass(frozen=True)
class Certs:
    """A test CA, a broker certificate for 127.0.0.1/localhost signed by it, and an unrelated CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(directory: Path) -> Certs:
    """Generate the test PKI (EC P-256, a day's validity) with the openssl CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for name in ("ca", "other-ca"):
        # Python 3.13 verifies strictly (VERIFY_X509_STRICT): a CA needs keyUsage, a leaf an AKI.
        _openssl("req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "1",
                 "-subj", f"/CN=qmp-sdei test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)  # fmt: skip
    leaf = "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n"
    (directory / "server.ext").write_text(leaf + "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (directory / "client.ext").write_text(leaf + "extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext", cwd=directory)  # fmt: skip
    return Certs(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.crt",
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Mosquitto:
    """One broker process on 127.0.0.1; :meth:`start` again after :meth:`kill` keeps the port."""

    def __init__(
        self,
        directory: Path,
        *,
        certs: Certs | None = None,
        require_client_cert: bool = False,
        users: dict[str, str] | None = None,
        acl: Path | None = None,
    ) -> None:
        self.directory = directory
        self.certs = certs
        self.port = free_port()
        self.conf = directory / "mosquitto.conf"
        self.log = directory / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            "per_listener_settings false",
            f"allow_anonymous {'false' if users else 'true'}",
            "persistence false",
            "set_tcp_nodelay true",
            f"user {getpass.getuser()}",  # as root, mosquitto would switch to a user that cannot read tmp
            "log_type all",
            f"log_dest file {self.log}",
            f"listener {self.port} 127.0.0.1",
        ]
        if certs is not None:
            lines += [f"cafile {certs.ca}", f"certfile {certs.server_cert}", f"keyfile {certs.server_key}"]
            if require_client_cert:
                lines.append("require_certificate true")
        if users:
            passwd = directory / "passwd"
            passwd.touch(mode=0o600)
            for user, password in users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(passwd), user, password], check=True, timeout=30)
            lines.insert(0, f"password_file {passwd}")
        if acl is not None:
            lines.insert(0, f"acl_file {acl}")
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.certs else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err}{self.log_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not listen on {self.port} within {START_TIMEOUT}s")
            time.sleep(0.02)  # polling the port: the listening socket is the readiness signal

    def kill(self) -> None:
        """SIGKILL: no goodbye to anyone, as when the broker's host dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.contextmanager
def running_mosquitto(directory: Path, **kwargs: object) -> Iterator[Mosquitto]:
    directory.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(directory, **kwargs)  # type: ignore[arg-type]
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
        if broker.proc is not None and broker.proc.stderr is not None:
            broker.proc.stderr.close()
