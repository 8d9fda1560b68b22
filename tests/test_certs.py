"""The private certificate authority: file layout, what each certificate says, and a real mutual-TLS handshake."""

import datetime
import ipaddress
from concurrent import futures

import pytest

pytest.importorskip("cryptography", reason="certificates need the cryptography package")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from smartsplit.deploy.certs import Identity, identity_of, issue, load_identity, write_certs  # noqa: E402
from smartsplit.errors import SmartSplitError  # noqa: E402

NAMES = ["server", "edge-0", "edge-1", "device-0", "device-1", "device-2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs") / "pki"
    write_certs(folder, devices=3, edges=2)
    return folder


def certificate(folder, name):
    return x509.load_pem_x509_certificate((folder / f"{name}.pem").read_bytes())


def common_name(cert):
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_layout_and_returned_paths(tmp_path):
    paths = write_certs(tmp_path / "new", devices=2, edges=1)
    names = ["ca", "server", "edge-0", "device-0", "device-1"]
    expected = {f"{name}.{ext}" for name in names for ext in ("pem", "key")}
    assert {path.name for path in paths} == expected
    assert {path.name for path in (tmp_path / "new").iterdir()} == expected
    assert all(path.parent == tmp_path / "new" for path in paths)


def test_authority(folder):
    ca = certificate(folder, "ca")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    ca.verify_directly_issued_by(ca)


@pytest.mark.parametrize("name", NAMES)
def test_certificate(folder, name):
    ca, cert = certificate(folder, "ca"), certificate(folder, name)
    cert.verify_directly_issued_by(ca)
    assert common_name(cert) == name
    role = identity_of(name)[0]
    usage = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    if role == "device":  # a device only ever calls its edge: its key can serve nobody
        assert usage == {ExtendedKeyUsageOID.CLIENT_AUTH}
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    else:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [f"smartsplit-{role}", "localhost"]
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        assert usage == ({ExtendedKeyUsageOID.SERVER_AUTH} if role == "server" else
                         {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH})
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    key = serialization.load_pem_private_key((folder / f"{name}.key").read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    assert b"BEGIN PRIVATE KEY" in (folder / f"{name}.key").read_bytes()  # PKCS8, unencrypted


@pytest.mark.parametrize("name", ["ca", *NAMES])
def test_keys_are_private(folder, name):
    assert (folder / f"{name}.key").stat().st_mode & 0o777 == 0o600


def test_hosts(tmp_path):
    write_certs(tmp_path, devices=0, edges=0, hosts=["edge.example", "10.0.0.7", "::1"])
    san = certificate(tmp_path, "server").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["smartsplit-server", "edge.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("::1")]


def test_existing_authority_needs_overwrite(tmp_path):
    write_certs(tmp_path, devices=1, edges=0)
    old = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(SmartSplitError, match="ca.pem"):
        write_certs(tmp_path, devices=1, edges=0)
    assert (tmp_path / "ca.pem").read_bytes() == old
    write_certs(tmp_path, devices=1, edges=0, overwrite=True)
    assert (tmp_path / "ca.pem").read_bytes() != old
    certificate(tmp_path, "device-0").verify_directly_issued_by(certificate(tmp_path, "ca"))


def test_issue_another_device(folder):
    pem, key = issue(folder, "device-9")
    assert (pem.name, key.name) == ("device-9.pem", "device-9.key")
    cert = certificate(folder, "device-9")
    cert.verify_directly_issued_by(certificate(folder, "ca"))
    assert common_name(cert) == "device-9"
    assert key.stat().st_mode & 0o777 == 0o600


def test_issue_expired(tmp_path):
    write_certs(tmp_path, devices=0, edges=0)
    now = datetime.datetime.now(datetime.timezone.utc)
    issue(tmp_path, "device-5", not_before=now - datetime.timedelta(days=10), days=1)
    cert = certificate(tmp_path, "device-5")
    assert cert.not_valid_after_utc < now
    cert.verify_directly_issued_by(certificate(tmp_path, "ca"))


def test_issue_rejects_bad_name(folder):
    with pytest.raises(SmartSplitError, match="not an identity"):
        issue(folder, "laptop")


def test_load_identity(folder):
    identity = load_identity(folder, "edge-1")
    assert isinstance(identity, Identity)
    assert identity.name == "edge-1"
    assert identity.key == (folder / "edge-1.key").read_bytes()
    assert identity.certificate == (folder / "edge-1.pem").read_bytes()
    assert identity.authority == (folder / "ca.pem").read_bytes()
    with pytest.raises(AttributeError):
        identity.name = "edge-0"


def test_load_identity_missing(tmp_path, folder):
    with pytest.raises(SmartSplitError, match="smartsplit certs DIR --devices N --edges M") as missing_folder:
        load_identity(tmp_path / "nowhere", "server")
    assert str(tmp_path / "nowhere") in str(missing_folder.value)
    with pytest.raises(SmartSplitError, match="smartsplit certs DIR") as missing_file:
        load_identity(folder, "device-99")
    assert str(folder / "device-99.key") in str(missing_file.value)
    write_certs(tmp_path / "no-ca", devices=1, edges=0)
    (tmp_path / "no-ca" / "ca.pem").unlink()
    with pytest.raises(SmartSplitError, match="smartsplit certs DIR") as missing_ca:
        load_identity(tmp_path / "no-ca", "device-0")
    assert str(tmp_path / "no-ca" / "ca.pem") in str(missing_ca.value)


@pytest.mark.parametrize(
    "name, expected",
    [("server", ("server", None)), ("edge-3", ("edge", 3)), ("device-17", ("device", 17)), ("device-0", ("device", 0))],
)
def test_identity_of(name, expected):
    assert identity_of(name) == expected


@pytest.mark.parametrize(
    "name", ["", "ca", "Server", "edge", "edge-", "edge-x", "edge--1", "device-03", "device-1 ", "phone-1", "server-0"]
)
def test_identity_of_rejects(name):
    with pytest.raises(SmartSplitError, match="not an identity"):
        identity_of(name)


# --- a real mutual-TLS handshake on loopback ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc():
    return pytest.importorskip("grpc", reason="the handshake test needs grpcio")


@pytest.fixture(scope="module")
def port(grpc, folder):
    """A server with ``server``'s identity that answers each call with the caller's certificate common name."""

    def echo(request, context):
        return context.auth_context()["x509_common_name"][0]

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("t", {"echo": grpc.unary_unary_rpc_method_handler(echo)})]
    )
    me = load_identity(folder, "server")
    credentials = grpc.ssl_server_credentials(
        [(me.key, me.certificate)], root_certificates=me.authority, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port
    server.start()
    yield port
    server.stop(0)


def call(grpc, port, credentials):
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        return channel.unary_unary("/t/echo")(b"hello", timeout=5)


def client(grpc, identity, authority=None):
    return grpc.ssl_channel_credentials(
        root_certificates=authority or identity.authority,
        private_key=identity.key,
        certificate_chain=identity.certificate,
    )


def test_mutual_tls(grpc, port, folder):
    assert call(grpc, port, client(grpc, load_identity(folder, "device-1"))) == b"device-1"
    assert call(grpc, port, client(grpc, load_identity(folder, "edge-0"))) == b"edge-0"


def test_other_authority_is_refused(grpc, port, folder, tmp_path):
    write_certs(tmp_path, devices=2, edges=0)
    stranger = load_identity(tmp_path, "device-1")  # same name, wrong authority
    with pytest.raises(grpc.RpcError) as refused:
        call(grpc, port, client(grpc, stranger, authority=(folder / "ca.pem").read_bytes()))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_no_certificate_is_refused(grpc, port, folder):
    with pytest.raises(grpc.RpcError) as refused:
        call(grpc, port, grpc.ssl_channel_credentials(root_certificates=(folder / "ca.pem").read_bytes()))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_expired_certificate_is_refused(grpc, port, folder):
    now = datetime.datetime.now(datetime.timezone.utc)
    issue(folder, "device-8", not_before=now - datetime.timedelta(days=10), days=1)  # same authority, expired
    with pytest.raises(grpc.RpcError) as refused:
        call(grpc, port, client(grpc, load_identity(folder, "device-8")))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_checked_by_client(grpc, port, tmp_path):
    write_certs(tmp_path, devices=1, edges=0)
    with pytest.raises(grpc.RpcError) as refused:  # the client trusts only its own, unrelated authority
        call(grpc, port, client(grpc, load_identity(tmp_path, "device-0")))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_device_key_cannot_serve_as_an_edge_or_the_server(grpc, folder):
    """A device certificate is for client authentication only and names no role a peer expects: a device that
    listens with it is refused in the handshake by a device or an edge that connects to it."""
    from smartsplit.deploy.link import open_channel, start_server

    def echo(request, context):
        return b"served"

    handlers = [grpc.method_handlers_generic_handler("t", {"echo": grpc.unary_unary_rpc_method_handler(echo)})]
    for impostor, victim in (("device-0", "device-1"), ("device-0", "edge-0"), ("edge-0", "edge-1")):
        server, port = start_server([lambda s: s.add_generic_rpc_handlers(handlers)], "127.0.0.1:0", folder, impostor)
        try:
            with open_channel(f"127.0.0.1:{port}", folder, victim) as channel:
                with pytest.raises(grpc.RpcError) as refused:
                    channel.unary_unary("/t/echo")(b"hello", timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, (impostor, victim)
        finally:
            server.stop(0)
    server, port = start_server([lambda s: s.add_generic_rpc_handlers(handlers)], "127.0.0.1:0", folder, "edge-0")
    try:  # the real edge, reached at an address its certificate does not name, is accepted by a device
        with open_channel(f"127.0.0.1:{port}", folder, "device-1") as channel:
            assert channel.unary_unary("/t/echo")(b"hello", timeout=5) == b"served"
    finally:
        server.stop(0)
