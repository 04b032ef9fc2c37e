"""RFC 3161 time-stamping of the bag's tag manifest.

`rfc3161-client` does all the ASN.1 (request building, reply parsing) and the signature and
certificate checks; `httpx` carries the request. What rfc3161-client 1.0.9 checks, and what
is checked here on top of it:

- `Verifier.verify()` checks: PKI status granted; the CMS signature over the TSTInfo and the
  signer's chain to the given roots (OpenSSL `PKCS7_verify`, at the token's genTime, with the
  time-stamping purpose, which already refuses a signer without a critical timeStamping EKU);
  the nonce *only when one is given to the builder*; the message imprint bytes (hashed with
  whatever algorithm the token names); and, in Python, that the signer certificate found by
  the SignerInfo's issuer and serial carries a critical ExtendedKeyUsage with timeStamping.
- Here, explicitly and before the library: the reply parses at all; status granted (checked
  first: the token of a refused reply cannot be read); the imprint algorithm is sha256 and
  the imprint is sha256(message); the nonce equals the request's (no request, no nonce, in
  `check_token`); after it: exactly one signer, whose certificate is embedded in the token
  (we ask certReq=true) and carries a *critical* ExtendedKeyUsage that includes timeStamping,
  checked with `cryptography` so this does not depend on the library version.

- Here, with our own DER reading (der.py): the signed ESS signing-certificate attribute
  (ESSCertID or ESSCertIDv2, RFC 2634 / RFC 5035) names the signer certificate by its hash,
  so a certificate swapped into the token for another one with the same key, issuer and
  serial is refused.

Certificate order: rfc3161-client refuses a reply whose SignedData certificate SET is not in
DER order, which is what OpenSSL's `ts -reply` sends when `certs =` adds a chain, and what
several public TSAs send. That SET is not covered by the signature, so such a reply is
checked as a copy with the SET sorted (the same certificates, the same signature, the same
signed content); the reply is kept, and stored in the bag, exactly as received.

Not checked by anyone here: revocation of the TSA certificate, the TSA policy OID.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import anyio
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from rfc3161_client import (
    HashAlgorithm,
    PKIStatus,
    TimestampRequestBuilder,
    TimeStampResponse,
    VerificationError,
    VerifierBuilder,
    decode_timestamp_response,
)

from archived import der
from archived.errors import ArchivedError, TransientError

__all__ = [
    "TimestampRefused",
    "Token",
    "check_token",
    "load_ca_bundle",
    "request_token",
]

QUERY_TYPE = "application/timestamp-query"
REPLY_TYPE = "application/timestamp-reply"
SHA256 = x509.ObjectIdentifier("2.16.840.1.101.3.4.2.1")
SIGNING_CERTIFICATE = "1.2.840.113549.1.9.16.2.12"  # ESSCertID: sha1 of the certificate
SIGNING_CERTIFICATE_V2 = "1.2.840.113549.1.9.16.2.47"  # ESSCertIDv2: sha256 unless named
ESS_HASHES = {
    "1.3.14.3.2.26": "sha1",
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
}
MAX_REPLY_BYTES = 1 << 20  # real replies are a few KiB, even with a certificate chain


class TimestampRefused(ArchivedError):
    """The TSA answered, but its reply cannot be accepted (fatal: asking again won't help)."""


@dataclass(frozen=True)
class Token:
    response: bytes  # the DER TimeStampResp exactly as received (tagmanifest-sha256.txt.tsr)
    gen_time: datetime  # genTime of the token, timezone-aware UTC
    serial: int
    tsa_name: str | None  # the TSTInfo tsa field when it is a directory name (RFC 4514)


def load_ca_bundle(path: Path) -> list[x509.Certificate]:
    """The certificates of a PEM bundle: the roots a TSA's chain must end in."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ArchivedError(f"cannot read the TSA CA bundle {path}: {exc.strerror or exc}") from exc
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ArchivedError(f"the TSA CA bundle {path} holds no PEM certificate: {exc}") from exc
    if not certs:
        raise ArchivedError(f"the TSA CA bundle {path} holds no PEM certificate")
    unique: list[x509.Certificate] = []
    for cert in certs:
        if cert not in unique:
            unique.append(cert)
    return unique


async def request_token(url: str, message: bytes, *, ca: Path, timeout: float = 30.0) -> Token:
    """Time-stamp sha256(`message`) at the TSA `url`; accept the reply only if it checks out.

    The request carries a random nonce and certReq=true and is POSTed as
    application/timestamp-query. The reply is accepted only when: HTTP 200, PKI status
    granted, nonce and message imprint match the request, the signature and certificate chain
    verify against the CA bundle `ca`, and the signer certificate carries the critical
    timeStamping extended key usage.

    Unreachable TSA, connect/read timeout (or `timeout` seconds in all), HTTP 5xx or 429:
    `TransientError`. Any other HTTP status, a reply that does not parse, a status other than
    granted, or a failed check: `TimestampRefused`.
    """
    roots = load_ca_bundle(ca)  # a broken bundle is our problem: don't bother the TSA
    if not message:
        raise ArchivedError("cannot time-stamp an empty message")
    request = (
        TimestampRequestBuilder()
        .data(message)
        .hash_algorithm(HashAlgorithm.SHA256)
        .nonce(nonce=True)
        .cert_request(cert_request=True)
        .build()
    )
    nonce = request.nonce
    if nonce is None or not request.cert_req:  # pragma: no cover - the builder guarantees both
        raise ArchivedError("rfc3161-client built a request without nonce or certReq")

    body = await _post(url, request.as_bytes(), timeout)
    return _check(body, message, roots, nonce=nonce, source=f"the TSA at {url}")


def check_token(response: bytes, message: bytes, *, ca: list[x509.Certificate] | None) -> Token:
    """Check a stored TimeStampResp for `archived verify`.

    It must be granted and cover sha256(`message`); when `ca` is given, its signature and
    chain must verify against those roots and its signer must be a time-stamping certificate.
    There is no nonce to check: the request is long gone. Raises `TimestampRefused`.
    """
    return _check(response, message, ca, nonce=None, source="the time-stamp token")


# -- HTTP ---------------------------------------------------------------------------------


async def _post(url: str, query: bytes, timeout: float) -> bytes:
    headers = {"Content-Type": QUERY_TYPE, "Accept": REPLY_TYPE}
    try:
        with anyio.fail_after(timeout):
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(timeout)) as client,
                client.stream("POST", url, content=query, headers=headers) as reply,
            ):
                status = reply.status_code
                if status >= 500 or status == 429:
                    raise TransientError(f"the TSA at {url} answered HTTP {status}; will retry")
                if status != 200:
                    raise TimestampRefused(f"the TSA at {url} answered HTTP {status}")
                body = bytearray()
                async for chunk in reply.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_REPLY_BYTES:
                        raise TimestampRefused(
                            f"the TSA at {url} sent more than {MAX_REPLY_BYTES} bytes"
                        )
                return bytes(body)
    except TimeoutError as exc:
        raise TransientError(f"the TSA at {url} did not answer within {timeout:g}s") from exc
    except httpx.TimeoutException as exc:
        raise TransientError(f"the TSA at {url} timed out ({type(exc).__name__})") from exc
    except (httpx.UnsupportedProtocol, httpx.InvalidURL, httpx.LocalProtocolError) as exc:
        raise ArchivedError(f"cannot send a time-stamp request to {url!r}: {exc}") from exc
    except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError) as exc:
        raise TransientError(f"the TSA at {url} is unreachable: {_reason(exc)}") from exc
    except (httpx.DecodingError, httpx.TooManyRedirects) as exc:
        raise TimestampRefused(f"the TSA at {url} sent an unreadable reply: {exc}") from exc
    except httpx.HTTPError as exc:  # anything else on the wire: try again later
        raise TransientError(f"the TSA at {url} failed: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# -- checks -------------------------------------------------------------------------------


@contextmanager
def _refuse_on_error(source: str, what: str) -> Iterator[None]:
    """rfc3161-client raises ValueError on bad input; a Rust panic would be a BaseException."""
    try:
        yield
    except (ValueError, VerificationError) as exc:
        raise TimestampRefused(f"{source}: {what}: {_short(exc)}") from exc
    except BaseException as exc:
        if type(exc).__name__ == "PanicException":  # pyo3's, on input the parser chokes on
            raise TimestampRefused(f"{source}: {what}: {_short(exc)}") from exc
        raise


_VERIFY_ERROR = re.compile(r'data: "Verify error: ?([^"]+)"')
_REASON = re.compile(r'reason: "([^"]+)"')


def _short(exc: BaseException) -> str:
    """One readable line out of rfc3161-client's errors (which embed OpenSSL error stacks)."""
    text = " ".join(str(exc).split())
    if found := _VERIFY_ERROR.search(text):  # certificate verification: the X509 error
        return found.group(1)
    if reasons := _REASON.findall(text):  # anything else from OpenSSL: its outermost reason
        return str(reasons[-1])
    return text or type(exc).__name__


def _check(
    response: bytes,
    message: bytes,
    roots: list[x509.Certificate] | None,
    *,
    nonce: int | None,
    source: str,
) -> Token:
    with _refuse_on_error(source, "not a TimeStampResp"):
        tsr, ordered = _decode(bytes(response))
        status = tsr.status
    if status != PKIStatus.GRANTED:
        raise TimestampRefused(f"{source}: {_status_text(tsr, status)}")

    with _refuse_on_error(source, "unreadable time-stamp token"):
        info = tsr.tst_info
        imprint = info.message_imprint
        algorithm, imprinted = imprint.hash_algorithm, imprint.message
        token_nonce = info.nonce
        gen_time, serial = info.gen_time, info.serial_number

    if algorithm != SHA256:
        raise TimestampRefused(
            f"{source}: message imprint uses {algorithm.dotted_string}, not sha256"
        )
    digest = hashlib.sha256(message).digest()
    if nonce is not None and token_nonce != nonce:
        raise TimestampRefused(f"{source}: the nonce does not match the request")
    if imprinted != digest:
        raise TimestampRefused(f"{source}: the token does not cover this data (imprint mismatch)")

    if roots is not None:
        verifier = VerifierBuilder(roots=list(roots), nonce=nonce).build()
        with _refuse_on_error(source, "signature or certificate chain does not verify"):
            verifier.verify(tsr, digest)
        signer = _signer_certificate(tsr, source)
        check_signer_eku(signer, source)
        with _refuse_on_error(source, "unreadable signed attributes"):
            _check_ess(ordered, signer, source)

    return Token(
        response=bytes(response),
        gen_time=gen_time,
        serial=serial,
        tsa_name=_tsa_name(tsr),
    )


def _status_text(tsr: TimeStampResponse, status: int) -> str:
    try:
        name = PKIStatus(status).name.lower()
    except ValueError:
        name = str(status)
    try:
        texts = [t for t in tsr.status_string if t]
    except ValueError:
        texts = []
    detail = f" ({'; '.join(texts)})" if texts else ""
    return f"status {name}, not granted{detail}"


def _signer_certificate(tsr: TimeStampResponse, source: str) -> x509.Certificate:
    """The embedded certificate named by the only SignerInfo's issuer and serial number."""
    with _refuse_on_error(source, "unreadable SignedData"):
        signed = tsr.signed_data
        signers = list(signed.signer_infos)
        if len(signers) != 1:
            raise TimestampRefused(f"{source}: {len(signers)} signers, expected exactly one")
        issuer, number = signers[0].issuer, signers[0].serial_number
        certs = [x509.load_der_x509_certificate(der) for der in signed.certificates]
    for cert in certs:
        if cert.issuer == issuer and cert.serial_number == number:
            return cert
    raise TimestampRefused(f"{source}: the signer's certificate is not in the token")


def _decode(response: bytes) -> tuple[TimeStampResponse, bytes]:
    """The parsed reply, and the DER it was parsed from: `response` itself, or a copy of
    it with the certificate SET in DER order when rfc3161-client refuses the order."""
    try:
        return decode_timestamp_response(response), response
    except ValueError as exc:
        if "InvalidSetOrdering" not in str(exc):
            raise
    ordered = der.sorted_set(response, _certificate_set(response))
    return decode_timestamp_response(ordered), ordered


def _signed_data(response: bytes) -> list[der.Tlv]:
    """The fields of the token's SignedData (RFC 5652 5.1)."""
    reply = der.expect(der.read(response), der.SEQUENCE, "TimeStampResp")
    fields = der.children(response, reply)
    if len(fields) < 2:
        raise der.DerError("TimeStampResp without a token")
    content_info = der.children(response, der.expect(fields[1], der.SEQUENCE, "ContentInfo"))
    if len(content_info) != 2:
        raise der.DerError("ContentInfo: expected a type and a content")
    signed = der.first(response, der.expect(content_info[1], 0xA0, "ContentInfo content"))
    fields = der.children(response, der.expect(signed, der.SEQUENCE, "SignedData"))
    if not fields:
        raise der.DerError("empty SignedData")
    return fields


def _certificate_set(response: bytes) -> der.Tlv:
    for field in _signed_data(response):
        if field.tag == 0xA0:  # certificates [0] IMPLICIT CertificateSet
            return field
    raise der.DerError("SignedData without certificates")


def _ess_cert_id(response: bytes) -> tuple[str, bytes]:
    """The hash algorithm and certificate hash of the first ESSCertID(v2) in the only
    SignerInfo's signed attributes."""
    signer_infos = der.expect(_signed_data(response)[-1], der.SET, "SignerInfos")
    (signer_info,) = der.children(response, signer_infos)
    for field in der.children(response, der.expect(signer_info, der.SEQUENCE, "SignerInfo")):
        if field.tag != 0xA0:  # signedAttrs [0] IMPLICIT
            continue
        for attribute in der.children(response, field):
            kind, values = der.children(response, der.expect(attribute, der.SEQUENCE, "Attr"))
            name = der.oid(response, kind)
            if name not in (SIGNING_CERTIFICATE, SIGNING_CERTIFICATE_V2):
                continue
            certs = der.first(response, der.first(response, values))
            cert_id = der.first(response, der.expect(certs, der.SEQUENCE, "ESSCertIDs"))
            field = der.first(response, cert_id)
            algorithm = "sha1" if name == SIGNING_CERTIFICATE else "sha256"
            if field.tag == der.SEQUENCE:  # ESSCertIDv2 that names its hashAlgorithm
                named = der.oid(response, der.first(response, field))
                algorithm = ESS_HASHES.get(named, named)
                field = der.read(response, field.end, cert_id.end)
            return algorithm, der.expect(field, der.OCTET_STRING, "certHash").value(response)
    raise TimestampRefused("no ESS signing-certificate attribute")


def _check_ess(response: bytes, signer: x509.Certificate, source: str) -> None:
    """RFC 3161 2.4.2: the signed signing-certificate attribute names the signer."""
    try:
        algorithm, named = _ess_cert_id(response)
    except TimestampRefused as exc:
        raise TimestampRefused(f"{source}: {exc}") from None
    if algorithm not in ESS_HASHES.values():
        raise TimestampRefused(f"{source}: ESS certificate hash in unknown algorithm {algorithm}")
    actual = hashlib.new(algorithm, signer.public_bytes(serialization.Encoding.DER)).digest()
    if actual != named:
        raise TimestampRefused(
            f"{source}: the signing-certificate attribute names another certificate than "
            f"the signer's {signer.subject.rfc4514_string()}"
        )


def check_signer_eku(cert: x509.Certificate, source: str = "the TSA certificate") -> None:
    """RFC 3161 2.3: the signer has a critical extendedKeyUsage with id-kp-timeStamping."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        raise TimestampRefused(
            f"{source}: signer {cert.subject.rfc4514_string()} has no extendedKeyUsage"
        ) from None
    if ExtendedKeyUsageOID.TIME_STAMPING not in eku.value:
        raise TimestampRefused(
            f"{source}: signer {cert.subject.rfc4514_string()} is not for time-stamping"
        )
    if not eku.critical:
        raise TimestampRefused(
            f"{source}: signer {cert.subject.rfc4514_string()}: extendedKeyUsage is not critical"
        )


def _tsa_name(tsr: TimeStampResponse) -> str | None:
    try:
        name = tsr.tst_info.name  # ValueError when absent or not a directory/other name
    except ValueError:
        return None
    if isinstance(name, x509.DirectoryName):
        return name.value.rfc4514_string()
    return None
