"""Tests for fedtune.deploy.certs: chain, SAN, file modes, and flwr's own key loaders."""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedtune.deploy import certs
from fedtune.deploy.certs import create_ca, create_server_cert, create_supernode_keys
from fedtune.errors import ConfigError, FedtuneError

HOSTS = ["superlink.example.org", "localhost", "127.0.0.1", "::1"]


@pytest.fixture()
def pki(tmp_path: Path):
    ca = create_ca(tmp_path / "pki", "test-ca", days=30)
    server = create_server_cert(ca, tmp_path / "pki", HOSTS, days=10)
    return ca, server


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _tls_handshake(server: certs.ServerCertFiles, ca_cert: Path, server_hostname: str) -> None:
    """Run a real TLS handshake in memory: server context vs a verifying client."""
    srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv_ctx.load_cert_chain(server.cert, server.key)
    cli_ctx = ssl.create_default_context(cafile=str(ca_cert))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = cli_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    srv = srv_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, end, out, peer_in in (("c", client, c_out, s_in), ("s", srv, s_out, c_in)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_server_cert_is_issued_by_ca(pki):
    ca, server = pki
    ca_cert, leaf = _cert(ca.cert), _cert(server.cert)
    leaf.verify_directly_issued_by(ca_cert)
    assert server.ca_cert == ca.cert
    bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@pytest.mark.parametrize("host", ["superlink.example.org", "localhost"])
def test_chain_verifies_with_cryptography_policy(pki, host):
    ca, server = pki
    verifier = PolicyBuilder().store(Store([_cert(ca.cert)])).build_server_verifier(x509.DNSName(host))
    chain = verifier.verify(_cert(server.cert), [])
    assert chain[-1] == _cert(ca.cert)


def test_chain_verifies_for_ip_and_rejects_unknown_name(pki):
    ca, server = pki
    store = Store([_cert(ca.cert)])
    ip = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    PolicyBuilder().store(store).build_server_verifier(ip).verify(_cert(server.cert), [])
    other = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("evil.example"))
    with pytest.raises(VerificationError):
        other.verify(_cert(server.cert), [])


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "::1"])
def test_ssl_handshake_succeeds_for_listed_names(pki, hostname):
    ca, server = pki
    _tls_handshake(server, ca.cert, hostname)


def test_ssl_handshake_fails_for_unlisted_ip(pki):
    # The SuperLink's own SuperExec dials 127.0.0.1; a cert without it breaks runs.
    ca, server = pki
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(server, ca.cert, "10.1.2.3")


def test_san_lists_dns_names_and_ips(pki):
    _, server = pki
    san = _cert(server.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    cn = _cert(server.cert).subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == "superlink.example.org"


def test_leaf_never_outlives_ca(tmp_path):
    ca = create_ca(tmp_path, days=2)
    server = create_server_cert(ca, tmp_path, ["localhost"], days=400)
    assert _cert(server.cert).not_valid_after_utc == _cert(ca.cert).not_valid_after_utc


def test_file_modes_and_no_temp_files_left(pki, tmp_path):
    ca, server = pki
    keys = create_supernode_keys(tmp_path / "keys", "silo-1")
    for private in (ca.key, server.key, keys.private_key):
        assert _mode(private) == 0o600, private
    for public in (ca.cert, server.cert, keys.public_key):
        assert _mode(public) == 0o644, public
    leftovers = [p for d in (tmp_path / "pki", tmp_path / "keys") for p in d.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_supernode_keys_load_with_flwr_loaders(tmp_path):
    pytest.importorskip("flwr")
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    keys = create_supernode_keys(tmp_path, "silo-1")
    # What `flwr supernode register silo-1.pub` sends to the SuperLink ...
    registered = try_load_public_key(keys.public_key)
    # ... must equal what `flower-supernode --auth-supernode-private-key silo-1` presents.
    args = argparse.Namespace(auth_supernode_private_key=str(keys.private_key), auth_supernode_public_key=None)
    private, public = _try_setup_client_authentication(args)
    assert isinstance(private.curve, ec.SECP384R1)
    assert public_key_to_bytes(public) == registered
    assert keys.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert keys.public_key.read_text().rstrip().endswith(" silo-1")
    assert keys.private_key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_supernode_keys_match_ssh_keygen(tmp_path):
    keys = create_supernode_keys(tmp_path, "silo-1")
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(keys.private_key)], check=True, capture_output=True, text=True
    ).stdout.split()[:2]
    assert derived == keys.public_key.read_text().split()[:2]


def test_refuses_to_overwrite_unless_asked(pki, tmp_path):
    ca, server = pki
    before = {p: p.read_bytes() for p in (ca.cert, ca.key, server.cert, server.key)}
    with pytest.raises(FedtuneError, match="refusing to overwrite"):
        create_ca(ca.cert.parent, "test-ca")
    with pytest.raises(FedtuneError, match="server.pem"):
        create_server_cert(ca, ca.cert.parent, ["localhost"])
    assert {p: p.read_bytes() for p in before} == before

    keys = create_supernode_keys(tmp_path / "keys", "silo-1")
    old = keys.private_key.read_bytes()
    with pytest.raises(FedtuneError, match="silo-1"):
        create_supernode_keys(tmp_path / "keys", "silo-1")
    assert keys.private_key.read_bytes() == old
    create_supernode_keys(tmp_path / "keys", "silo-1", overwrite=True)
    assert keys.private_key.read_bytes() != old
    assert _mode(keys.private_key) == 0o600


def test_server_cert_overwrite_true_reissues(pki):
    ca, server = pki
    old_serial = _cert(server.cert).serial_number
    create_server_cert(ca, ca.cert.parent, ["localhost"], overwrite=True)
    assert _cert(server.cert).serial_number != old_serial


@pytest.mark.parametrize(
    ("hostnames", "match"),
    [
        ([], "at least one"),
        (["https://superlink:9092"], "neither an IP address nor a valid DNS name"),
        (["host name"], "neither"),
        ([""], "non-empty"),
        ("localhost", "expected a list"),
    ],
)
def test_bad_hostnames_name_the_field(pki, tmp_path, hostnames, match):
    ca, _ = pki
    with pytest.raises(ConfigError, match=match) as err:
        create_server_cert(ca, tmp_path / "other", hostnames)
    assert "hostnames" in str(err.value)


@pytest.mark.parametrize("days", [0, -1, 1.5, True])
def test_bad_days(tmp_path, days):
    with pytest.raises(ConfigError, match="days"):
        create_ca(tmp_path, days=days)


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden"])
def test_bad_supernode_names(tmp_path, name):
    with pytest.raises(ConfigError, match="name"):
        create_supernode_keys(tmp_path, name)


def test_unwritable_output_dir_is_a_fedtune_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(FedtuneError, match="cannot create output directory"):
        create_ca(blocker / "pki")
    with pytest.raises(FedtuneError, match="not a directory"):
        create_supernode_keys(blocker, "silo-1")


def test_write_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(certs.os, "replace", fail)
    with pytest.raises(FedtuneError, match="cannot write .*silo-1"):
        create_supernode_keys(tmp_path, "silo-1")
    assert list(tmp_path.iterdir()) == []


def test_ca_key_must_match_ca_cert(tmp_path):
    ca1 = create_ca(tmp_path / "one")
    ca2 = create_ca(tmp_path / "two")
    mixed = certs.CAFiles(cert=ca1.cert, key=ca2.key)
    with pytest.raises(FedtuneError, match="does not belong"):
        create_server_cert(mixed, tmp_path / "srv", ["localhost"])
    with pytest.raises(FedtuneError, match="cannot read CA file"):
        create_server_cert(certs.CAFiles(tmp_path / "nope.crt", ca1.key), tmp_path / "srv", ["x"])


def test_private_keys_are_unencrypted_pem_flwr_can_serve(pki):
    # flower-superlink hands these paths to uvicorn/ssl and grpc: PEM, no passphrase.
    _, server = pki
    key = serialization.load_pem_private_key(server.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert os.fspath(server.key).endswith("server.key")
