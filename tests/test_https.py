"""HTTPS with a private CA: nginx with TLS on 127.0.0.1 (a file server, and a TLS front for the
moto S3 server), certificates made here by a throw-away CA (Python `cryptography`, installed with
moto by scripts/setup-env.sh).

Trust comes from `CAInfo(cacert=... | capath=...)` (CoreWeave's `open_stream` option),
`REQUESTS_CA_BUNDLE` / `CURL_CA_BUNDLE` (https://), `AWS_CA_BUNDLE` (s3://) or `SSL_CERT_FILE`;
without the CA a load fails at once with a certificate error.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import entry_key, free_port, http_server, lookup, nginx, sha256
from tensorizer_rs import TensorDeserializer, TensorizerError
from tensorizer_rs.stream_io import CAInfo, open_stream

CA_VARS = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "AWS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
VECTOR = "dtypes.tensors"


@pytest.fixture(autouse=True)
def _no_ca_env(monkeypatch):
    """Each test starts without CA variables (a developer's environment may set them)."""
    for var in CA_VARS:
        monkeypatch.delenv(var, raising=False)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, and a server certificate it signed for IP 127.0.0.1 only (not for "localhost")."""
    d = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = {"not_valid_before": now - datetime.timedelta(hours=1),
             "not_valid_after": now + datetime.timedelta(days=1)}  # fmt: skip
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder(**valid)
        .subject_name(_name("tensorizer-rs test CA"))
        .issuer_name(_name("tensorizer-rs test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder(**valid)
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}
    paths["ca"].write_bytes(_pem(ca))
    paths["cert"].write_bytes(_pem(server))
    paths["key"].write_bytes(_pem(key))
    capath = d / "capath"
    capath.mkdir()
    (capath / "README").write_text("not a certificate\n")
    shutil.copy(paths["ca"], capath / "test-ca.pem")
    paths["capath"] = capath
    return paths


@pytest.fixture(scope="module")
def nginx_tls(tmp_path_factory, pki, vectors_dir, s3_server):
    """nginx with TLS: static files (the golden vectors) and a proxy to the S3 test server.
    Yields {"https": base URL of the files, "s3": the S3 endpoint through TLS}."""
    d = tmp_path_factory.mktemp("nginx-tls")
    root = d / "root"
    shutil.copytree(vectors_dir, root)
    files_port, s3_port = free_port(), free_port()
    moto = s3_server.endpoint.removeprefix("http://")
    tls = f"ssl_certificate {pki['cert']}; ssl_certificate_key {pki['key']};"
    servers = f"""
    server {{
        listen 127.0.0.1:{files_port} ssl;
        {tls}
        root {root};
    }}
    server {{
        listen 127.0.0.1:{s3_port} ssl;
        {tls}
        client_max_body_size 0;
        proxy_request_buffering off;
        location / {{
            proxy_pass http://{moto};
            proxy_set_header Host $http_host;
            proxy_http_version 1.1;
        }}
    }}"""
    with nginx(d, servers, [files_port, s3_port]):
        s3_server.bucket("tls")
        yield {
            "root": root,
            "https": f"https://127.0.0.1:{files_port}",
            "localhost": f"https://localhost:{files_port}",
            "s3": f"https://127.0.0.1:{s3_port}",
        }


def _check(d, manifest):
    for m in manifest["tensors"]:
        t = lookup(d, entry_key(m))
        assert sha256(t) == m["sha256"] and list(t.shape) == m["shape"], m["name"]


def _url(nginx_tls, name=VECTOR):
    return f"{nginx_tls['https']}/{name}"


# ----------------------------------------------------------------------------- https://
def test_https_with_cainfo(nginx_tls, pki, vector_manifests):
    """CAInfo(cacert=...) / CAInfo(capath=...): exact bytes and tensors over https."""
    v = vector_manifests[VECTOR]
    want = Path(v["path"]).read_bytes()
    for ca in (CAInfo(cacert=str(pki["ca"])), CAInfo(capath=str(pki["capath"]))):
        with open_stream(_url(nginx_tls), certificate_handling=ca) as f:
            assert f.read() == want
        stream = open_stream(_url(nginx_tls), certificate_handling=ca)
        _check(TensorDeserializer(stream, device="cpu", verify_hash=True), v)


@pytest.mark.parametrize("var", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_https_ca_bundle_from_environment(nginx_tls, pki, vector_manifests, monkeypatch, var):
    """A plain URI (no stream options) picks the bundle up from requests'/curl's variables."""
    monkeypatch.setenv(var, str(pki["ca"]))
    _check(TensorDeserializer(_url(nginx_tls), device="cpu"), vector_manifests[VECTOR])


def test_https_ssl_cert_file(nginx_tls, pki, vector_manifests):
    """SSL_CERT_FILE replaces the system roots (read when a client is first built, so in a fresh
    process)."""
    script = (
        "import hashlib, sys\n"
        "from tensorizer_rs.stream_io import open_stream\n"
        "with open_stream(sys.argv[1]) as f: print(hashlib.sha256(f.read()).hexdigest())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in CA_VARS}
    env["SSL_CERT_FILE"] = str(pki["ca"])
    proc = subprocess.run(
        [sys.executable, "-c", script, _url(nginx_tls)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    import hashlib

    want = hashlib.sha256(Path(vector_manifests[VECTOR]["path"]).read_bytes()).hexdigest()
    assert proc.stdout.strip() == want


def test_https_without_the_ca_fails_fast_with_a_certificate_error(nginx_tls, pki):
    start = time.perf_counter()
    with pytest.raises(TensorizerError) as e:
        TensorDeserializer(_url(nginx_tls), device="cpu")
    msg = str(e.value)
    assert "TLS certificate verification failed" in msg and "UnknownIssuer" in msg, msg
    assert "REQUESTS_CA_BUNDLE" in msg and _url(nginx_tls) in msg
    assert time.perf_counter() - start < 5, "certificate errors are not retried"
    # Trusted CA, but the certificate is for 127.0.0.1, not "localhost".
    with pytest.raises(
        TensorizerError, match='TLS certificate verification failed.*not valid for name "localhost"'
    ):
        open_stream(
            f"{nginx_tls['localhost']}/{VECTOR}", certificate_handling=CAInfo(cacert=str(pki["ca"]))
        )


def test_https_bodies_read_into_the_tensors(nginx_tls, pki):
    """Ranged HTTPS bodies are decrypted straight into the tensors on the reading threads
    (rustls, the trust of the probe's client: a bundle, or allow_untrusted); http_direct=False
    sends them through reqwest. Same bytes every way."""
    import torch
    from tensorizer_rs import TensorSerializer, _native

    g = torch.Generator().manual_seed(11)
    sd = {"big": torch.randn(3_000_000, generator=g), "small": torch.randn(1000, generator=g)}
    with TensorSerializer(str(nginx_tls["root"] / "direct.tensors")) as s:
        s.write_state_dict(sd)

    class Source:  # a URI with storage options, as open_stream's readers carry them
        _tensorizer_uri = f"{nginx_tls['https']}/direct.tensors"
        _tensorizer_storage = None

    trusts = ({"ca_bundle": str(pki["ca"])}, {"allow_untrusted": True})
    for trust in trusts:
        for direct in (True, False):
            Source._tensorizer_storage = {"http_direct": direct, **trust}
            before = _native.http_direct_bytes()
            d = TensorDeserializer(Source(), device="cpu")
            for k, v in sd.items():
                assert torch.equal(d[k], v), (k, trust, direct)
            moved = _native.http_direct_bytes() - before
            if direct:
                assert moved >= sd["big"].numel() * 4 - (1 << 20), (trust, moved)
            else:
                assert moved == 0, (trust, moved)


def _model_in(tmp_path: Path, seed: int) -> tuple[Path, dict]:
    """A 12 MB tensor and a small one, written to `www/m.tensors` under `tmp_path`."""
    import torch
    from tensorizer_rs import TensorSerializer

    g = torch.Generator().manual_seed(seed)
    sd = {"big": torch.randn(3_000_000, generator=g), "small": torch.randn(1000, generator=g)}
    root = tmp_path / "www"
    root.mkdir()
    with TensorSerializer(str(root / "m.tensors")) as s:
        s.write_state_dict(sd)
    return root, sd


def test_https_drops_and_server_errors_resume(pki, tmp_path):
    """Over TLS, connections cut mid-body and 500s during the reads (tests/servers/http_server.py
    behind TLS): the direct client resumes where the bytes stopped or retries; exact bytes."""
    import torch
    from tensorizer_rs import _native

    root, sd = _model_in(tmp_path, seed=12)

    class Source:  # a URI with storage options, as open_stream's readers carry them
        _tensorizer_uri = None
        _tensorizer_storage = None

    with http_server(root, (pki["cert"], pki["key"])) as base:
        assert base.startswith("https://")
        for path in ("data", "dropmid/3", "fail500mid/2"):
            Source._tensorizer_uri = f"{base}/{path}/m.tensors"
            Source._tensorizer_storage = {"ca_bundle": str(pki["ca"])}
            before = _native.http_direct_bytes()
            d = TensorDeserializer(Source(), device="cpu")
            for k, v in sd.items():
                assert torch.equal(d[k], v), (path, k)
            moved = _native.http_direct_bytes() - before
            assert moved >= sd["big"].numel() * 4 - (1 << 20), (path, moved)
        tls = ssl.create_default_context(cafile=str(pki["ca"]))
        with urllib.request.urlopen(f"{base}/__stats", context=tls) as r:
            seen = json.loads(r.read())
    # The faults happened: three cut bodies and two 500s were asked for again.
    plain = seen["/data/m.tensors"]
    assert seen["/dropmid/3/m.tensors"] >= plain + 3, seen
    assert seen["/fail500mid/2/m.tensors"] >= plain + 2, seen


def test_https_slow_handshakes(pki, tmp_path, monkeypatch):
    """A server that takes 1.5 s over each TLS handshake: the direct client's reads wake every
    second while they wait (to see whether the load was stopped), and a handshake that slow is
    a wait like any other, not a failure. Exact bytes, the body through the direct client."""
    import torch
    from tensorizer_rs import _native

    root, sd = _model_in(tmp_path, seed=13)

    class Source:
        _tensorizer_uri = None
        _tensorizer_storage = None

    monkeypatch.setenv("TLS_HANDSHAKE_DELAY", "1.5")
    with http_server(root, (pki["cert"], pki["key"])) as base:
        Source._tensorizer_uri = f"{base}/data/m.tensors"
        Source._tensorizer_storage = {"ca_bundle": str(pki["ca"])}
        before = _native.http_direct_bytes()
        d = TensorDeserializer(Source(), device="cpu")
        for k, v in sd.items():
            assert torch.equal(d[k], v), k
        assert _native.http_direct_bytes() - before >= sd["big"].numel() * 4 - (1 << 20)


def test_https_allow_untrusted(nginx_tls, vector_manifests):
    stream = open_stream(_url(nginx_tls), certificate_handling=CAInfo(allow_untrusted=True))
    _check(TensorDeserializer(stream, device="cpu"), vector_manifests[VECTOR])


def test_bad_ca_bundles(nginx_tls, tmp_path, monkeypatch):
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="junk.pem: a certificate cannot be used as a root"):
        open_stream(_url(nginx_tls), certificate_handling=CAInfo(cacert=str(junk)))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(FileNotFoundError, match="CA bundle .*missing.pem"):
        open_stream(_url(nginx_tls))


def test_cainfo_arguments(tmp_path):
    with pytest.raises(ValueError, match="Exactly one of"):
        CAInfo()
    with pytest.raises(ValueError, match="Exactly one of"):
        CAInfo(cacert=str(tmp_path), allow_untrusted=True)
    with pytest.raises(ValueError, match="cacert"):
        CAInfo(cacert=str(tmp_path / "none.pem"))
    with pytest.raises(ValueError, match="capath"):
        CAInfo(capath=str(tmp_path / "none"))
    with pytest.raises(TypeError, match="CAInfo"):
        open_stream("https://127.0.0.1:1/x", certificate_handling="/etc/ssl/cert.pem")


# ----------------------------------------------------------------------------- s3:// over TLS
def test_s3_over_https(nginx_tls, pki, s3_server, monkeypatch):
    """The S3 client trusts CAInfo / AWS_CA_BUNDLE; without the CA: a certificate error, fast."""
    opts = dict(s3_server.opts, s3_endpoint=nginx_tls["s3"])
    data = os.urandom(3 << 20)
    ca = CAInfo(cacert=str(pki["ca"]))
    with open_stream("s3://tls/blob.bin", "wb", certificate_handling=ca, **opts) as f:
        f.write(data)
    with open_stream("s3://tls/blob.bin", certificate_handling=ca, **opts) as f:
        assert f.read() == data

    start = time.perf_counter()
    with pytest.raises(TensorizerError, match="TLS certificate verification failed.*UnknownIssuer"):
        open_stream("s3://tls/blob.bin", **opts)
    assert time.perf_counter() - start < 5

    monkeypatch.setenv("AWS_CA_BUNDLE", str(pki["ca"]))
    with open_stream("s3://tls/blob.bin", **opts) as f:
        assert f.read() == data


def test_s3_allow_untrusted(nginx_tls, s3_server, caplog, tmp_path):
    """CAInfo(allow_untrusted=True) turns certificate checks off for s3:// too (as in CoreWeave,
    whose curl gets --insecure): writes (side files and TensorSerializer's multipart upload)
    and reads (open_stream and TensorDeserializer) through the TLS front whose CA nobody
    trusts, with one warning per stream."""
    import torch
    from tensorizer_rs import TensorSerializer

    opts = dict(s3_server.opts, s3_endpoint=nginx_tls["s3"])
    insecure = CAInfo(allow_untrusted=True)
    data = os.urandom(3 << 20)
    caplog.set_level("WARNING", logger="tensorizer_rs.stream_io")
    with open_stream("s3://tls/side.bin", "wb", certificate_handling=insecure, **opts) as f:
        f.write(data)
    with open_stream("s3://tls/side.bin", certificate_handling=insecure, **opts) as f:
        assert f.read() == data
    off = [r for r in caplog.records if "verification is off" in r.getMessage()]
    assert len(off) == 2 and all("s3://tls/side.bin" in r.getMessage() for r in off), off

    sd = {"a": torch.arange(3 << 20, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int8)}
    dest = open_stream("s3://tls/m.tensors", "wb", certificate_handling=insecure, **opts)
    with TensorSerializer(dest) as s:
        s.write_state_dict(sd)
    stream = open_stream("s3://tls/m.tensors", certificate_handling=insecure, **opts)
    d = TensorDeserializer(stream, device="cpu", verify_hash=True)
    assert d.keys() == sd.keys() and all(torch.equal(d[k], v) for k, v in sd.items())
    # Without it, the same endpoint is refused: the check is really off only on request.
    with pytest.raises(TensorizerError, match="TLS certificate verification failed"):
        open_stream("s3://tls/m.tensors", **opts)
