"""A real RFC 3161 time-stamping authority on loopback, for tests.

`openssl ts -reply` behind a small `http.server.ThreadingHTTPServer` on 127.0.0.1 (port 0)
in a thread. Use it from a test module with::

    from tsa import Tsa
    from tsa import tsa as tsa_fixture  # noqa: F401  (registers the fixture named "tsa")

    def test_something(tsa: Tsa) -> None:
        ... tsa.url, tsa.ca_path, tsa.tsa_cert_path, tsa.mode = "down", tsa.requests ...

(A plain `from tsa import tsa` works as well, but ruff then flags every test parameter named
`tsa` as a redefinition of the import, F811.)

The certificates are generated once per test session with the `openssl` binary (a throwaway
root CA, a TSA certificate it signs with `extendedKeyUsage = critical,timeStamping`, a second
untrusted root with its own TSA, and two deliberately bad TSA certificates); every `tsa`
fixture gets its own server, serial and work directory.

Modes (`tsa.mode`, switchable at any time):

- "ok": a granted token from `openssl ts -reply` for the query as received.
- "down": HTTP 503. (`tsa.stop()` / `tsa.start()` really close and reopen the listening
  socket on the same port, for "nothing listens".)
- "busy": HTTP 429.  "bad_request": HTTP 400.  "garbage": HTTP 200 with a body that is no DER.
- "slow": waits up to `slow_seconds` (or until teardown) before answering as "ok".
- "rejected": the TSA only accepts sha512 imprints, so openssl answers status "rejection".
- "untrusted": signed by a TSA certificate from a different root CA (`other_ca_path`).
- "wrong_nonce": the reply to a *different* query (`openssl ts -query -data <other> -sha256
  -cert`), so neither the nonce nor the message imprint match the request.
- "chain" / "chain_reversed": signed by a TSA certificate under an intermediate CA, with the
  chain embedded (`certs =`: intermediate then root, or root then intermediate). OpenSSL
  writes the certificate SET in insertion order (signer first), not in DER SET OF order, as
  several public TSAs do.
- "no_ess": the token for the real query, re-signed by the good TSA certificate with
  `openssl cms -sign`, which adds no ESS signing-certificate attribute.
- "swapped_cert": a granted reply whose embedded signer certificate was replaced by its twin
  (same issuer, serial and key, other validity, the same length): the signature and chain
  still verify, only the ESS signing-certificate attribute tells the certificate is not the
  one the TSA signed with.
- "no_eku" / "noncritical_eku": the token for the real query, re-signed by a certificate
  (chaining to the trusted root) without the timeStamping extended key usage / with it but
  not critical. `openssl ts -reply` refuses to sign with such a certificate ("invalid signer
  certificate purpose"), so the TSTInfo of an "ok" reply is re-signed with `openssl cms -sign
  -econtent_type id-smime-ct-TSTInfo` and wrapped back into a TimeStampResp with
  `openssl ts -reply -token_in` (no ASN.1 written by hand here either).

The default signing configuration embeds only the signer certificate; "chain" and
"chain_reversed" embed a chain, which rfc3161-client 1.0.9 alone refuses outright (ASN.1
"InvalidSetOrdering") whenever the SET is not in DER order.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

OPENSSL = "openssl"
POLICY = "1.2.3.4.1"
TST_INFO_OID = "1.2.840.113549.1.9.16.1.4"  # id-smime-ct-TSTInfo
QUERY_TYPE = "application/timestamp-query"
REPLY_TYPE = "application/timestamp-reply"
GARBAGE = b"this is not a TimeStampResp"

MODES = frozenset(
    {
        "ok",
        "down",
        "busy",
        "bad_request",
        "garbage",
        "slow",
        "rejected",
        "untrusted",
        "wrong_nonce",
        "no_eku",
        "noncritical_eku",
        "chain",
        "chain_reversed",
        "no_ess",
        "swapped_cert",
    }
)

_EXTENSIONS = """\
[req]
distinguished_name = req_dn
prompt = no
[req_dn]
CN = unused

[root_ext]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash

[inter_ext]
basicConstraints = critical,CA:true,pathlen:0
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[tsa_ext]
basicConstraints = critical,CA:false
keyUsage = critical,digitalSignature,nonRepudiation
extendedKeyUsage = critical,timeStamping
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[no_eku_ext]
basicConstraints = critical,CA:false
keyUsage = critical,digitalSignature,nonRepudiation
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[noncritical_eku_ext]
basicConstraints = critical,CA:false
keyUsage = critical,digitalSignature,nonRepudiation
extendedKeyUsage = timeStamping
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""

_TS_SECTION = """\
[{name}]
dir = {dir}
serial = $dir/tsaserial
crypto_device = builtin
signer_cert = $dir/{cert}
signer_key = $dir/{key}
signer_digest = sha256
default_policy = {policy}
other_policies = 1.2.3.4.5
digests = {digests}
{certs}accuracy = secs:1, millisecs:500, microsecs:100
clock_precision_digits = 0
ordering = no
tsa_name = yes
ess_cert_id_chain = no
ess_cert_id_alg = sha256
"""


def openssl(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the openssl binary; raise with its stderr when it fails."""
    cmd = [OPENSSL, *map(str, args)]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=60, check=False)
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {stderr}")
    return result


def openssl_verify(
    tsr_path: Path, data_path: Path, ca_path: Path, untrusted_path: Path
) -> subprocess.CompletedProcess[str]:
    """`openssl ts -verify` of a stored TimeStampResp against the data it should cover."""
    cmd = [
        OPENSSL, "ts", "-verify",
        "-in", str(tsr_path),
        "-data", str(data_path),
        "-CAfile", str(ca_path),
        "-untrusted", str(untrusted_path),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


@dataclass(frozen=True)
class Pki:
    """The session's certificates and the openssl ts configuration that uses them."""

    dir: Path
    ca_path: Path  # trusted root (PEM)
    tsa_cert_path: Path  # TSA cert signed by the root, EKU critical timeStamping
    other_ca_path: Path  # a root nobody trusts
    untrusted_tsa_cert_path: Path  # TSA cert (good EKU) signed by `other_ca_path`
    no_eku_cert_path: Path  # signed by the trusted root, no extendedKeyUsage at all
    no_eku_key_path: Path
    noncritical_eku_cert_path: Path  # signed by the trusted root, EKU timeStamping not critical
    noncritical_eku_key_path: Path
    intermediate_path: Path  # a CA under the trusted root
    chained_tsa_cert_path: Path  # TSA cert signed by the intermediate
    twin_cert_path: Path  # tsa.crt's twin: same issuer, serial and key, other validity
    config: Path  # ts.cnf
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False)


def _make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ext = directory / "ext.cnf"
    ext.write_text(_EXTENSIONS)

    def key(name: str) -> Path:
        path = directory / f"{name}.key"
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
        return path

    def root(name: str, subject: str) -> Path:
        cert = directory / f"{name}.crt"
        openssl(
            "req", "-x509", "-new", "-key", key(name), "-subj", subject, "-days", "30",
            "-sha256", "-config", ext, "-extensions", "root_ext", "-out", cert,
        )  # fmt: skip
        return cert

    def sign(csr: Path, ca: str, extensions: str, cert: Path, serial: int, days: int) -> None:
        openssl(
            "x509", "-req", "-in", csr, "-CA", directory / f"{ca}.crt",
            "-CAkey", directory / f"{ca}.key", "-set_serial", str(serial),
            "-days", str(days), "-sha256", "-extfile", ext, "-extensions", extensions,
            "-out", cert,
        )  # fmt: skip

    def leaf(name: str, subject: str, ca: str, extensions: str) -> Path:
        csr = directory / f"{name}.csr"
        cert = directory / f"{name}.crt"
        openssl("req", "-new", "-key", key(name), "-subj", subject, "-config", ext, "-out", csr)
        sign(csr, ca, extensions, cert, secrets.randbits(63), 30)
        return cert

    def twin(cert: Path) -> Path:
        """A certificate for the key of `cert`, with its issuer and serial but another
        validity, of exactly the same DER length (ECDSA signatures vary by a byte or two)."""
        serial = int(openssl("x509", "-in", cert, "-noout", "-serial").stdout.split(b"=")[1], 16)
        path = cert.with_name(cert.stem + "-twin.crt")
        for _ in range(50):
            sign(cert.with_suffix(".csr"), "ca", "tsa_ext", path, serial, 31)
            if len(_der(path)) == len(_der(cert)):
                return path
        raise RuntimeError("could not make a twin certificate of the same length")

    ca = root("ca", "/O=archived tests/CN=Test Root CA")
    tsa_cert = leaf("tsa", "/O=archived tests/CN=Test TSA", "ca", "tsa_ext")
    other_ca = root("other-ca", "/O=somebody else/CN=Untrusted Root CA")
    untrusted = leaf("untrusted-tsa", "/O=somebody else/CN=Untrusted TSA", "other-ca", "tsa_ext")
    no_eku = leaf("no-eku", "/O=archived tests/CN=TSA without EKU", "ca", "no_eku_ext")
    noncritical = leaf(
        "noncritical-eku",
        "/O=archived tests/CN=TSA with non-critical EKU",
        "ca",
        "noncritical_eku_ext",
    )

    intermediate = leaf("inter", "/O=archived tests/CN=Test Intermediate CA", "ca", "inter_ext")
    chained = leaf(
        "chained-tsa", "/O=archived tests/CN=Test TSA under an intermediate", "inter", "tsa_ext"
    )
    (directory / "chain.pem").write_bytes(intermediate.read_bytes() + ca.read_bytes())
    (directory / "chain-reversed.pem").write_bytes(ca.read_bytes() + intermediate.read_bytes())
    tsa_twin = twin(tsa_cert)

    all_digests = "sha256, sha384, sha512"
    sections = [
        ("tsa_config1", "tsa.crt", "tsa.key", all_digests, ""),
        ("tsa_untrusted", "untrusted-tsa.crt", "untrusted-tsa.key", all_digests, ""),
        ("tsa_sha512_only", "tsa.crt", "tsa.key", "sha512", ""),
        ("tsa_chain", "chained-tsa.crt", "chained-tsa.key", all_digests, "chain.pem"),
        (
            "tsa_chain_reversed",
            "chained-tsa.crt",
            "chained-tsa.key",
            all_digests,
            "chain-reversed.pem",
        ),
    ]
    config = directory / "ts.cnf"
    config.write_text(
        "[tsa]\ndefault_tsa = tsa_config1\n\n"
        + "\n".join(
            _TS_SECTION.format(
                name=name,
                dir=directory,
                cert=cert,
                key=key,
                policy=POLICY,
                digests=digests,
                certs=f"certs = $dir/{chain}\n" if chain else "",
            )
            for name, cert, key, digests, chain in sections
        )
    )
    (directory / "tsaserial").write_text("01\n")
    return Pki(
        dir=directory,
        ca_path=ca,
        tsa_cert_path=tsa_cert,
        other_ca_path=other_ca,
        untrusted_tsa_cert_path=untrusted,
        no_eku_cert_path=no_eku,
        no_eku_key_path=directory / "no-eku.key",
        noncritical_eku_cert_path=noncritical,
        noncritical_eku_key_path=directory / "noncritical-eku.key",
        intermediate_path=intermediate,
        chained_tsa_cert_path=chained,
        twin_cert_path=tsa_twin,
        config=config,
    )


def _der(pem: Path) -> bytes:
    return openssl("x509", "-in", pem, "-outform", "DER").stdout


_PKI: dict[Path, Pki] = {}  # one per pytest session (keyed by its base temp dir)
_PKI_LOCK = threading.Lock()


def session_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The certificates for this pytest session, generated on first use."""
    base = tmp_path_factory.getbasetemp()
    with _PKI_LOCK:
        if base not in _PKI:
            _PKI[base] = _make_pki(tmp_path_factory.mktemp("tsa-pki"))
        return _PKI[base]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    tsa: Tsa

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (timeout tests) is not a failure of the fixture


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        tsa = self.server.tsa
        try:
            status, reply, content_type = tsa._answer(body, self.headers.get("Content-Type", ""))
        except Exception as exc:  # a bug of the fixture: make the test fail at teardown
            tsa.errors.append(f"{type(exc).__name__}: {exc}")
            status, reply, content_type = 500, b"fixture error\n", "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Tsa:
    """One TSA server. `url`, `ca_path`, `tsa_cert_path`, `mode`, `requests`, stop()/start()."""

    def __init__(self, pki: Pki, workdir: Path, *, slow_seconds: float = 10.0) -> None:
        self.pki = pki
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.slow_seconds = slow_seconds
        self.requests = 0  # every POST that reached the handler, whatever the mode
        self.queries: list[bytes] = []  # the DER TimeStampReq bodies, in order
        self.content_types: list[str] = []
        self.replies: list[bytes] = []  # the bodies of the HTTP 200 answers, in order
        self.errors: list[str] = []  # failures of the fixture itself (checked at teardown)
        self._mode = "ok"
        self._count_lock = threading.Lock()
        self._release = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- what tests use -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/tsa"

    @property
    def ca_path(self) -> Path:
        return self.pki.ca_path

    @property
    def tsa_cert_path(self) -> Path:
        return self.pki.tsa_cert_path

    @property
    def other_ca_path(self) -> Path:
        return self.pki.other_ca_path

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"unknown TSA mode {value!r}; one of {sorted(MODES)}")
        self._mode = value

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen (again) on 127.0.0.1, on the same port as before if there was one."""
        if self._server is not None:
            return
        self._release.clear()
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.tsa = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Really close the listening socket: connecting is then refused."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._release.set()  # let "slow" handlers finish
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=10)
        self._server = self._thread = None

    def query_text(self, index: int = -1) -> str:
        """`openssl ts -query -text` of a query received, to check what the client sent."""
        path = self.workdir / "query-text.tsq"
        path.write_bytes(self.queries[index])
        return openssl("ts", "-query", "-in", path, "-text").stdout.decode()

    # -- the server side ------------------------------------------------------------------

    def _answer(self, query: bytes, content_type: str) -> tuple[int, bytes, str]:
        with self._count_lock:
            self.requests += 1
            self.queries.append(query)
            self.content_types.append(content_type)
        mode = self._mode
        if content_type.split(";")[0].strip().lower() != QUERY_TYPE:
            return 415, b"expected application/timestamp-query\n", "text/plain"
        if mode == "down":
            return 503, b"TSA down for maintenance\n", "text/plain"
        if mode == "busy":
            return 429, b"slow down\n", "text/plain"
        if mode == "bad_request":
            return 400, b"bad request\n", "text/plain"
        if mode == "slow":
            self._release.wait(self.slow_seconds)
        reply = GARBAGE if mode == "garbage" else self._sign(query, mode)
        with self._count_lock:
            self.replies.append(reply)
        return 200, reply, REPLY_TYPE

    def _sign(self, query: bytes, mode: str) -> bytes:
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            work = Path(tmp)
            queryfile = work / "query.tsq"
            queryfile.write_bytes(query)
            section = {
                "untrusted": "tsa_untrusted",
                "rejected": "tsa_sha512_only",
                "chain": "tsa_chain",
                "chain_reversed": "tsa_chain_reversed",
            }.get(mode, "tsa_config1")
            if mode == "wrong_nonce":
                other = work / "other.txt"
                other.write_bytes(b"some other data, some other request\n")
                openssl("ts", "-query", "-data", other, "-sha256", "-cert", "-out", queryfile)
            reply = work / "reply.tsr"
            with self.pki.lock:  # openssl ts -reply updates the shared serial file
                openssl(
                    "ts", "-reply", "-config", self.pki.config, "-section", section,
                    "-queryfile", queryfile, "-out", reply,
                )  # fmt: skip
            if mode == "no_eku":
                return self._resign(reply, self.pki.no_eku_cert_path, self.pki.no_eku_key_path)
            if mode == "noncritical_eku":
                return self._resign(
                    reply, self.pki.noncritical_eku_cert_path, self.pki.noncritical_eku_key_path
                )
            if mode == "no_ess":
                return self._resign(reply, self.pki.tsa_cert_path, self.pki.dir / "tsa.key")
            if mode == "swapped_cert":
                original, twin = _der(self.pki.tsa_cert_path), _der(self.pki.twin_cert_path)
                data = reply.read_bytes()
                assert data.count(original) == 1
                return data.replace(original, twin)
            return reply.read_bytes()

    def _resign(self, reply: Path, cert: Path, key: Path) -> bytes:
        """The same TSTInfo, signed by `cert` (which openssl ts itself refuses to use)."""
        work = reply.parent
        token, tst_info, new_token, new_reply = (
            work / name for name in ("token.der", "tstinfo.der", "token2.der", "reply2.tsr")
        )
        openssl("ts", "-reply", "-in", reply, "-token_out", "-out", token)
        openssl(
            "cms", "-verify", "-noverify", "-binary", "-inform", "DER", "-in", token,
            "-out", tst_info,
        )  # fmt: skip
        openssl(
            "cms", "-sign", "-binary", "-nodetach", "-nosmimecap", "-md", "sha256",
            "-econtent_type", TST_INFO_OID, "-in", tst_info, "-signer", cert, "-inkey", key,
            "-outform", "DER", "-out", new_token,
        )  # fmt: skip
        openssl("ts", "-reply", "-token_in", "-in", new_token, "-out", new_reply)
        return new_reply.read_bytes()


@pytest.fixture(name="tsa")  # the explicit name survives an import under another name
def tsa(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Iterator[Tsa]:
    """A running TSA in mode "ok"; certificates shared by the whole session."""
    if shutil.which(OPENSSL) is None:
        pytest.skip("the openssl binary is not on PATH")
    server = Tsa(session_pki(tmp_path_factory), tmp_path / "tsa")
    server.start()
    try:
        yield server
    finally:
        server.stop()
    assert not server.errors, f"the TSA fixture failed: {server.errors}"
