"""REQUIRETLS through DNSSEC: an MX RRset the validating resolver calls secure vouches for
the MX hosts (RFC 8689 4.2.1), DANE or a trusted chain authenticates them, and
``TLS-Required: No`` waives DANE's verdict. The signed world is tests/dane_world.py."""

from __future__ import annotations

import logging

from tests.dane_world import MX2_IP, MX_IP, self_signed, zone
from tests.dnssec_world import tlsa_name, tlsa_text
from tests.harness import eventually
from tests.test_requiretls import FLAG, OFFERS, dsn_status

PLUGINS = "flag\nrelay\ndane\nmta_sts\nrecorder\n"


def signed(name: str, ip: str = MX_IP, extra: str = ""):
    """``name`` (MX, address, ``extra``) in the signed zone, and the sender's domain
    ``b.test`` whose MX takes the notices."""
    return lambda port: zone(name, ip, extra if isinstance(extra, str) else extra(port)) + \
        zone("b.test", MX2_IP)


async def _home(world):
    """The sender's MX, for the notices."""
    return await world.env.mta(MX2_IP, cert=world.env.certs.files("home", "mx.b.test"),
                               **OFFERS)


async def start(dane_world, zone_of, **options):
    return await dane_world(zone_of, plugins=PLUGINS, plugin_files={"flag": FLAG}, **options)


async def test_a_dnssec_secure_mx_with_a_trusted_certificate_gets_requiretls(dane_world):
    world = await start(dane_world, signed("a.test"))
    cert = world.env.certs.files("mx-a", "mx.a.test")
    mx = await world.env.mta(MX_IP, cert=cert, **OFFERS)
    await world.env.send("bob@a.test", sender="rt@b.test")
    await eventually(lambda: mx.messages)
    assert mx.messages[0].tls and "REQUIRETLS" in mx.messages[0].mail_options
    (result,) = world.env.captured("tls_result")
    assert result.success and result.level == "verify"


async def test_a_dane_validated_mx_gets_requiretls(dane_world, tmp_path):
    cert = self_signed(tmp_path, "mx.a.test")
    world = await start(dane_world, signed("a.test", extra=lambda port: (
        f"{tlsa_name('mx.a.test', port)} TLSA {tlsa_text(3, 1, 1, cert.der)}\n")))
    mx = await world.mx(MX_IP, cert, **OFFERS)
    await world.env.send("bob@a.test", sender="rt@b.test")
    await eventually(lambda: mx.messages)
    assert "REQUIRETLS" in mx.messages[0].mail_options
    (result,) = world.env.captured("tls_result")
    assert result.success and result.policy_type == "tlsa"


async def test_a_self_signed_certificate_without_tlsa_is_not_enough(dane_world, tmp_path):
    cert = self_signed(tmp_path, "mx.a.test")
    world = await start(dane_world, signed("a.test"))
    mx = await world.mx(MX_IP, cert, **OFFERS)
    home = await _home(world)
    await world.env.send("bob@a.test", sender="rt@b.test")
    await eventually(lambda: home.messages)
    assert mx.messages == [] and not any(c.startswith("MAIL") for c in mx.commands)
    assert dsn_status(home.messages[0].data) == ["5.7.10"]
    # Unflagged mail to the same MX goes at may, as the destination asks.
    await world.env.send("carol@a.test")
    await eventually(lambda: mx.messages)


async def test_tlsa_records_none_of_them_usable_do_not_satisfy_requiretls(dane_world,
                                                                           tmp_path):
    cert = self_signed(tmp_path, "mx.a.test")
    world = await start(dane_world, signed("a.test", extra=lambda port: (
        f"{tlsa_name('mx.a.test', port)} TLSA 1 1 1 {'ab' * 32}\n")))
    mx = await world.mx(MX_IP, cert, **OFFERS)
    home = await _home(world)
    await world.env.send("bob@a.test", sender="rt@b.test")
    await eventually(lambda: home.messages)
    assert mx.connections == 0 and dsn_status(home.messages[0].data) == ["5.7.10"]


async def test_an_insecure_mx_rrset_without_mta_sts_bounces_at_once(dane_world):
    world = await start(dane_world, lambda port: zone("b.test", MX2_IP),
                        insecure={"plain.test": zone("a.plain.test")})
    mx = await world.env.mta(MX_IP, cert=world.env.certs.files("mx", "mx.a.plain.test"),
                             **OFFERS)
    home = await _home(world)
    await world.env.send("bob@a.plain.test", sender="rt@b.test")
    await eventually(lambda: home.messages)
    assert mx.connections == 0
    assert dsn_status(home.messages[0].data) == ["5.7.30"]
    assert "REQUIRETLS" in home.messages[0].mail_options  # b.test is signed: it can


async def test_tls_required_no_goes_through_a_dane_mismatch_and_says_so(dane_world, tmp_path,
                                                                        caplog):
    published = self_signed(tmp_path, "mx.a.test")
    presented = self_signed(tmp_path / "..", "mx.a.test")
    world = await start(dane_world, signed("a.test", extra=lambda port: (
        f"{tlsa_name('mx.a.test', port)} TLSA {tlsa_text(3, 1, 1, published.der)}\n")))
    mx = await world.mx(MX_IP, presented)
    with caplog.at_level(logging.INFO, logger="harakapy.outbound"):
        await world.env.send("bob@a.test", b"Subject: r\r\nTLS-Required: No\r\n\r\nreport\r\n")
        await eventually(lambda: mx.messages)
    (failure,) = world.env.failures()
    assert failure.policy_type == "tlsa" and not failure.enforced
    assert any("TLS-Required: No" in r.getMessage() for r in caplog.records)
