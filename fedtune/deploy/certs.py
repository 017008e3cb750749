"""TLS certificates and SuperNode authentication keys for a Flower deployment.

Three artefacts, each in the format flwr 1.41 reads:

- a private CA (``ca.crt``, ``ca.key``). ``ca.crt`` is what the SuperLink gets as
  ``--ssl-ca-certfile``, every SuperNode as ``--root-certificates``, and the
  ``flwr`` CLI as ``root-certificates`` in ``$FLWR_HOME/config.toml``.
- a server certificate signed by that CA (``server.pem``, ``server.key``), for
  ``--ssl-certfile`` / ``--ssl-keyfile``. TLS clients match the address they dial
  against the SubjectAlternativeName, never the CN, so every DNS name and IP the
  SuperLink is reached at must be listed.
- one ECDSA P-384 key pair per SuperNode in OpenSSH format, byte-compatible with
  ``ssh-keygen -t ecdsa -b 384 -N ""``: ``flower-supernode
  --auth-supernode-private-key`` loads the private key with
  ``cryptography``'s ``load_ssh_private_key`` (a PKCS#8 PEM key is rejected), and
  ``flwr supernode register`` loads the ``.pub`` file with ``load_ssh_public_key``
  and accepts only NIST curves.

Every file is written to a temporary file in the target folder and moved into
place with ``os.replace``, so a reader never sees half a key; private keys are
created with mode 0600. Existing files are never replaced unless
``overwrite=True``.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.errors import ConfigError, FedtuneError

__all__ = [
    "CAFiles",
    "ServerCertFiles",
    "SupernodeKeyFiles",
    "create_ca",
    "create_server_cert",
    "create_supernode_keys",
]

_CURVE = ec.SECP384R1
# Backdate certificates a little so hosts with slightly skewed clocks accept them.
_CLOCK_SKEW = _dt.timedelta(minutes=5)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
# Host names only (optionally a leading "*." wildcard): no scheme, port or spaces.
_DNS_RE = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*\.?$")


class CAFiles(NamedTuple):
    """Paths of a CA certificate (PEM) and its private key (PKCS#8 PEM, mode 0600)."""

    cert: Path
    key: Path


class ServerCertFiles(NamedTuple):
    """Paths for ``flower-superlink --ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``."""

    cert: Path
    key: Path
    ca_cert: Path


class SupernodeKeyFiles(NamedTuple):
    """Paths of a SuperNode's OpenSSH private key (mode 0600) and ``.pub`` key."""

    private_key: Path
    public_key: Path


def create_ca(
    out_dir: str | os.PathLike[str],
    common_name: str = "fedtune-ca",
    days: int = 365,
    *,
    overwrite: bool = False,
) -> CAFiles:
    """Create a self-signed CA in ``out_dir`` as ``ca.crt`` and ``ca.key``.

    The CA may sign end-entity certificates only (path length 0). Keep
    ``ca.key`` off the SuperLink host; only ``ca.crt`` is distributed.
    """
    _check_days(days)
    if not common_name or not common_name.strip():
        raise ConfigError("common_name: must be a non-empty string")
    out = _prepare_dir(out_dir)
    files = CAFiles(cert=out / "ca.crt", key=out / "ca.key")
    _refuse_existing(files, overwrite)

    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA384())
    )
    _write_all(
        [
            (files.key, _private_pem(key), 0o600),
            (files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644),
        ]
    )
    return files


def create_server_cert(
    ca: CAFiles,
    out_dir: str | os.PathLike[str],
    hostnames: Sequence[str],
    days: int = 365,
    *,
    name: str = "server",
    overwrite: bool = False,
) -> ServerCertFiles:
    """Create ``<name>.pem`` and ``<name>.key`` for a TLS server, signed by ``ca``.

    ``hostnames`` lists every address clients dial: DNS names become ``DNSName``
    and IPv4/IPv6 literals ``IPAddress`` entries of the SubjectAlternativeName.
    The first entry is also the subject CN. The certificate is restricted to
    server authentication (ExtendedKeyUsage serverAuth).
    """
    _check_days(days)
    _check_name("name", name)
    if isinstance(hostnames, str):
        raise ConfigError(f"hostnames: expected a list of names, got the string {hostnames!r}")
    sans = [_san_entry(h) for h in hostnames]
    if not sans:
        raise ConfigError("hostnames: at least one DNS name or IP address is required")
    ca_cert, ca_key = _load_ca(ca)
    out = _prepare_dir(out_dir)
    files = ServerCertFiles(cert=out / f"{name}.pem", key=out / f"{name}.key", ca_cert=Path(ca.cert))
    _refuse_existing(files[:2], overwrite)

    key = ec.generate_private_key(_CURVE())
    not_before, not_after = _validity(days)
    if not_after > ca_cert.not_valid_after_utc:
        # A leaf outliving its CA fails verification on the last days; cap it.
        not_after = ca_cert.not_valid_after_utc
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hostnames[0]))]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_all(
        [
            (files.key, _private_pem(key), 0o600),
            (files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644),
        ]
    )
    return files


def create_supernode_keys(
    out_dir: str | os.PathLike[str],
    name: str,
    *,
    overwrite: bool = False,
) -> SupernodeKeyFiles:
    """Create ``<name>`` (OpenSSH private key, 0600) and ``<name>.pub`` for a SuperNode.

    The SuperNode is started with ``--auth-supernode-private-key <name>`` and its
    public key is registered once with ``flwr supernode register <name>.pub``.
    ``name`` is also written as the public key's comment.
    """
    _check_name("name", name)
    out = _prepare_dir(out_dir)
    files = SupernodeKeyFiles(private_key=out / name, public_key=out / f"{name}.pub")
    _refuse_existing(files, overwrite)

    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_all(
        [
            (files.private_key, private, 0o600),
            (files.public_key, public + b" " + name.encode("ascii") + b"\n", 0o644),
        ]
    )
    return files


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(f"days: expected a positive integer, got {days!r}")


def _check_name(field: str, value: str) -> None:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ConfigError(
            f"{field}: expected a file name of letters, digits, '.', '_' or '-' (no path separators), got {value!r}"
        )


def _san_entry(hostname: str) -> x509.GeneralName:
    if not isinstance(hostname, str) or not hostname.strip():
        raise ConfigError(f"hostnames: entries must be non-empty strings, got {hostname!r}")
    host = hostname.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _DNS_RE.match(host) or len(host) > 253:
        raise ConfigError(
            f"hostnames: {hostname!r} is neither an IP address nor a valid DNS name "
            "(give the host only, without scheme or port)"
        )
    return x509.DNSName(host)


def _validity(days: int) -> tuple[_dt.datetime, _dt.datetime]:
    now = _dt.datetime.now(_dt.UTC)
    return now - _CLOCK_SKEW, now + _dt.timedelta(days=days)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ca(ca: CAFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = Path(ca.cert), Path(ca.key)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as err:
        raise FedtuneError(f"cannot read CA file: {err}") from err
    except (ValueError, TypeError) as err:
        raise FedtuneError(
            f"CA files {cert_path} / {key_path} are not an unencrypted PEM certificate and private key: {err}"
        ) from err
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise FedtuneError(f"CA key {key_path} does not belong to CA certificate {cert_path}")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound as err:
        raise FedtuneError(f"{cert_path} is not a CA certificate made by create_ca: {err}") from err
    if not is_ca:
        raise FedtuneError(f"{cert_path} is not a CA certificate (BasicConstraints ca=False)")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedtuneError(f"CA key {key_path} is not an EC key; create the CA with create_ca")
    return cert, key


def _prepare_dir(out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FedtuneError(f"output path {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedtuneError(f"cannot create output directory {out}: {err.strerror or err}") from err
    return out


def _refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    if overwrite:
        return
    existing = [str(p) for p in paths if os.path.lexists(p)]
    if existing:
        raise FedtuneError(
            f"refusing to overwrite existing file(s): {', '.join(existing)} (pass --overwrite, or overwrite=True from Python, to replace them)"
        )


def _write_all(items: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write every file to a temp file first, then move them all into place.

    Generating and writing every file before the first ``os.replace`` means a
    failure while writing (full disk, no permission) leaves no partial set.
    """
    staged: list[tuple[str, Path]] = []
    current = items[0][0]
    try:
        for path, data, mode in items:
            current = path
            staged.append((_write_temp(path, data, mode), path))
        for tmp, path in staged:
            current = path
            os.replace(tmp, path)
    except OSError as err:
        raise FedtuneError(f"cannot write {current}: {err.strerror or err}") from err
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _write_temp(path: Path, data: bytes, mode: int) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            # mkstemp creates 0600; widen only for public material.
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp
