#!/usr/bin/env python3
"""Inputs for edge-est's fuzz targets, made with the Python standard library and the openssl CLI.

    corpus_gen.py seeds DIR      seed corpora, DIR/<target>/<name> (not checked in)
    corpus_gen.py fixtures DIR   the malformed-input fixtures (checked in, tests/fixtures/malformed)

Every key made here is throw-away and never written out, except the csr_signed key, which is
derived from a constant (32 bytes of 0x42, the same seed as fuzz/src/lib.rs fixed_ed25519) and
only exists in a temporary directory while openssl needs it.
"""

import base64
import json
import os
import subprocess
import sys
import tempfile

# --- DER ----------------------------------------------------------------------------------------


def length(n):
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def tlv(tag, content):
    return bytes([tag]) + length(len(content)) + content


def seq(*parts):
    return tlv(0x30, b"".join(parts))


def set_(*parts):
    return tlv(0x31, b"".join(parts))


def integer(n):
    return tlv(0x02, n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big"))


def oid(dotted):
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([arcs[0] * 40 + arcs[1]])
    for arc in arcs[2:]:
        groups = [arc & 0x7F]
        arc >>= 7
        while arc:
            groups.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(groups))
    return tlv(0x06, bytes(out))


def utf8(s):
    return tlv(0x0C, s.encode())


def printable(s):
    return tlv(0x13, s.encode())


def octets(b):
    return tlv(0x04, b)


def bits(b):
    return tlv(0x03, b"\x00" + b)


def ctx(n, content, constructed=True):
    return tlv((0xA0 if constructed else 0x80) | n, content)


def split_tlv(der):
    """(tag, header length, content length) of the TLV at the start of der."""
    first = der[1]
    if first < 0x80:
        return der[0], 2, first
    n = first & 0x7F
    return der[0], 2 + n, int.from_bytes(der[2 : 2 + n], "big")


def children(der):
    """The TLVs inside a constructed TLV."""
    _, hl, ln = split_tlv(der)
    content, out = der[hl : hl + ln], []
    while content:
        _, chl, cln = split_tlv(content)
        out.append(content[: chl + cln])
        content = content[chl + cln :]
    return out


def indefinite(der, depth):
    """Re-encodes the outer `depth` levels of constructed TLVs with indefinite lengths."""
    tag = der[0]
    if depth == 0 or not tag & 0x20:
        return der
    inner = b"".join(indefinite(c, depth - 1) for c in children(der))
    return bytes([tag, 0x80]) + inner + b"\x00\x00"


ATTR = {
    "CN": "2.5.4.3",
    "O": "2.5.4.10",
    "OU": "2.5.4.11",
    "C": "2.5.4.6",
    "ST": "2.5.4.8",
    "L": "2.5.4.7",
    "DC": "0.9.2342.19200300.100.1.25",
    "serialNumber": "2.5.4.5",
    "emailAddress": "1.2.840.113549.1.9.1",
}


def name(*rdns):
    """rdns: lists of (type, encoded value) pairs, one list per RDN."""
    return seq(*(set_(*(seq(oid(ATTR.get(t, t)), v) for t, v in rdn)) for rdn in rdns))


def cn_name(cn):
    return name([("CN", utf8(cn))])


def extension(ext_oid, value, critical=False):
    return seq(oid(ext_oid), *([tlv(0x01, b"\xff")] if critical else []), octets(value))


def attribute(attr_oid, *values):
    return seq(oid(attr_oid), set_(*values))


def ext_request(*extensions):
    return attribute("1.2.840.113549.1.9.14", seq(*extensions))


def san(*names):
    return extension("2.5.29.17", seq(*names))


def cri(subject, spki, *attributes, version=0):
    return seq(integer(version), subject, spki, ctx(0, b"".join(attributes)))


# --- openssl ------------------------------------------------------------------------------------


def openssl(*args, stdin=None):
    return subprocess.run(
        ["openssl", *args], input=stdin, check=True, capture_output=True
    ).stdout


class Keys:
    """Throw-away keys and the fixed csr_signed key, in a temporary directory."""

    def __init__(self, tmp):
        self.tmp = tmp

    def path(self, name):
        return os.path.join(self.tmp, name)

    def key(self, name, *genpkey_args):
        path = self.path(name + ".key")
        if not os.path.exists(path):
            openssl("genpkey", *genpkey_args, "-out", path)
        return path

    def fixed(self):
        path = self.path("fixed-ed25519.key")
        if not os.path.exists(path):
            pkcs8 = bytes.fromhex("302e020100300506032b657004220420") + b"\x42" * 32
            with open(path + ".der", "wb") as f:
                f.write(pkcs8)
            openssl("pkey", "-inform", "DER", "-in", path + ".der", "-out", path)
        return path

    def fixed_spki(self):
        return openssl("pkey", "-in", self.fixed(), "-pubout", "-outform", "DER")

    def csr(self, key, subj="/CN=device1", *extra):
        return openssl(
            "req", "-new", "-key", key, "-subj", subj, "-outform", "DER", *extra
        )

    def ec(self, name="ec256"):
        return self.key(name, "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")

    def cert_pem(self, name, subj):
        key = self.ec("cert-" + name)
        return openssl(
            "req", "-x509", "-new", "-key", key, "-subj", subj, "-days", "30",
            "-addext", "basicConstraints=critical,CA:TRUE",
        )

    def pkcs7(self, *cert_pems):
        path = self.path("certs.pem")
        with open(path, "wb") as f:
            f.write(b"".join(cert_pems))
        return openssl("crl2pkcs7", "-nocrl", "-certfile", path, "-outform", "DER")


def first_tlv(der):
    """The first element of a SEQUENCE (a CSR's CertificationRequestInfo)."""
    return children(der)[0]


def signed_data(certs, version=1, content_type="1.2.840.113549.1.7.2"):
    sd = seq(
        integer(version), set_(), seq(oid("1.2.840.113549.1.7.1")),
        ctx(0, b"".join(certs)), set_(),
    )
    return seq(oid(content_type), ctx(0, sd))


def pem(label, der):
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----\n".encode()


# --- seeds --------------------------------------------------------------------------------------


def sample_config(**extra):
    config = {
        "listen": "0.0.0.0:8085",
        "journal": "/data/journal.jsonl",
        "tls": {"certificate": "server.pem", "key": "server.key"},
        "limits": {"max_body_bytes": 65536, "max_connections": 1024},
        "trust": {"bootstrap": {"certificates": ["factory-ca.pem"]}},
        "users": {"estuser": "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"},
        "issuers": {"plant": {"certificate": "issuing-ca.pem", "key": "issuing-ca.key"}},
        "profiles": {
            "identity": {"kind": "end-entity", "validity_days": 90,
                         "extended_key_usage": ["clientAuth"]},
        },
        "labels": [
            {
                "issuer": "plant",
                "client_trust": ["bootstrap", "issuer"],
                "csr_attributes": ["ecdsa-with-SHA256", "ecPublicKey=secp256r1"],
                "serverkeygen": "ec-p256",
                "deny": ["cn:stolen-device", "user:former-employee"],
                "authentication": {"certificate": True, "basic": True,
                                   "require_both": False, "anonymous_cacerts": True},
                "rules": [
                    {"match": ["certificate:bootstrap"], "common_names": ["{cn}"]},
                    {"match": ["user:estuser"], "common_names": ["plant1-*"],
                     "ip_addresses": ["10.1.*"], "dns_names": ["*.plant.local"],
                     "subject_attributes": {"O": ["Contoso"], "OU": ["*"]}},
                ],
            },
            {"name": "edge-ca", "mode": "forward", "upstream": "parent"},
        ],
        "upstreams": {
            "parent": {"url": "https://parent:8085/.well-known/est",
                       "trust": ["root.pem"], "username": "gw",
                       "password_file": "/secrets/pw"},
        },
    }
    config.update(extra)
    return config


SAMPLE_TOML = b"""listen = "0.0.0.0:8085"
journal = "/data/journal.jsonl"

[tls]
certificate = "server.pem"
key = "server.key"

[users]
estuser = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"

[issuers.plant]
certificate = "issuing-ca.pem"
key = "issuing-ca.key"

[[labels]]
issuer = "plant"
csr_attributes = ["ecdsa-with-SHA256"]

[[labels.rules]]
match = ["user:estuser"]
common_names = ["plant1-*"]
subject_attributes = { O = ["Contoso"], OU = ["*"] }
"""


def seeds(keys):
    s = {t: {} for t in (
        "body_csr", "csr_der", "csr_signed", "pkcs7_certs_only", "route", "basic_auth",
        "config", "pattern", "csrattrs")}

    # CSRs of every accepted key kind, and some extensions.
    csrs = {
        "ec-p256": keys.csr(keys.ec()),
        "ec-p384": keys.csr(keys.key("ec384", "-algorithm", "EC", "-pkeyopt",
                                     "ec_paramgen_curve:P-384"), "/CN=device2", "-sha384"),
        "rsa-2048": keys.csr(keys.key("rsa", "-algorithm", "RSA", "-pkeyopt",
                                      "rsa_keygen_bits:2048"), "/CN=device3/O=Contoso"),
        "ed25519": keys.csr(keys.key("ed25519", "-algorithm", "ED25519"), "/CN=device4"),
        "ec-sans": keys.csr(keys.ec(), "/CN=plant1-gw/O=Contoso/OU=line 2", "-addext",
                            "subjectAltName=DNS:gw.plant.local,IP:10.1.2.3,IP:::1,"
                            "URI:urn:dev:1,email:a@b.c"),
        "ec-ca": keys.csr(keys.ec(), "/CN=aziot-edge CA gw1", "-addext",
                          "basicConstraints=critical,CA:TRUE,pathlen:0", "-addext",
                          "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"),
        "ec-eku": keys.csr(keys.ec(), "/CN=device5", "-addext",
                           "extendedKeyUsage=clientAuth,serverAuth,1.2.3.4"),
    }
    for n, der in csrs.items():
        s["csr_der"][n] = der
        s["body_csr"][n + ".der"] = der
        s["body_csr"][n + ".pem"] = pem("CERTIFICATE REQUEST", der)
        b64 = base64.b64encode(der)
        s["body_csr"][n + ".b64"] = b64
        s["body_csr"][n + "-wrapped.b64"] = base64.encodebytes(der)
    s["body_csr"]["pem-in-base64.b64"] = base64.b64encode(pem("CERTIFICATE REQUEST", csrs["ec-p256"]))
    s["body_csr"]["crlf-unpadded.b64"] = b"\r\n".join(
        base64.b64encode(csrs["ec-sans"]).rstrip(b"=")[i : i + 76] for i in range(0, 600, 76))

    # CertificationRequestInfos for the fixed key (csr_signed).
    spki = keys.fixed_spki()
    fixed = keys.fixed()
    signed = {
        "plain": keys.csr(fixed),
        "sans": keys.csr(fixed, "/CN=plant1-gw/O=Contoso/OU=x/C=DE/ST=Bayern/L=Munich/DC=plant",
                         "-addext", "subjectAltName=DNS:gw.plant.local,IP:10.1.2.3,"
                         "IP:fe80::1,URI:https://x/y,email:ops@plant.local"),
        "ca": keys.csr(fixed, "/CN=aziot-edge CA gw1", "-addext",
                       "basicConstraints=critical,CA:TRUE,pathlen:0", "-addext",
                       "keyUsage=keyCertSign"),
        "eku-challenge": keys.csr(fixed, "/CN=device6/serialNumber=1234", "-addext",
                                  "extendedKeyUsage=clientAuth",
                                  "-addext", "subjectKeyIdentifier=hash"),
    }
    for n, der in signed.items():
        s["csr_signed"][n] = first_tlv(der)
    s["csr_signed"]["challenge-password"] = cri(
        cn_name("device7"), spki, attribute("1.2.840.113549.1.9.7", utf8("secret-otp")))
    s["csr_signed"]["bmp-teletex"] = cri(
        name([("CN", tlv(0x1E, "gw-\u00e9".encode("utf-16-be")))], [("O", tlv(0x14, b"Caf\xe9"))],
             [("2.5.4.4", tlv(0x1C, "x".encode("utf-32-be")))]), spki)
    s["csr_signed"]["othername"] = cri(cn_name("d"), spki, ext_request(
        san(ctx(0, oid("1.3.6.1.4.1.311.20.2.3") + ctx(0, utf8("upn@x"))),
            ctx(7, bytes([10, 1, 2, 3]), constructed=False))))

    # Certs-only PKCS#7: DER from openssl, BER (indefinite lengths), text forms.
    leaf = keys.cert_pem("leaf", "/CN=leaf")
    ca = keys.cert_pem("ca", "/CN=Issuing CA/O=Contoso")
    p7 = keys.pkcs7(leaf, ca)
    one = keys.pkcs7(leaf)
    s["pkcs7_certs_only"]["two-certs.der"] = p7
    s["pkcs7_certs_only"]["one-cert.der"] = one
    s["pkcs7_certs_only"]["two-certs.b64"] = base64.encodebytes(p7)
    s["pkcs7_certs_only"]["two-certs.pem"] = pem("PKCS7", p7)
    s["pkcs7_certs_only"]["indefinite.ber"] = indefinite(p7, 3)
    s["pkcs7_certs_only"]["indefinite.b64"] = base64.encodebytes(indefinite(p7, 3))
    s["pkcs7_certs_only"]["empty-set.der"] = signed_data([])
    data = keys.path("content.txt")
    with open(data, "wb") as f:
        f.write(b"x" * 3000)
    s["pkcs7_certs_only"]["cms-streamed.ber"] = openssl(
        "cms", "-sign", "-in", data, "-signer", _write(keys, "leaf.pem", leaf),
        "-inkey", keys.ec("cert-leaf"), "-outform", "DER", "-stream", "-nodetach", "-binary")

    for i, p in enumerate([
        "/.well-known/est/cacerts", "/.well-known/est/simpleenroll",
        "/.well-known/est/simplereenroll", "/.well-known/est/csrattrs",
        "/.well-known/est/serverkeygen", "/.well-known/est/edge-ca/simpleenroll",
        "/.well-known/est/A.b_c~d-9/cacerts", "/.well-known/est/fullcmc",
        "application/pkcs10", "Application/X-PKCS10; charset=utf-8",
    ]):
        s["route"][f"seed-{i}"] = p.encode()

    cred = lambda u, p: b"Basic " + base64.b64encode(f"{u}:{p}".encode())
    s["basic_auth"]["estuser"] = cred("estuser", "s3cret:with:colons")
    s["basic_auth"]["unicode"] = cred("\u00fcser", "p\u00e4ss")
    s["basic_auth"]["lowercase"] = b"basic  " + base64.b64encode(b"a:") + b"  "

    s["config"]["full.json"] = json.dumps(sample_config(), indent=1).encode()
    s["config"]["minimal.json"] = json.dumps({
        "journal": "j", "tls": {"certificate": "c", "key": "k"}, "labels": []}).encode()
    s["config"]["full.toml"] = SAMPLE_TOML

    for i, p in enumerate([
        "plant1-*\nplant1-gw", "{cn}\ndevice1\ndevice1", "{user}-*\nestuser-x\n\nestuser",
        "*.Plant.local\nGW.plant.LOCAL", "a*b*c*d\naXbXcXd", "*\n", "10.1.*\n10.1.2.3",
        "aziot-edge CA {cn}\naziot-edge CA gw\ngw",
    ]):
        s["pattern"][f"seed-{i}"] = p.encode()

    for i, a in enumerate([
        "ecdsa-with-SHA256", "ecPublicKey=secp256r1", "1.2.840.10045.2.1=1.3.132.0.34,secp256r1",
        "challengePassword\nextensionRequest\nEd25519", "1.2.128.16384.4294967295",
        " rsaEncryption = 1.2.3 , 2.39.9 ",
    ]):
        s["csrattrs"][f"seed-{i}"] = a.encode()
    return s


def _write(keys, name, content):
    path = keys.path(name)
    with open(path, "wb") as f:
        f.write(content)
    return path


# --- malformed fixtures -------------------------------------------------------------------------


def fixtures(keys):
    f = {}
    csr = keys.csr(keys.ec(), "/CN=device1")
    csr_pem = pem("CERTIFICATE REQUEST", csr)
    flipped = csr[:-1] + bytes([csr[-1] ^ 0x01])

    # Request bodies.
    f["body-empty.txt"] = b""
    f["body-whitespace-only.txt"] = b" \r\n\t \n"
    f["body-bad-base64.txt"] = b"MIIB\nAA%A\n"
    f["body-truncated-base64.txt"] = b"MIIBA"
    f["body-pem-no-end-line.txt"] = csr_pem.split(b"-----END")[0]
    f["body-pem-unclosed-begin.txt"] = b"-----BEGIN CERTIFICATE REQUEST\nMIIB\n-----END X-----"
    f["body-pem-empty.txt"] = b"-----BEGIN X-----\n\n-----END X-----\n"
    f["body-base64-not-a-csr.txt"] = base64.b64encode(b"hello, world")
    f["body-der-empty-sequence.der"] = b"\x30\x00"
    f["body-der-length-overflow.der"] = b"\x30\x84\xff\xff\xff\xff" + b"\x00" * 8
    f["body-der-trailing-byte.der"] = csr + b"\x00"
    f["body-nul-bytes.bin"] = b"\x00" * 1000
    f["body-pem-bad-signature.pem"] = pem("CERTIFICATE REQUEST", flipped)
    f["body-base64-of-pem-of-garbage.txt"] = base64.b64encode(pem("X", b"\x01\x02\x03"))
    f["body-nested-pem.txt"] = pem("A", pem("B", csr))

    # Raw CSRs.
    _, hl, _ = split_tlv(csr)
    info = first_tlv(csr)
    _, ihl, _ = split_tlv(info)
    f["csr-empty.der"] = b""
    f["csr-truncated.der"] = csr[: len(csr) // 2]
    f["csr-trailing-data.der"] = csr + b"\x05\x00"
    f["csr-bad-signature.der"] = flipped
    f["csr-version-1.der"] = csr[: hl + ihl + 2] + b"\x01" + csr[hl + ihl + 3 :]
    f["csr-indefinite-length.ber"] = indefinite(csr, 1)
    f["csr-deep-nesting.ber"] = b"\x30\x80" * 5000 + b"\x00\x00" * 5000
    f["csr-length-overflow.der"] = b"\x30\x84\xff\xff\xff\xf0" + csr[hl:]
    f["csr-rsa-1024.der"] = keys.csr(keys.key("rsa1024", "-algorithm", "RSA", "-pkeyopt",
                                              "rsa_keygen_bits:1024"))
    f["csr-ecdsa-sha1.der"] = keys.csr(keys.ec(), "/CN=device1", "-sha1")
    f["csr-ed448-key.der"] = keys.csr(keys.key("ed448", "-algorithm", "ED448"))
    f["csr-ec-p521-key.der"] = keys.csr(keys.key("ec521", "-algorithm", "EC", "-pkeyopt",
                                                 "ec_paramgen_curve:P-521"))
    # Checks made before the signature, so no valid signature is needed.
    junk_sig = bits(b"\x5a" * 256)
    sha256_rsa = seq(oid("1.2.840.113549.1.1.11"), tlv(0x05, b""))

    def rsa_spki(modulus_bits, exponent):
        rsa_key = seq(integer((1 << (modulus_bits - 1)) | 1), integer(exponent))
        return seq(seq(oid("1.2.840.113549.1.1.1"), tlv(0x05, b"")), bits(rsa_key))

    def forged(spki, alg=sha256_rsa, sig=junk_sig, attrs=b""):
        return seq(cri(cn_name("x"), spki, attrs), alg, sig)

    f["csr-rsa-exponent-40-bits.der"] = forged(rsa_spki(2048, (1 << 39) + 1))
    f["csr-rsa-even-exponent.der"] = forged(rsa_spki(2048, 65536))
    f["csr-rsa-8192-bits.der"] = forged(rsa_spki(8192, 65537))
    f["csr-md5-with-rsa.der"] = forged(rsa_spki(2048, 65537),
                                       alg=seq(oid("1.2.840.113549.1.1.4"), tlv(0x05, b"")))
    f["csr-ecdsa-signature-rsa-key.der"] = forged(rsa_spki(2048, 65537),
                                                  alg=seq(oid("1.2.840.10045.4.3.2")))
    f["csr-signature-unused-bits.der"] = forged(rsa_spki(2048, 65537),
                                                sig=tlv(0x03, b"\x03" + b"\x5a" * 256))
    f["csr-signature-params-not-null.der"] = forged(
        rsa_spki(2048, 65537), alg=seq(oid("1.2.840.113549.1.1.11"), integer(7)))
    f["csr-ec-compressed-point.der"] = forged(
        seq(seq(oid("1.2.840.10045.2.1"), oid("1.2.840.10045.3.1.7")), bits(b"\x02" + b"\x11" * 32)),
        alg=seq(oid("1.2.840.10045.4.3.2")))
    f["csr-ec-no-curve.der"] = forged(
        seq(seq(oid("1.2.840.10045.2.1")), bits(b"\x04" + b"\x11" * 64)),
        alg=seq(oid("1.2.840.10045.4.3.2")))
    f["csr-malformed-oid.der"] = forged(
        seq(seq(tlv(0x06, b"\x2a\x86")), bits(b"\x04" + b"\x11" * 64)),
        alg=seq(oid("1.2.840.10045.4.3.2")))

    # CertificationRequestInfos signed by the harness (csr_signed): past proof of possession.
    spki = keys.fixed_spki()
    ok_cri = first_tlv(keys.csr(keys.fixed(), "/CN=device1"))
    f["cri-truncated.der"] = ok_cri[:-7]
    f["cri-version-1.der"] = cri(cn_name("d"), spki, version=1)
    f["cri-no-common-name.der"] = cri(name([("O", utf8("Contoso"))]), spki)
    f["cri-empty-subject.der"] = cri(seq(), spki)
    f["cri-repeated-cn.der"] = cri(name([("CN", utf8("a"))], [("CN", utf8("b"))]), spki)
    f["cri-multi-valued-rdn.der"] = cri(name([("CN", utf8("a")), ("OU", utf8("b"))]), spki)
    f["cri-cn-nul-byte.der"] = cri(cn_name("good\0.evil.example"), spki)
    f["cri-cn-integer-value.der"] = cri(name([("CN", integer(5))]), spki)
    f["cri-cn-bmpstring-odd-length.der"] = cri(name([("CN", tlv(0x1E, b"\x00a\x00"))]), spki)
    f["cri-cn-bmpstring-lone-surrogate.der"] = cri(name([("CN", tlv(0x1E, b"\xd8\x00"))]), spki)
    f["cri-cn-utf8-invalid.der"] = cri(name([("CN", tlv(0x0C, b"\xff\xfe"))]), spki)
    f["cri-cn-context-tag.der"] = cri(name([("CN", ctx(3, b"x", constructed=False))]), spki)
    f["cri-cn-control-chars.der"] = cri(cn_name("a\r\nb\x1b[31m\u202e"), spki)
    f["cri-country-not-printable.der"] = cri(
        name([("CN", utf8("d"))], [("C", utf8("\u00dc\u00dc"))]), spki)
    f["cri-dc-not-ascii.der"] = cri(name([("CN", utf8("d"))], [("DC", utf8("\u00e9"))]), spki)
    f["cri-unlisted-attribute-huge-arc.der"] = cri(
        name([("CN", utf8("d"))], [(f"2.5.4.{1 << 70}", utf8("x"))]), spki)
    f["cri-wrong-key-for-signature.der"] = cri(
        cn_name("d"), openssl("pkey", "-in", keys.ec(), "-pubout", "-outform", "DER"))
    f["cri-san-othername.der"] = cri(cn_name("d"), spki, ext_request(
        san(ctx(0, oid("1.3.6.1.4.1.311.20.2.3") + ctx(0, utf8("upn@x"))))))
    f["cri-san-ip-5-bytes.der"] = cri(cn_name("d"), spki, ext_request(
        san(ctx(7, b"\x0a\x01\x02\x03\x04", constructed=False))))
    f["cri-san-dns-not-ascii.der"] = cri(cn_name("d"), spki, ext_request(
        san(ctx(2, "b\u00fccher.example".encode(), constructed=False))))
    f["cri-san-malformed.der"] = cri(cn_name("d"), spki, ext_request(
        extension("2.5.29.17", b"\x30\x05\x82\x09abc")))
    f["cri-eku-malformed.der"] = cri(cn_name("d"), spki, ext_request(
        extension("2.5.29.37", seq(integer(1)))))
    f["cri-extension-request-twice.der"] = cri(
        cn_name("d"), spki, ext_request(san(ctx(2, b"a", False))),
        ext_request(san(ctx(2, b"b", False))))
    f["cri-extension-repeated.der"] = cri(cn_name("d"), spki, ext_request(
        san(ctx(2, b"a", False)), san(ctx(2, b"b", False))))
    f["cri-challenge-password-two-values.der"] = cri(cn_name("d"), spki, attribute(
        "1.2.840.113549.1.9.7", utf8("one"), utf8("two")))
    f["cri-challenge-password-integer.der"] = cri(cn_name("d"), spki, attribute(
        "1.2.840.113549.1.9.7", integer(1234)))
    f["cri-attribute-not-a-set.der"] = cri(cn_name("d"), spki, seq(
        oid("1.2.840.113549.1.9.7"), seq(utf8("x"))))
    # OIDs under another tag (asn1-rs reads any primitive TLV as an OID).
    f["cri-attribute-type-integer-tag.der"] = cri(
        seq(set_(seq(tlv(0x02, oid("2.5.4.3")[2:]), utf8("d")))), spki)
    f["cri-spki-algorithm-integer-tag.der"] = cri(
        cn_name("d"), seq(seq(tlv(0x02, b"\x2b\x65\x70")), spki[-35:]))
    f["cri-extension-oid-integer-tag.der"] = cri(cn_name("d"), spki, ext_request(
        seq(tlv(0x02, oid("2.5.29.17")[2:]), octets(seq(ctx(2, b"x.example", False))))))
    f["cri-extension-request-not-a-sequence.der"] = cri(cn_name("d"), spki, attribute(
        "1.2.840.113549.1.9.14", integer(0)))

    # Certs-only PKCS#7.
    leaf = keys.cert_pem("leaf", "/CN=leaf")
    p7 = keys.pkcs7(leaf)
    cert = children(children(children(children(p7)[1])[0])[3])[0]
    _, chl, cln = split_tlv(cert)
    f["pkcs7-empty.txt"] = b""
    f["pkcs7-truncated.der"] = p7[: len(p7) - 40]
    f["pkcs7-trailing-data.der"] = p7 + b"\x00\x00"
    f["pkcs7-indefinite-length.ber"] = indefinite(p7, 3)
    f["pkcs7-indefinite-length-no-end-of-contents.ber"] = indefinite(p7, 3)[:-2]
    f["pkcs7-indefinite-length-primitive.ber"] = b"\x30\x80\x04\x80\x00\x00\x00\x00"
    f["pkcs7-deep-nesting.ber"] = b"\x30\x80" * 60 + b"\x00\x00" * 60
    f["pkcs7-high-tag-number.ber"] = b"\x30\x80\x1f\xff\xff\xff\xff\xff\x01\x00\x00\x00"
    f["pkcs7-length-overflow.der"] = b"\x30\x84\xff\xff\xff\xff" + p7[4:]
    f["pkcs7-wrong-content-type.der"] = signed_data([cert], content_type="1.2.840.113549.1.7.1")
    f["pkcs7-signeddata-version-9.der"] = signed_data([cert], version=9)
    f["pkcs7-certificate-not-a-sequence.der"] = signed_data([ctx(1, cert[chl:])])
    f["pkcs7-certificate-truncated.der"] = signed_data([seq(cert[chl : chl + cln - 10])])
    f["pkcs7-certificate-long-form-length.ber"] = signed_data(
        [b"\x30\x84" + cln.to_bytes(4, "big") + cert[chl:]])
    f["pkcs7-constructed-octet-string-holds-integer.ber"] = (
        b"\x30\x80" + oid("1.2.840.113549.1.7.2") + b"\xa0\x80\x30\x80" + integer(1) + set_()
        + b"\x30\x80" + oid("1.2.840.113549.1.7.1") + b"\xa0\x80\x24\x80" + integer(7)
        + b"\x00\x00\x00\x00\x00\x00" + set_() + b"\x00\x00\x00\x00\x00\x00")
    f["pkcs7-bad-base64.txt"] = b"MIIB%%%%\n"
    f["pkcs7-pem-no-end-line.txt"] = pem("PKCS7", p7).split(b"-----END")[0]
    f["pkcs7-base64-of-garbage.txt"] = base64.b64encode(b"not a PKCS#7 message")

    # Paths.
    for n, p in {
        "empty": b"", "dotdot": b"/.well-known/est/../cacerts",
        "dotdot-deep": b"/.well-known/est/../../etc/passwd",
        "percent-encoded-dotdot": b"/.well-known/est/%2E%2E/cacerts",
        "double-slash": b"/.well-known/est//cacerts", "trailing-slash": b"/.well-known/est/cacerts/",
        "label-too-long": b"/.well-known/est/" + b"x" * 65 + b"/cacerts",
        "control-chars": b"/.well-known/est/\x1b[31m\xe2\x80\xae\r\n/cacerts",
        "unknown-operation": b"/.well-known/est/fullcmc",
        "operation-as-label": b"/.well-known/est/SimpleEnroll/cacerts",
        "many-slashes": b"/.well-known/est/" + b"a/" * 10000,
        "invalid-utf8": b"/.well-known/est/\xff\xfe/cacerts",
        "nul-byte": b"/.well-known/est/a\x00b/cacerts",
        "query-string": b"/.well-known/est/cacerts?x=1",
        "huge-operation": b"/.well-known/est/" + "\u00e9".encode() * 5000,
        "absolute-uri": b"https://h/.well-known/est/cacerts",
        "no-operation": b"/.well-known/est",
    }.items():
        f[f"path-{n}.txt"] = p

    # Authorization headers.
    for n, h in {
        "empty": b"", "bearer": b"Bearer abc", "bad-base64": b"Basic !!!",
        "no-colon": b"Basic " + base64.b64encode(b"estuser"),
        "empty-user": b"Basic " + base64.b64encode(b":pw"),
        "invalid-utf8-credentials": b"Basic " + base64.b64encode(b"\xff:\xfe"),
        "scheme-only": b"Basic", "invalid-utf8-header": b"\xffBasic abc",
        "unpadded": b"Basic " + base64.b64encode(b"ab:c").rstrip(b"="),
    }.items():
        f[f"auth-{n}.txt"] = h

    # Configuration documents.
    fake_key = ("-----BEGIN PRIVATE KEY-----\nTk9UIEEgS0VZIC0tIGp1bmsgZm9yIGEgdGVzdA==\n"
                "-----END PRIVATE KEY-----\n")
    f["config-fake-private-key-inline.json"] = json.dumps(sample_config(
        tls={"certificate": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
             + fake_key, "key": "server.key"}), indent=1).encode()
    f["config-fake-private-key-in-trust.toml"] = SAMPLE_TOML + (
        '\n[trust.factory]\ncertificates = ["""\n-----BEGIN EC PRIVATE KEY-----\n'
        'anVuaw==\n-----END EC PRIVATE KEY-----\n"""]\n').encode()
    f["config-plaintext-password.json"] = json.dumps(sample_config(
        users={"estuser": "hunter2"})).encode()
    f["config-unknown-field.json"] = json.dumps(sample_config(extra_field=1)).encode()
    f["config-truncated.json"] = json.dumps(sample_config()).encode()[:300]
    f["config-deeply-nested.json"] = b"[" * 20000 + b"]" * 20000
    f["config-deeply-nested.toml"] = b"a = " + b"[" * 20000 + b"]" * 20000
    f["config-labels-wrong-type.json"] = json.dumps(sample_config(labels="x")).encode()
    f["config-bad-listen.json"] = json.dumps(sample_config(listen="not an address")).encode()
    f["config-huge-number.json"] = json.dumps(sample_config()).replace(
        "65536", "99999999999999999999999").encode()
    f["config-duplicate-field.json"] = b'{"journal": "a", "journal": "b"}'
    f["config-not-utf8.bin"] = b'{"journal": "\xff"}'
    f["config-bad-mode.json"] = json.dumps(sample_config(labels=[{"mode": "teleport"}])).encode()

    # Patterns: pattern, value[, cn[, user]].
    for n, p in {
        "unknown-placeholder": "{device}\nx", "unclosed-brace": "{cn\nx",
        "stray-closing-brace": "x}\nx",
        "many-stars": "*a" * 2000 + "*b\n" + "a" * 4000,
        "missing-cn": "{cn}\n", "missing-user": "x-{user}\nx-\nsomecn",
        "cn-with-star": "{cn}\nabc\na*c",
        "multibyte-fold": "\u00e9*\n\u00c9x",
    }.items():
        f[f"pattern-{n}.txt"] = p.encode()

    # csrattrs configuration entries.
    for n, a in {
        "unknown-name": "secp256k2", "huge-arc": "1.2.99999999999999999999",
        "first-arc-3": "3.1.2", "second-arc-40": "1.40.3", "empty-value": "ecPublicKey=",
        "duplicate-value": "ecPublicKey=secp256r1,prime256v1", "double-dot": "1..2",
        "too-long": ".".join(["1", "2"] + ["4294967295"] * 30), "one-arc": "1",
        "two-short-arcs": "1.2", "empty": "", "only-equals": "=",
    }.items():
        f[f"csrattrs-{n}.txt"] = a.encode()
    return f


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("seeds", "fixtures"):
        sys.exit(__doc__)
    out = sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        keys = Keys(tmp)
        if sys.argv[1] == "seeds":
            for target, files in seeds(keys).items():
                os.makedirs(os.path.join(out, target), exist_ok=True)
                for n, content in files.items():
                    with open(os.path.join(out, target, n), "wb") as fh:
                        fh.write(content)
        else:
            os.makedirs(out, exist_ok=True)
            for n, content in fixtures(keys).items():
                with open(os.path.join(out, n), "wb") as fh:
                    fh.write(content)


if __name__ == "__main__":
    main()
