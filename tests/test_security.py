"""Safe defaults against a real daemon: loopback only, client shm off, bearer tokens, TLS, size limits."""

from __future__ import annotations

import datetime
import gzip
import ipaddress
import json
import ssl
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import images, start_daemon

USER, ADMIN = "user-token-123", "admin-token-456"


def self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def secured(demo_repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secured")
    cert, key = self_signed(tmp)
    (tmp / "user").write_text(USER)
    (tmp / "admin").write_text(ADMIN + "\n")
    d = start_daemon(demo_repo, tmp, "--tls-cert", str(cert), "--tls-key", str(key),
                     "--auth-token-file", str(tmp / "user"), "--admin-token-file", str(tmp / "admin"),
                     "--max-request-bytes", "100000", wait=False)
    client = grpcclient.InferenceServerClient(d.grpc_url, ssl=True, root_certificates=str(cert))
    import time

    for _ in range(300):
        try:
            if client.is_server_ready():
                break
        except InferenceServerException:
            pass
        assert d.proc.poll() is None, d.log.read_text()
        time.sleep(0.1)
    else:
        d.stop()
        raise AssertionError(f"the TLS daemon was not ready after 30 s:\n{d.output()}")
    d.cert = cert
    yield d
    assert d.stop() == 0


def tls_client(d):
    return grpcclient.InferenceServerClient(d.grpc_url, ssl=True, root_certificates=str(d.cert))


@pytest.fixture(scope="module")
def native_tokens(demo_repo, tmp_path_factory):
    """The native gRPC transport has no TLS: bearer tokens over plain gRPC, checked the same way."""
    tmp = tmp_path_factory.mktemp("native-tokens")
    (tmp / "user").write_text(USER)
    (tmp / "admin").write_text(ADMIN)
    d = start_daemon(demo_repo, tmp, "--grpc-transport", "native", "--auth-token-file", str(tmp / "user"),
                     "--admin-token-file", str(tmp / "admin"), "--max-request-bytes", "100000")
    yield d
    assert d.stop() == 0


def grpc_client(request, which: str):
    d = request.getfixturevalue(which)
    return tls_client(d) if which == "secured" else grpcclient.InferenceServerClient(d.grpc_url)


def infer(client, n=1, headers=None):
    x = images(n, seed=n)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("ensemble", [inp], headers=headers)


def https(d, path, *, token=None, data=None, headers=None, port=None):
    ctx = ssl.create_default_context(cafile=str(d.cert))
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"https://127.0.0.1:{port or d.http_port}{path}", data=data, headers=hdrs)
    try:
        with urllib.request.urlopen(req, context=ctx) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_listens_on_loopback_only_by_default(daemon):
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # LISTEN
                addr, port = local.split(":")
                listening.add((addr, int(port, 16)))
    ours = {(a, p) for a, p in listening if p in (daemon.http_port, daemon.grpc_port, daemon.metrics_port)}
    assert {p for _, p in ours} == {daemon.http_port, daemon.grpc_port, daemon.metrics_port}
    # 127.0.0.1, as IPv4 or IPv4-mapped IPv6 (::ffff:127.0.0.1): nothing else
    assert {a for a, _ in ours} <= {"0100007F", "0000000000000000FFFF00000100007F"}


@pytest.mark.parametrize("which", ["secured", "native_tokens"])
def test_grpc_needs_the_user_token_and_admin_calls_the_admin_token(request, which):
    client = grpc_client(request, which)
    if which == "secured":
        assert client.is_server_live() and client.is_server_ready()  # probes stay open
    else:  # the native front checks the token before it reads a call: every call needs it
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            client.is_server_live()
        assert client.is_server_ready(headers={"authorization": f"Bearer {USER}"})
        assert urllib.request.urlopen(f"http://{request.getfixturevalue(which).http_url}/v2/health/ready").status == 200
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED.*needs an 'authorization: Bearer"):
        infer(client)
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED.*not valid"):
        infer(client, headers={"authorization": "Bearer wrong-token"})
    assert infer(client, headers={"authorization": f"Bearer {USER}"}).as_numpy("probs").shape == (1, 10)
    with pytest.raises(InferenceServerException, match="needs the admin token"):
        client.register_system_shared_memory("r", "/k", 16, headers={"authorization": f"Bearer {USER}"})
    # the admin token passes auth; client shared memory itself is off by default
    with pytest.raises(InferenceServerException, match="system shared memory is disabled on this server"):
        client.register_system_shared_memory("r", "/k", 16, headers={"authorization": f"Bearer {ADMIN}"})
    for control in (client.load_model, client.unload_model):  # model control is an admin call too
        with pytest.raises(InferenceServerException, match="needs the admin token"):
            control("ensemble", headers={"authorization": f"Bearer {USER}"})
        with pytest.raises(InferenceServerException, match="not allowed in model control mode 'none'"):
            control("ensemble", headers={"authorization": f"Bearer {ADMIN}"})


def test_http_and_metrics_need_the_token_over_tls(secured):
    assert https(secured, "/v2/health/ready")[0] == 200
    status, body = https(secured, "/v2/models/ensemble")
    assert status == 401 and "Bearer" in json.loads(body)["error"]
    status, body = https(secured, "/v2/models/ensemble", token=USER)
    assert status == 200 and json.loads(body)["name"] == "ensemble"
    assert https(secured, "/metrics", port=secured.metrics_port)[0] == 401
    status, body = https(secured, "/metrics", token=USER, port=secured.metrics_port)
    assert status == 200 and b"nv_inference_request_success" in body
    status, _ = https(secured, "/v2/systemsharedmemory/region/r/register", token=USER, data=b"{}")
    assert status == 401
    status, _ = https(secured, "/v2/repository/models/ensemble/unload", token=USER, data=b"{}")
    assert status == 401


def test_plain_connections_are_refused_when_tls_is_on(secured):
    client = grpcclient.InferenceServerClient(secured.grpc_url)
    with pytest.raises(InferenceServerException):
        client.is_server_live(client_timeout=3)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{secured.http_port}/v2/health/live", timeout=3)


@pytest.mark.parametrize("which", ["secured", "native_tokens"])
def test_grpc_request_size_limit(request, which):
    client = grpc_client(request, which)
    auth = {"authorization": f"Bearer {USER}"}
    with pytest.raises(InferenceServerException, match="RESOURCE_EXHAUSTED"):
        infer(client, n=16, headers=auth)  # 16 x 12 KiB > 100000 bytes
    assert infer(client, headers=auth).as_numpy("probs").shape == (1, 10)


def test_request_size_limits(secured):
    client = tls_client(secured)
    auth = {"authorization": f"Bearer {USER}"}
    x = np.zeros((16, 3, 32, 32), np.float32)
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()
    status, text = https(secured, "/v2/models/ensemble/infer", token=USER, data=body)
    assert status == 413 and "larger than the limit of 100000 bytes" in json.loads(text)["error"]
    bomb = gzip.compress(b"[" + b"0," * 200_000 + b"0]")  # ~1 KiB that inflates past the limit
    status, text = https(secured, "/v2/models/ensemble/infer", token=USER, data=bomb,
                         headers={"Content-Encoding": "gzip"})
    assert status == 413 and "larger than the limit of 100000 bytes" in json.loads(text)["error"]
    assert infer(client, headers=auth).as_numpy("probs").shape == (1, 10)


def test_unreadable_tls_files_stop_the_start_with_a_clear_error(demo_repo, tmp_path):
    d = start_daemon(demo_repo, tmp_path, "--tls-cert", str(tmp_path / "none.pem"), wait=False)
    assert d.proc.wait(30) != 0
    assert "TLS needs both --tls-cert and --tls-key" in d.log.read_text()



def test_the_native_transport_refuses_tls_at_once(demo_repo, tmp_path):
    cert, key = self_signed(tmp_path)
    d = start_daemon(demo_repo, tmp_path, "--grpc-transport", "native", "--tls-cert", str(cert),
                     "--tls-key", str(key), wait=False)
    assert d.proc.wait(30) == 2
    assert "the native gRPC transport has no TLS: use --grpc-transport grpcio" in d.log.read_text()
