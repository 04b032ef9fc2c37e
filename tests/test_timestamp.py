"""RFC 3161 time-stamping against a real TSA (`openssl ts -reply`) on loopback; no mocks."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rfc3161_client import decode_timestamp_response
from tsa import QUERY_TYPE, Tsa, openssl, openssl_verify
from tsa import tsa as tsa_fixture  # noqa: F401  (registers the fixture named "tsa")

from archived.errors import ArchivedError, Kind, TransientError, classify
from archived.timestamp import (
    TimestampRefused,
    Token,
    check_signer_eku,
    check_token,
    load_ca_bundle,
    request_token,
)

MESSAGE = b"sha256  manifest-sha256.txt 0123456789abcdef\nsha256  bagit.txt fedcba9876543210\n"


def post_own_query(tsa: Tsa, data: Path) -> bytes:
    """Ask the fixture directly with a query built by openssl, to get replies we refuse."""
    query = data.with_suffix(".tsq")
    openssl("ts", "-query", "-data", data, "-sha256", "-cert", "-out", query)
    reply = httpx.post(
        tsa.url, content=query.read_bytes(), headers={"Content-Type": QUERY_TYPE}, timeout=30
    )
    assert reply.status_code == 200
    return reply.content


# -- granted ------------------------------------------------------------------------------


async def test_granted_token_verifies_with_openssl_and_check_token(
    tsa: Tsa, tmp_path: Path
) -> None:
    token = await request_token(tsa.url, MESSAGE, ca=tsa.ca_path)

    assert token.response == tsa.replies[-1]  # stored exactly as received
    assert token.tsa_name == "CN=Test TSA,O=archived tests"
    tsr, data = tmp_path / "tagmanifest-sha256.txt.tsr", tmp_path / "tagmanifest-sha256.txt"
    tsr.write_bytes(token.response)
    data.write_bytes(MESSAGE)
    result = openssl_verify(tsr, data, tsa.ca_path, tsa.tsa_cert_path)
    assert result.returncode == 0, result.stderr
    assert "Verification: OK" in result.stdout

    again = check_token(token.response, MESSAGE, ca=load_ca_bundle(tsa.ca_path))
    assert again == token


async def test_request_has_sha256_imprint_random_nonce_and_cert_req(tsa: Tsa) -> None:
    first = await request_token(tsa.url, MESSAGE, ca=tsa.ca_path)
    second = await request_token(tsa.url, MESSAGE, ca=tsa.ca_path)

    assert tsa.requests == 2
    assert tsa.content_types == [QUERY_TYPE, QUERY_TYPE]
    texts = [tsa.query_text(0), tsa.query_text(1)]
    for text in texts:
        assert "Hash Algorithm: sha256" in text
        assert "Certificate required: yes" in text
    nonces = [line for text in texts for line in text.splitlines() if line.startswith("Nonce:")]
    assert len(nonces) == 2 and nonces[0] != nonces[1], nonces
    assert first.serial != second.serial


async def test_gen_time_is_close_to_now(tsa: Tsa) -> None:
    before = datetime.now(UTC)
    token = await request_token(tsa.url, MESSAGE, ca=tsa.ca_path)
    after = datetime.now(UTC)

    assert token.gen_time.utcoffset() == timedelta(0)
    # openssl writes whole seconds (clock_precision_digits = 0): allow for the truncation
    assert before - timedelta(seconds=2) <= token.gen_time <= after + timedelta(seconds=2)


async def test_a_reply_with_the_chain_embedded_in_any_order_is_accepted(
    tsa: Tsa, tmp_path: Path
) -> None:
    """OpenSSL (`certs =`) and several public TSAs send the certificate SET in the order
    they hold it, not in DER order; the set is not covered by the signature."""
    ca = load_ca_bundle(tsa.ca_path)
    unsorted = 0
    for mode in ("chain", "chain_reversed"):
        tsa.mode = mode
        token = await request_token(tsa.url, MESSAGE, ca=tsa.ca_path)

        assert token.response == tsa.replies[-1]  # stored exactly as received
        assert token.tsa_name == "CN=Test TSA under an intermediate,O=archived tests"
        assert check_token(token.response, MESSAGE, ca=ca) == token
        tsr, data = tmp_path / f"{mode}.tsr", tmp_path / "tagmanifest-sha256.txt"
        tsr.write_bytes(token.response)
        data.write_bytes(MESSAGE)
        result = openssl_verify(tsr, data, tsa.ca_path, tsa.pki.intermediate_path)
        assert "Verification: OK" in result.stdout, result.stderr
        try:
            decode_timestamp_response(token.response)
        except ValueError as exc:  # what rfc3161-client alone does with it
            assert "InvalidSetOrdering" in str(exc)
            unsorted += 1
    assert unsorted >= 1  # the case this test is about did happen


async def test_a_token_without_the_ess_signing_certificate_is_refused(tsa: Tsa) -> None:
    tsa.mode = "no_ess"
    with pytest.raises(TimestampRefused, match="no ESS signing-certificate attribute"):
        await request_token(tsa.url, MESSAGE, ca=tsa.ca_path)
    with pytest.raises(TimestampRefused, match="no ESS signing-certificate attribute"):
        check_token(tsa.replies[-1], MESSAGE, ca=load_ca_bundle(tsa.ca_path))


async def test_a_token_whose_signer_certificate_was_swapped_is_refused(tsa: Tsa) -> None:
    """Same key, issuer and serial, so the signature and the chain verify: only the ESS
    signing-certificate attribute (signed) tells which certificate the TSA meant."""
    tsa.mode = "swapped_cert"
    with pytest.raises(TimestampRefused, match="signing-certificate attribute names another"):
        await request_token(tsa.url, MESSAGE, ca=tsa.ca_path)


# -- check_token (archived verify) --------------------------------------------------------


async def test_check_token_refuses_a_token_for_other_data(tsa: Tsa) -> None:
    token = await request_token(tsa.url, MESSAGE, ca=tsa.ca_path)
    ca = load_ca_bundle(tsa.ca_path)

    with pytest.raises(TimestampRefused, match="does not cover this data"):
        check_token(token.response, MESSAGE + b"tampered\n", ca=ca)
    with pytest.raises(TimestampRefused, match="does not cover this data"):
        check_token(token.response, MESSAGE + b"tampered\n", ca=None)


async def test_check_token_refuses_a_token_checked_against_another_ca(tsa: Tsa) -> None:
    token = await request_token(tsa.url, MESSAGE, ca=tsa.ca_path)

    with pytest.raises(TimestampRefused, match="unable to get local issuer certificate"):
        check_token(token.response, MESSAGE, ca=load_ca_bundle(tsa.other_ca_path))
    # without a CA only the imprint is checked
    assert check_token(token.response, MESSAGE, ca=None).serial == token.serial


async def test_check_token_refuses_a_tampered_or_truncated_reply(tsa: Tsa) -> None:
    token = await request_token(tsa.url, MESSAGE, ca=tsa.ca_path)
    ca = load_ca_bundle(tsa.ca_path)
    flipped = bytearray(token.response)
    flipped[-1] ^= 0x01  # the last byte belongs to the signature value

    with pytest.raises(TimestampRefused, match="does not verify"):
        check_token(bytes(flipped), MESSAGE, ca=ca)
    with pytest.raises(TimestampRefused, match="not a TimeStampResp"):
        check_token(token.response[:-10], MESSAGE, ca=ca)
    with pytest.raises(TimestampRefused, match="not a TimeStampResp"):
        check_token(b"", MESSAGE, ca=None)


def test_check_token_accepts_the_untrusted_tsa_only_with_its_own_ca(
    tsa: Tsa, tmp_path: Path
) -> None:
    data = tmp_path / "data.txt"
    data.write_bytes(MESSAGE)
    tsa.mode = "untrusted"
    reply = post_own_query(tsa, data)

    with pytest.raises(TimestampRefused, match="unable to get local issuer certificate"):
        check_token(reply, MESSAGE, ca=load_ca_bundle(tsa.ca_path))
    token = check_token(reply, MESSAGE, ca=load_ca_bundle(tsa.other_ca_path))
    assert token.tsa_name == "CN=Untrusted TSA,O=somebody else"


# -- recoverable failures -----------------------------------------------------------------


async def test_tsa_answering_503_is_transient(tsa: Tsa) -> None:
    tsa.mode = "down"
    with pytest.raises(TransientError, match="HTTP 503") as caught:
        await request_token(tsa.url, MESSAGE, ca=tsa.ca_path)
    assert classify(caught.value) is Kind.RECOVERABLE
    assert tsa.requests == 1


async def test_tsa_answering_429_is_transient(tsa: Tsa) -> None:
    tsa.mode = "busy"
    with pytest.raises(TransientError, match="HTTP 429"):
        await request_token(tsa.url, MESSAGE, ca=tsa.ca_path)


async def test_nothing_listening_is_transient_and_the_same_url_works_again(tsa: Tsa) -> None:
    url = tsa.url
    tsa.stop()
    with pytest.raises(TransientError, match="unreachable") as caught:
        await request_token(url, MESSAGE, ca=tsa.ca_path)
    assert classify(caught.value) is Kind.RECOVERABLE
    assert tsa.requests == 0

    tsa.start()
    assert tsa.url == url
    token = await request_token(url, MESSAGE, ca=tsa.ca_path)
    assert token.response == tsa.replies[-1]


async def test_a_tsa_that_does_not_answer_in_time_is_transient(tsa: Tsa) -> None:
    tsa.mode = "slow"
    started = time.monotonic()
    with pytest.raises(TransientError, match=r"did not answer|timed out"):
        await request_token(tsa.url, MESSAGE, ca=tsa.ca_path, timeout=0.5)
    assert time.monotonic() - started < 5
    assert tsa.requests == 1


# -- refused replies (fatal) --------------------------------------------------------------


async def test_reply_signed_by_an_untrusted_ca_is_refused(tsa: Tsa) -> None:
    tsa.mode = "untrusted"
    with pytest.raises(TimestampRefused, match="unable to get local issuer certificate") as caught:
        await request_token(tsa.url, MESSAGE, ca=tsa.ca_path)
    assert classify(caught.value) is Kind.FATAL


async def test_reply_to_another_request_is_refused(tsa: Tsa) -> None:
    tsa.mode = "wrong_nonce"
    with pytest.raises(TimestampRefused, match="nonce does not match"):
        await request_token(tsa.url, MESSAGE, ca=tsa.ca_path)
    assert tsa.requests == 1


@pytest.mark.parametrize("mode", ["no_eku", "noncritical_eku"])
async def test_reply_signed_without_critical_timestamping_eku_is_refused(
    tsa: Tsa, mode: str
) -> None:
    tsa.mode = mode
    with pytest.raises(TimestampRefused, match="unsuitable certificate purpose"):
        await request_token(tsa.url, MESSAGE, ca=tsa.ca_path)
    # the same token, stored: the imprint is right, the signer is not a TSA
    reply = tsa.replies[-1]
    assert check_token(reply, MESSAGE, ca=None).serial > 0
    with pytest.raises(TimestampRefused, match="unsuitable certificate purpose"):
        check_token(reply, MESSAGE, ca=load_ca_bundle(tsa.ca_path))


def test_explicit_signer_eku_check(tsa: Tsa) -> None:
    """Our own check, independent of what rfc3161-client and OpenSSL refuse first."""

    def cert(path: Path) -> x509.Certificate:
        return x509.load_pem_x509_certificate(path.read_bytes())

    check_signer_eku(cert(tsa.tsa_cert_path))  # critical timeStamping: accepted
    with pytest.raises(TimestampRefused, match="has no extendedKeyUsage"):
        check_signer_eku(cert(tsa.pki.no_eku_cert_path))
    with pytest.raises(TimestampRefused, match="extendedKeyUsage is not critical"):
        check_signer_eku(cert(tsa.pki.noncritical_eku_cert_path))
    with pytest.raises(TimestampRefused, match="is not for time-stamping"):
        check_signer_eku(server_auth_certificate())


def server_auth_certificate() -> x509.Certificate:
    """A self-signed certificate whose critical extendedKeyUsage is serverAuth only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web server")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=True)
        .sign(key, hashes.SHA256())
    )


async def test_rejection_status_is_refused(tsa: Tsa) -> None:
    tsa.mode = "rejected"
    with pytest.raises(TimestampRefused, match="status rejection, not granted"):
        await request_token(tsa.url, MESSAGE, ca=tsa.ca_path)


@pytest.mark.parametrize(
    ("mode", "message"), [("bad_request", "HTTP 400"), ("garbage", "not a TimeStampResp")]
)
async def test_other_http_status_or_unparsable_reply_is_refused(
    tsa: Tsa, mode: str, message: str
) -> None:
    tsa.mode = mode
    with pytest.raises(TimestampRefused, match=message) as caught:
        await request_token(tsa.url, MESSAGE, ca=tsa.ca_path)
    assert classify(caught.value) is Kind.FATAL


# -- configuration ------------------------------------------------------------------------


def test_load_ca_bundle(tsa: Tsa, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        tsa.ca_path.read_bytes() + tsa.other_ca_path.read_bytes() + tsa.ca_path.read_bytes()
    )
    certs = load_ca_bundle(bundle)
    assert [c.subject.rfc4514_string() for c in certs] == [
        "CN=Test Root CA,O=archived tests",
        "CN=Untrusted Root CA,O=somebody else",
    ]

    with pytest.raises(ArchivedError, match="cannot read the TSA CA bundle"):
        load_ca_bundle(tmp_path / "missing.pem")
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificates in here\n")
    with pytest.raises(ArchivedError, match="holds no PEM certificate"):
        load_ca_bundle(empty)


async def test_a_bundle_with_several_roots_accepts_the_tsa(tsa: Tsa, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(tsa.other_ca_path.read_bytes() + tsa.ca_path.read_bytes())
    token = await request_token(tsa.url, MESSAGE, ca=bundle)
    assert isinstance(token, Token) and token.serial > 0


async def test_unusable_url_is_fatal_and_not_sent(tsa: Tsa) -> None:
    with pytest.raises(ArchivedError) as caught:
        await request_token("ftp://127.0.0.1/tsa", MESSAGE, ca=tsa.ca_path)
    assert not isinstance(caught.value, TransientError)
    assert classify(caught.value) is Kind.FATAL
    assert tsa.requests == 0
