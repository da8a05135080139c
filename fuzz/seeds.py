#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/corpus/<target>/) from the tests' fixtures.

Run once when a target's input changes; the files are committed, so CI does not run
this (it needs python3-cryptography for the CSRs and the signed tokens). Seeds are
small and meaningful: a valid input of each shape, and the near-misses the unit
tests check. Crash inputs found by fuzzing are kept beside them (named crash-*), and
are not written here.
"""
import base64
import hashlib
import json
import os
import re
import struct
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


# -- load_config: the YAML fixtures of the model's and the proxy's tests.
write("load_config", "demo-mesh.yaml", read("demo/mesh.yaml"))
sources = ["crates/model/tests/model.rs", "crates/model/src/compile.rs", "crates/cli/tests/capture.rs"]
n = 0
for src in sources:
    for m in re.finditer(r'r#"(.*?)"#', read(src), re.S):
        text = m.group(1)
        if "apiVersion:" in text and len(text) < 4000 and n < 6:
            write("load_config", f"{os.path.basename(src).split('.')[0]}-{n}.yaml", text.lstrip("\n"))
            n += 1

# -- normalize_path: the unit test's table.
table = re.search(r"fn normalises_paths\(\) \{(.*?)\] \{", read("crates/model/src/authz.rs"), re.S).group(1)
for i, m in enumerate(re.finditer(r'\("((?:[^"\\]|\\.)*)", "', table)):
    write("normalize_path", f"path-{i:02}", m.group(1).encode().decode("unicode_escape"))

# -- jwt: mode byte 0 + a token (the Authorization value after "Bearer "), mode 1 + a JWKS.
K1_PEM = re.search(r'K1_PEM: &str = "(.*?)";', read("crates/proxy/src/jwt.rs"), re.S).group(1)
K1_X = "g5yoNJ13VCsqSxdEcXkDiAebShuGEG5uTkVjDi3_x6g"
K1_Y = "sD16hHHj_e0Jlq1FUXH6iE_7_bIPjjfpurFsKfzbohU"
K2_X = "AhhOXT7K51gbUkgSNQQwyUsxyB-OLbK21vABxYyRqGs"
K2_Y = "nCwj7JKFykwUyAIcwVRil9OGmQzGE_AvXgnK3vccqAM"
k1 = serialization.load_pem_private_key(K1_PEM.encode(), None)


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def token(header, claims, sign=True):
    h = b64(json.dumps(header, separators=(",", ":")).encode())
    c = b64(json.dumps(claims, separators=(",", ":")).encode())
    msg = f"{h}.{c}".encode()
    if sign:
        r, s = decode_dss_signature(k1.sign(msg, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        sig = b"\x00" * 64
    return f"{h}.{c}.{b64(sig)}"


ISS = "https://issuer.example"
good = {"iss": ISS, "sub": "alice", "aud": ["other", "catalog"], "exp": 2000000000,
        "nbf": 1700000000, "scope": "read write", "groups": ["a", "b"]}
es = {"alg": "ES256", "typ": "JWT", "kid": "k1"}
k1_token = token(es, {"iss": ISS, "sub": "alice", "aud": "catalog", "exp": 2000000000, "scope": "read"})
with open(os.path.join(ROOT, "fuzz", "fuzz_targets", "jwt_k1_token.txt"), "w") as f:
    f.write(k1_token + "\n")
write("jwt", "token-valid", b"\x00" + token(es, good).encode())
write("jwt", "token-expired", b"\x00" + token(es, dict(good, exp=1700000000)).encode())
write("jwt", "token-wrong-issuer", b"\x00" + token(es, dict(good, iss="https://evil.example")).encode())
write("jwt", "token-no-scope", b"\x00" + token(es, {k: v for k, v in good.items() if k != "scope"}).encode())
write("jwt", "token-alg-none", b"\x00" + token({"alg": "none"}, good, sign=False).encode())
write("jwt", "token-hs256", b"\x00" + token({"alg": "HS256", "kid": "k1"}, good, sign=False).encode())
write("jwt", "token-crit", b"\x00" + token(dict(es, crit=["exp"]), good, sign=False).encode())
write("jwt", "token-bad-sig", b"\x00" + token(es, good, sign=False).encode())
jwk1 = {"kty": "EC", "crv": "P-256", "x": K1_X, "y": K1_Y, "kid": "k1", "alg": "ES256", "use": "sig"}
jwk2 = {"kty": "EC", "crv": "P-256", "x": K2_X, "y": K2_Y, "kid": "k2", "alg": "ES256", "use": "sig"}
write("jwt", "jwks-k1", b"\x01" + json.dumps({"keys": [jwk1]}).encode())
write("jwt", "jwks-k2-k1", b"\x01" + json.dumps({"keys": [jwk2, dict(jwk1, alg=None)]}).encode())
write("jwt", "jwks-private", b"\x01" + json.dumps({"keys": [dict(jwk1, d="AAAA")]}).encode())
write("jwt", "jwks-oct", b"\x01" + json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).encode())
write("jwt", "jwks-ed25519", b"\x01" + json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519",
      "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "e1"}]}).encode())

# -- protocol: a shape byte, then a client's first bytes.
write("protocol", "http1-get", b"\x00GET / HTTP/1.1\r\nHost: catalog\r\n\r\n")
write("protocol", "h2-preface", b"\x1b" + b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
write("protocol", "not-quite-h2", b"\x07PRI * HTTP/1.1\r\n\r\n")
write("protocol", "connect", b"\x02CONNECT catalog.shop:80 HTTP/1.1\r\n\r\n")
write("protocol", "tls-hello", b"\x03\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
write("protocol", "redis", b"\x04*1\r\n$4\r\nPING\r\n")


# -- dns: queries for mesh names and others.
def query(qid, name, qtype, flags=0x0100):
    q = struct.pack(">HHHHHH", qid, flags, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack(">HH", qtype, 1)


write("dns", "a-catalog", query(0x1234, "catalog", 1))
write("dns", "a-catalog-fqdn", query(7, "catalog.shop.svc.cluster.local.", 1))
write("dns", "aaaa-kv", query(8, "kv.shop", 28))
write("dns", "aaaa-catalog", query(9, "catalog", 28))
write("dns", "a-elsewhere", query(10, "example.com", 1))
write("dns", "resolv-conf", "# comment\nsearch example\nnameserver 10.0.0.2\nnameserver ::1\n")

# -- spiffe
for i, s in enumerate([
    "spiffe://cluster.local/ns/shop/sa/web",
    "spiffe://example.org/ns/default/sa/default",
    "spiffe://cluster.local/operator/admin",
    "spiffe://td/a/b_c.d-e",
    "spiffe://TD/a",
    "spiffe://td/a/../b",
    "spiffe://user@td:443/a?q=1",
]):
    write("spiffe", f"id-{i}", s)

# -- csr: CSRs as a proxy makes them (P-256, empty subject), and others.
def csr(key, cn=None, san=None):
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]), False)
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algo).public_bytes(serialization.Encoding.DER)


write("csr", "p256-empty", csr(ec.generate_private_key(ec.SECP256R1())))
write("csr", "p256-asks-admin", csr(ec.generate_private_key(ec.SECP256R1()), "admin",
      "spiffe://cluster.local/ns/sinew-system/sa/admin"))
write("csr", "p384", csr(ec.generate_private_key(ec.SECP384R1())))
write("csr", "ed25519", csr(ed25519.Ed25519PrivateKey.generate()))
write("csr", "rsa2048", csr(rsa.generate_private_key(65537, 2048)))
bad = bytearray(csr(ec.generate_private_key(ec.SECP256R1())))
bad[-5] ^= 0xff
write("csr", "p256-bad-signature", bytes(bad))

# -- tap_filter: the unit tests' queries.
for i, q in enumerate([
    "direction=inbound&service=catalog&path=%2Fapi&method=get&status=5xx&limit=10",
    "path=%2Fapi&direction=outbound&status=5xx",
    "service=catalog.shop&status=503",
    "path=/a+b&method=POST",
    "status=5", "colour=red", "direction=sideways", "path=%zz",
]):
    write("tap_filter", f"query-{i}", q)

# -- grpc_timeout: grpc-timeout, a 0 byte, sinew-timeout-ms.
for i, t in enumerate([b"100m", b"2S\x001500", b"1H", b"99999999n\x005", b"5x", b"123456789m", b"\x00250"]):
    write("grpc_timeout", f"timeout-{i}", t)


# -- control_hello: a caller byte (0 none, 1 shop/web, 2 shop/catalog-v1), then a
#    ProxyMessage (or a bare Hello).
def varint(n):
    out = b""
    while True:
        b = n & 0x7f
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, value):
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


def registration(service, address, ports, sidecar=0, account="", labels=None):
    r = field(1, service) + field(2, address)
    for k, v in ports.items():
        r += field(3, field(1, k) + field(2, v))
    for k, v in (labels or {}).items():
        r += field(4, field(1, k) + field(2, v))
    if sidecar:
        r += field(5, sidecar)
    if account:
        r += field(6, account)
    return r


def hello(ns, name, reg=None, capture=None):
    h = field(1, ns) + field(2, name) + field(5, "0.1.0")
    if reg is not None:
        h += field(3, reg)
    if capture is not None:
        h += field(6, capture)
    return h


v1 = registration("catalog-v1", "127.0.0.1", {"http": 18081}, 14143, labels={"version": "v1"})
cap = field(1, 15001) + field(2, 15006) + field(3, varint(6379)) + field(4, "3s") + field(5, 15053)
write("control_hello", "catalog-v1-registers", b"\x02" + field(1, hello("shop", "catalog-v1-1", v1)))
write("control_hello", "plaintext-registers", b"\x00" + field(1, hello("shop", "catalog-v1-1", v1)))
write("control_hello", "web-captured", b"\x01" + field(1, hello("shop", "web", capture=cap)))
write("control_hello", "web-claims-catalog", b"\x01" + field(1, hello("shop", "web-1",
      registration("catalog", "10.0.0.7", {"http": 8080}, account="web"))))
write("control_hello", "bare-hello", b"\x02" + hello("", "catalog-v1-2",
      registration("catalog-v1", "::1", {"http": 18081})))
write("control_hello", "ack", b"\x02" + field(2, field(1, "abc") + field(2, "1")))
print("seeds written under", CORPUS, file=sys.stderr)
