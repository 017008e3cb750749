"""Does the SuperLink speak the TLS a SuperNode is about to speak? A check with no Flower process.

flwr 1.41's SuperNode meets a TLS mismatch in one of two ways (verified on
loopback, docs/deploy-notes.md §2):

- it trusts another CA (``--root-certificates`` from a different ``fedtune
  deploy certs``), or dials a plain-text SuperLink over TLS: it logs "SSL/TLS
  handshake error detected", prints Flower's exit code 305 and exits 1;
- it was started ``--insecure`` against a TLS SuperLink: every request is
  refused at the SuperLink's TLS layer, which Flower takes for a network error
  and retries forever ("Connection attempt failed, retrying in ...").

`probe_superlink` makes one TLS handshake with the address and root certificate
the SuperNode will use, the way Flower's client does (``ssl.PROTOCOL_TLS_CLIENT``:
the chain and the host name are checked), before Flower starts, and turns the
answer into one line saying what is wrong and what to do. A SuperLink that
does not answer yet is no verdict: Flower keeps trying it, and ``fedtune deploy
supernode`` probes again until it answers.

The check dials the address directly; a SuperNode behind an HTTPS proxy
(``HTTPS_PROXY``) reaches the SuperLink through it, and a direct connection that
fails is, again, no verdict.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path
from typing import Literal, NamedTuple

__all__ = ["Probe", "probe_superlink"]

# OpenSSL's verify codes (X509_V_ERR_*) for "no chain to a trusted root"
_OTHER_CA = {2, 18, 19, 20, 21}
_NAME_MISMATCH = {62, 64}  # host name, IP address
_DATES = {9, 10}  # not yet valid, expired


class Probe(NamedTuple):
    """The verdict of one probe.

    ``verdict`` is ``"ok"`` (the SuperLink speaks what the SuperNode will),
    ``"refused"`` (it does not; ``message`` says what is wrong and what to do, in
    one line) or ``"unknown"`` (no answer to judge; ``message`` says what
    happened, e.g. connection refused).
    """

    verdict: Literal["ok", "refused", "unknown"]
    message: str


def probe_superlink(address: str, root_certificates: str | os.PathLike[str] | None, *, timeout: float = 5.0) -> Probe:
    """Probe the SuperLink at ``address`` (``HOST:PORT``, IPv6 as ``[addr]:port``) for a
    SuperNode that verifies it with ``root_certificates`` (a PEM CA file), or that
    speaks plain HTTP when ``root_certificates`` is None (``--insecure``)."""
    host, port = _split(address)
    ca = None if root_certificates is None else Path(root_certificates)
    if ca is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # only: does it speak TLS at all?
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # what flwr builds from --root-certificates
        try:
            ctx.load_verify_locations(cadata=ca.read_text(encoding="ascii"))
        except (OSError, ValueError, ssl.SSLError) as err:
            return Probe("refused", f"--certs: {ca} is not a readable PEM CA certificate ({err})")
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        return Probe("unknown", f"no connection to {address} ({err.strerror or err})")
    with sock:
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as err:
            return Probe("refused", _certificate_problem(address, host, ca, err))
        except ssl.SSLError as err:
            handshake_error = err
        except OSError as err:
            return Probe("unknown", f"the TLS handshake with {address} did not finish ({err.strerror or err})")
        else:
            if ca is None:
                return Probe(
                    "refused",
                    f"the SuperLink at {address} speaks TLS, and this SuperNode was started with --insecure "
                    "(plain HTTP, which it would retry forever): start it with --certs CA.crt (the coordinator's "
                    "ca.crt) and --key KEY (from `fedtune deploy keys`) instead of --insecure",
                )
            return Probe("ok", f"TLS with {address}, certificate verified with {ca}")
    if _speaks_plain_http(host, port, timeout):
        if ca is None:
            return Probe("ok", f"plain HTTP with {address}")
        return Probe(
            "refused",
            f"the SuperLink at {address} speaks plain HTTP, not TLS (it was started with --insecure): "
            "start this SuperNode with --insecure and without --certs/--key, or restart the SuperLink "
            "with --certs (`fedtune deploy superlink --certs DIR`)",
        )
    return Probe("unknown", f"{address} neither completed a TLS handshake ({handshake_error}) nor answered HTTP")


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _speaks_plain_http(host: str, port: int, timeout: float) -> bool:
    """Whether the server answers a plain ``GET /`` with an HTTP status line (any status)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode("ascii"))
            return sock.recv(5) == b"HTTP/"
    except OSError:
        return False


def _certificate_problem(address: str, host: str, ca: Path | None, err: ssl.SSLCertVerificationError) -> str:
    why = err.verify_message or str(err)
    if err.verify_code in _OTHER_CA:
        return (
            f"the SuperLink at {address} presents a certificate that the CA in {ca} did not sign ({why}): "
            "this SuperNode trusts another CA; pass the ca.crt that `fedtune deploy certs` wrote for this "
            "SuperLink (ask the coordinator) with --certs"
        )
    if err.verify_code in _NAME_MISMATCH:
        return (
            f"the SuperLink's certificate does not name {host} ({why}): dial it by a name or IP the "
            f"certificate lists, or have the coordinator re-create it with `fedtune deploy certs --host {host}`"
        )
    if err.verify_code in _DATES:
        return (
            f"the SuperLink's certificate at {address} is not valid now ({why}): check this machine's clock, "
            "or have the coordinator re-create it with `fedtune deploy certs --overwrite`"
        )
    return f"the SuperLink's certificate at {address} failed verification with {ca} ({why}); check --certs"
