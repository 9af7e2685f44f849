"""TLSA records against certificate chains (harakapy.tls.dane), with certificates a test
CA issues: every usage, selector and matching type, digest agility, rollover, DANE-TA
names and dates, and the records that are unusable."""

from __future__ import annotations

import datetime
import hashlib

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from harakapy.tls.dane import Match, usable, usable_records, verify_chain
from harakapy.tls.policy import TlsaRecord
from harakapy.tls.results import Failure

PAST = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)


def der(pem: trustme.Blob) -> bytes:
    return x509.load_pem_x509_certificate(pem.bytes()).public_bytes(Encoding.DER)


def record(usage: int, selector: int, mtype: int, certificate: bytes) -> TlsaRecord:
    loaded = x509.load_der_x509_certificate(certificate)
    data = certificate if selector == 0 else loaded.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return TlsaRecord(usage, selector, mtype, data)


@pytest.fixture(scope="module")
def pki():
    ca = trustme.CA()
    other = trustme.CA()
    leaf = ca.issue_cert("mx.example.test")
    stranger = other.issue_cert("mx.example.test")
    expired = ca.issue_cert("mx.example.test", not_before=PAST,
                            not_after=PAST + datetime.timedelta(days=30))
    return {
        "ca": der(ca.cert_pem), "other_ca": der(other.cert_pem),
        "leaf": der(leaf.cert_chain_pems[0]), "stranger": der(stranger.cert_chain_pems[0]),
        "expired": der(expired.cert_chain_pems[0]),
    }


def check(records, chain, references=("mx.example.test",)):
    return verify_chain(usable_records(records), chain, list(references))


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ee_matches_the_leaf_in_every_form(pki, selector, mtype):
    found = check([record(3, selector, mtype, pki["leaf"])], [pki["leaf"]])
    assert isinstance(found, Match) and found.depth == 0
    wrong = check([record(3, selector, mtype, pki["stranger"])], [pki["leaf"]])
    assert isinstance(wrong, Failure) and wrong.result_type == "certificate-not-trusted"


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ta_matches_the_issuer_in_the_chain_in_every_form(pki, selector, mtype):
    found = check([record(2, selector, mtype, pki["ca"])], [pki["leaf"], pki["ca"]])
    assert isinstance(found, Match) and found.depth == 1
    wrong = check([record(2, selector, mtype, pki["other_ca"])], [pki["leaf"], pki["ca"]])
    assert isinstance(wrong, Failure)


def test_dane_ee_ignores_names_and_dates(pki):
    found = check([record(3, 1, 1, pki["expired"])], [pki["expired"]],
                  references=("mx.elsewhere.test",))
    assert isinstance(found, Match)


def test_dane_ee_never_matches_a_certificate_above_the_leaf(pki):
    found = check([record(3, 0, 1, pki["ca"])], [pki["leaf"], pki["ca"]])
    assert isinstance(found, Failure)


def test_dane_ta_checks_the_names(pki):
    found = check([record(2, 0, 1, pki["ca"])], [pki["leaf"], pki["ca"]],
                  references=("mx.elsewhere.test", "elsewhere.test"))
    assert isinstance(found, Failure) and found.result_type == "certificate-host-mismatch"
    # Any reference identifier will do: the base domain, the MX host, the next hop.
    assert isinstance(check([record(2, 0, 1, pki["ca"])], [pki["leaf"], pki["ca"]],
                            references=("base.test", "mx.example.test")), Match)


def test_dane_ta_checks_the_dates(pki):
    found = check([record(2, 1, 1, pki["ca"])], [pki["expired"], pki["ca"]])
    assert isinstance(found, Failure) and found.result_type == "certificate-expired"


def test_dane_ta_needs_the_chain_to_lead_to_the_anchor(pki):
    # The stranger's issuer is not in the chain and not the anchor: no path.
    found = check([record(2, 0, 1, pki["ca"])], [pki["stranger"], pki["ca"]])
    assert isinstance(found, Failure) and found.result_type == "validation-failure"


def test_a_full_ta_record_supplies_an_anchor_the_server_left_out(pki):
    found = check([record(2, 0, 0, pki["ca"])], [pki["leaf"]])
    assert isinstance(found, Match)
    assert isinstance(check([record(2, 0, 1, pki["ca"])], [pki["leaf"]]), Failure)


def test_a_rollover_pair_matches_whichever_key_is_current(pki):
    records = [record(3, 1, 1, pki["stranger"]), record(3, 1, 1, pki["leaf"])]
    assert isinstance(check(records, [pki["leaf"]]), Match)
    assert isinstance(check(records, [pki["stranger"]]), Match)


def test_digest_agility_uses_the_strongest_digest_only(pki):
    # RFC 7671 9: with SHA2-512 published, a (wrong) SHA2-256 beside it is ignored ...
    weak_wrong = [record(3, 1, 1, pki["stranger"]), record(3, 1, 2, pki["leaf"])]
    assert isinstance(check(weak_wrong, [pki["leaf"]]), Match)
    # ... and so is a right one: only the SHA2-512 record counts.
    weak_right = [record(3, 1, 1, pki["leaf"]), record(3, 1, 2, pki["stranger"])]
    assert isinstance(check(weak_right, [pki["leaf"]]), Failure)
    # Another selector keeps its own digests.
    mixed = [record(3, 0, 1, pki["leaf"]), record(3, 1, 2, pki["stranger"])]
    assert isinstance(check(mixed, [pki["leaf"]]), Match)


@pytest.mark.parametrize(("usage", "selector", "mtype", "data", "why"), [
    (0, 1, 1, b"\x00" * 32, "PKIX-TA is not for SMTP"),
    (1, 1, 1, b"\x00" * 32, "PKIX-EE is not for SMTP"),
    (4, 1, 1, b"\x00" * 32, "unknown usage"),
    (3, 2, 1, b"\x00" * 32, "unknown selector"),
    (3, 1, 3, b"\x00" * 32, "unknown matching type"),
    (3, 1, 1, b"\x00" * 31, "a SHA2-256 digest is 32 bytes"),
    (3, 1, 2, b"\x00" * 32, "a SHA2-512 digest is 64 bytes"),
    (3, 0, 0, b"not a certificate", "Full data that does not parse"),
    (3, 1, 0, b"not a key", "Full data that does not parse"),
])
def test_unusable_records_are_ignored(usage, selector, mtype, data, why):
    assert not usable(TlsaRecord(usage, selector, mtype, data)), why


def test_only_unusable_records_leave_nothing_to_match(pki):
    assert usable_records([TlsaRecord(1, 1, 1, b"\x00" * 32)]) == ()


def test_no_certificate_is_a_validation_failure(pki):
    found = check([record(3, 1, 1, pki["leaf"])], [])
    assert isinstance(found, Failure) and found.code == "no-peer-certificate"
