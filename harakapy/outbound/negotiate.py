"""TLS with one MX as its destination's policy demands: the engine of invariant 2.

For each MX, :meth:`Negotiator.plan` decides before connecting what the MX must offer
(MTA-STS ``mx`` patterns, DANE TLSA records), and :meth:`Negotiator.secure` runs STARTTLS
on an open, greeted session and checks the certificate before any further command. A
session that does not meet a policy that requires TLS is closed (QUIT when the handshake
completed) and :class:`TlsFailure` raised: the caller tries the next MX and finally defers.
Only ``may`` and report-only policies go on without TLS. Every negotiation is reported.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import ssl
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from harakapy.outbound.client import SessionError, SmtpSession, Stage
from harakapy.outbound.mx import MxHost
from harakapy.tls import outcomes, verify
from harakapy.tls.policy import Level, Policy, PolicySource, TlsaLookup
from harakapy.tls.results import Failure, ResultType, TlsResult
from harakapy.tls.settings import TlsSettings

log = logging.getLogger("harakapy.outbound.tls")

Report = Callable[[TlsResult], Awaitable[None]]
Reopen = Callable[[], Awaitable[SmtpSession]]


class TlsFailure(SessionError):
    """An MX did not meet a policy that requires TLS.

    :ivar failure: The RFC 8460 failure.
    :ivar status: RFC 3463 status for the deferral: 4.7.4 when TLS was not offered
        (Postfix's choice), 4.7.5 for every other TLS failure. For a REQUIRETLS message
        (``requiretls``) the failure is final for this MX, as Postfix and mox have it:
        5.7.30 when the server does not offer REQUIRETLS (``not_offered``), 5.7.10 when
        no validated TLS could be had; a DNSSEC lookup that failed stays 4.7.5.
    :ivar final: Waiting cannot help with this MX: the next one, or a notice.
    """

    def __init__(self, failure: Failure, *, requiretls: bool = False,
                 not_offered: bool = False) -> None:
        super().__init__("tls-policy", failure.reason)
        self.failure = failure
        self.final = not_offered or (requiretls and
                                     failure.result_type is not ResultType.DNSSEC_INVALID)
        if not_offered:
            self.status = "5.7.30"
        elif self.final:
            self.status = "5.7.10"
        else:
            self.status = ("4.7.4" if failure.result_type is
                           ResultType.STARTTLS_NOT_SUPPORTED else "4.7.5")


@dataclass(frozen=True, slots=True)
class HostPlan:
    """What one MX must offer under one policy, decided before connecting.

    :ivar level: The level to enforce at this MX (``dane`` resolves to its fallback
        policy's level, or ``may``, when the MX has no TLSA records; ``dane-only``
        never does).
    :ivar tlsa: The MX's TLSA records at a DANE level.
    :ivar source: The policy's source, or the MX's TLSA records when DANE applies.
    :ivar quiet: This session's outcome was already reported (a report-only policy's
        failure, all TLSA records unusable): report only a failure that stops the mail.
        Quiet never weakens what is enforced.
    """

    policy: Policy
    host: MxHost
    nexthop: str
    level: Level
    tlsa: TlsaLookup | None
    source: PolicySource
    quiet: bool = False

    @property
    def session_key(self) -> tuple:
        records = self.tlsa.records if self.tlsa else ()
        return (*self.policy.session_key(self.nexthop), self.level.value, records)

    @property
    def requires_tls(self) -> bool:
        return self.level.requires_tls or bool(self.tlsa and self.tlsa.records)

    @property
    def servername(self) -> str | None:
        name = (self.policy.servername or (self.tlsa.base_domain if self.tlsa else "")
                or self.host.hostname)
        try:
            ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            return name
        return None  # RFC 6066 3: no SNI for an address


class Negotiator:
    """Builds TLS client contexts (once per setting) and enforces policies with them.

    :param settings: ``config/tls.ini`` ``[outbound]``.
    :param report: Called with every negotiation's :class:`TlsResult` (the ``tls_result``
        hook); it must not raise.
    """

    def __init__(self, settings: TlsSettings, report: Report | None = None) -> None:
        self.settings = settings
        self.report = report
        self._contexts: dict[tuple, ssl.SSLContext] = {}
        self._store: verify.TrustStore | None = None

    # -- contexts ---------------------------------------------------------------------

    def context(self, plan: HostPlan) -> ssl.SSLContext:
        policy, level = plan.policy, plan.level
        opportunistic = not plan.requires_tls
        low = policy.min_protocol or (None if opportunistic else self.settings.min_version)
        ciphers = policy.ciphers or ("" if opportunistic else self.settings.ciphers)
        key = (level.verifies_chain, opportunistic, low, policy.max_protocol, ciphers)
        context = self._contexts.get(key)
        if context is None:
            context = self._contexts[key] = self._build(*key)
        return context

    def _build(self, verify_chain: bool, opportunistic: bool, low: ssl.TLSVersion | None,
               high: ssl.TLSVersion | None, ciphers: str) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # Names are checked by verify.names_match after the handshake, against the
        # policy's match= patterns, which OpenSSL's single-name check cannot express.
        context.check_hostname = False
        if verify_chain:
            context.verify_mode = ssl.CERT_REQUIRED
            # Explicit, so that a newer Python's defaults (X509_STRICT) change nothing.
            context.verify_flags = ssl.VERIFY_X509_TRUSTED_FIRST
            if self.settings.ca_file is not None:
                context.load_verify_locations(cafile=str(self.settings.ca_file))
            else:
                context.load_default_certs()
        else:
            # may, encrypt, fingerprint and DANE authenticate (or not) by other means
            # than a CA: pins and TLSA records are checked after the handshake.
            context.verify_mode = ssl.CERT_NONE
        with warnings.catch_warnings():
            # Python deprecates TLS 1.0 and 1.1; an operator (or "may") may still allow them.
            warnings.simplefilter("ignore", DeprecationWarning)
            if opportunistic:
                # At "may" any encryption beats plaintext: old protocols and ciphers too.
                context.minimum_version = low or ssl.TLSVersion.TLSv1
                with contextlib.suppress(ssl.SSLError):
                    context.set_ciphers(ciphers or "DEFAULT:@SECLEVEL=0")
            else:
                context.minimum_version = low or ssl.TLSVersion.TLSv1_2
                if ciphers:
                    context.set_ciphers(ciphers)
            if high is not None:
                context.maximum_version = high
        return context

    # -- before connecting ------------------------------------------------------------

    async def plan(self, policy: Policy, host: MxHost, nexthop: str) -> HostPlan:
        """What ``host`` must offer under ``policy``.

        :raises TlsFailure: the MX must not be used (not an MTA-STS ``mx``, its TLSA
            lookup failed, DANE required but no TLSA records); already reported.
        """
        level, tlsa, source, quiet = policy.level, None, policy.source, False
        if policy.mx_patterns and not any(verify.mx_pattern_matches(p, host.hostname)
                                          for p in policy.mx_patterns):
            failure = Failure(ResultType.VALIDATION_FAILURE,
                              f"{host.hostname} matches no mx pattern of the policy "
                              f"({', '.join(policy.mx_patterns)})",
                              "mtasts-policy-mx-mismatch")
            await self._fail(HostPlan(policy, host, nexthop, level, None, source), failure,
                             None)
            # Report-only: on as if there were no policy, and that session is not the
            # policy's to report (RFC 8460 counts it once, as this failure).
            level, quiet = Level.MAY, True
        if level in (Level.DANE, Level.DANE_ONLY):
            tlsa = (await policy.dane.lookup(host.hostname, host.port)
                    if policy.dane is not None else TlsaLookup())
            if tlsa.records or tlsa.failure or tlsa.unusable:
                source = PolicySource("tlsa", tlsa.base_domain or host.hostname,
                                      tuple(str(r) for r in tlsa.records))
            plan = HostPlan(policy, host, nexthop, level, tlsa, source)
            if tlsa.failure is not None:
                # A failed TLSA lookup rules the MX out at "dane" too (RFC 7672 2.2).
                await self._fail(plan, tlsa.failure, None, required=True)
                level, quiet = Level.MAY, True
            elif tlsa.unusable:
                # RFC 7672 2.2: records exist, none usable: TLS is still mandatory, only
                # without authentication. Reported once, as tlsa-invalid. REQUIRETLS
                # needs authentication: that MX cannot have the message.
                await self._report(plan, Failure(
                    ResultType.TLSA_INVALID, f"no usable TLSA record for {host.hostname}",
                    "all-TLSA-records-unusable"), None, enforced=policy.requiretls)
                if policy.requiretls:
                    raise TlsFailure(Failure(
                        ResultType.TLSA_INVALID, f"REQUIRETLS: {host.hostname} has TLSA "
                        f"records, none usable: TLS without authentication is not enough",
                        "all-TLSA-records-unusable"), requiretls=True)
                level, quiet = Level.ENCRYPT, True
            elif not tlsa.records:
                if level is Level.DANE_ONLY:
                    why = (f"{host.hostname} has no usable TLSA records" if policy.dane
                           else "no plugin supplies DANE (the dane plugin)")
                    await self._fail(plan, Failure(
                        ResultType.DANE_REQUIRED, f"DANE is required, but {why}",
                        "dane-required"), None)
                if policy.fallback is not None:
                    # No TLSA here: the next policy decides for this MX (RFC 8461 2:
                    # MTA-STS applies where DANE has nothing to say).
                    return await self.plan(policy.fallback, host, nexthop)
                level = Level.MAY
            if level in (Level.MAY, Level.ENCRYPT):
                tlsa = None
        return HostPlan(policy, host, nexthop, level, tlsa, source, quiet)

    # -- on an open session -----------------------------------------------------------

    async def secure(self, session: SmtpSession, plan: HostPlan, reopen: Reopen
                     ) -> SmtpSession:
        """STARTTLS as ``plan`` demands, certificate checks, then EHLO again.

        :param session: Open and greeted (EHLO done), nothing else sent.
        :param reopen: Opens a fresh session (connect, greeting, EHLO): at ``may`` (and for
            report-only policies) a failed handshake is followed by plaintext on a new
            connection, as Postfix does.
        :returns: The session to deliver on: encrypted, or plaintext where allowed.
        :raises TlsFailure: the session does not meet the policy; it is closed.
        :raises SessionError: the connection broke.
        """
        if plan.level is Level.NONE:
            self._log_outcome(plan, session, "TLS not used (level none)")
            return session
        if not session.supports("STARTTLS"):
            if plan.requires_tls:
                await self._fail(plan, Failure(
                    ResultType.STARTTLS_NOT_SUPPORTED,
                    "TLS is required, but was not offered by the host",
                    "starttls-not-supported"), session)
            elif plan.policy.discovery_failure is not None:
                await self._report(plan, None, session)  # the discovery failure, below
            elif self.report is not None and not plan.quiet and outcomes.recording():
                # RFC 8460 reports nothing for plaintext that no policy forbids; the
                # status page shows it: this destination is not protected.
                outcomes.record(self._result(plan, None, session))
            self._log_outcome(plan, session, "no STARTTLS offered: plaintext")
            return session
        try:
            await session.starttls(self.context(plan), plan.servername)
        except SessionError as exc:
            if exc.stage is Stage.STARTTLS and exc.reply is not None:
                failure = Failure(ResultType.STARTTLS_NOT_SUPPORTED, exc.reason,
                                  str(exc.reply.code))
            elif exc.stage is Stage.TLS:
                failure = verify.handshake_failure(exc.error, exc.reason)
                session.abort()  # the TLS layer is broken: nothing more can be said on it
            else:
                raise
            await self._fail(plan, failure, session)  # raises when enforced
            if exc.stage is Stage.STARTTLS:
                self._log_outcome(plan, session, f"STARTTLS refused ({exc.reply}): plaintext")
                return session
            fresh = await reopen()
            if plan.level is not Level.MAY:
                # A report-only policy failed: on as if there were none, which is "may".
                return await self.secure(fresh, as_may(plan), reopen)
            log.info("TLS with %s [%s] failed (%s); retrying in plaintext",
                     plan.host.hostname, session.peer_ip, exc.reason)
            return fresh
        failure = self._check_certificate(session, plan)
        if failure is not None:
            await self._fail(plan, failure, session)  # raises when enforced
        await session.ehlo(session.ehlo_name)  # RFC 3207 4.2: forget what was said before
        missing = [e for e in plan.policy.required_extensions if not session.supports(e)]
        if missing and failure is None and plan.policy.requiretls:
            # The session met the destination's policy (that is what is reported); it is
            # the sender who asks for more, and this server cannot give it, now or later.
            await self._report(plan, None, session)
            log.info("%s [%s] does not offer %s after STARTTLS", plan.host.hostname,
                     session.peer_ip, ", ".join(missing))
            await session.quit()
            raise TlsFailure(Failure(ResultType.VALIDATION_FAILURE,
                                     f"REQUIRETLS: {plan.host.hostname} does not offer "
                                     f"{', '.join(missing)} after STARTTLS",
                                     "requiretls-not-offered"), not_offered=True)
        if missing and failure is None:
            failure = Failure(ResultType.VALIDATION_FAILURE,
                              f"the server does not offer {', '.join(missing)} after "
                              f"STARTTLS", f"{missing[0].lower()}-not-offered")
            await self._fail(plan, failure, session, required=True)
        if failure is None:
            await self._report(plan, None, session)
        self._log_outcome(plan, session, self._trust(plan, session, failure))
        return session

    def _trust(self, plan: HostPlan, session: SmtpSession, failure: Failure | None) -> str:
        """Postfix's word for a TLS session: ``Verified`` (a trusted chain naming the
        host, a matching pin or TLSA record), ``Trusted`` (a trusted chain where the
        policy checked no name), ``Untrusted`` (no trusted chain, or a check that failed
        without stopping the mail), ``Anonymous`` (no certificate)."""
        ssl_object = session.ssl_object
        if ssl_object is None or not ssl_object.getpeercert(binary_form=True):
            return "Anonymous"
        if failure is None and (plan.level.verifies_chain or plan.level is Level.FINGERPRINT
                                or (plan.tlsa is not None and plan.tlsa.records)):
            return "Verified"
        if self._store is None:
            self._store = verify.TrustStore(self.settings.ca_file)
        return "Trusted" if self._store.trusts(verify.peer_chain(ssl_object)) else \
            "Untrusted"

    def _log_outcome(self, plan: HostPlan, session: SmtpSession, outcome: str) -> None:
        """One line per delivery session on its TLS, in Postfix's words ("Verified TLS
        connection established to ..."), with the policy and who decided it; the JSON log
        gets the same as fields."""
        if self.report is None:
            return  # a probe's side connection
        policy, source = plan.policy, plan.source
        ssl_object = session.ssl_object
        cipher = ssl_object.cipher() if ssl_object is not None else None
        where = f"{plan.host.hostname}[{session.peer_ip}]:{plan.host.port}"
        how = (f": {session.tls_version} with cipher {cipher[0]} ({cipher[2]} bits)"
               if cipher else "")
        decided = policy.decided_by or "the default"
        text = (f"{outcome} TLS connection established to {where}{how}" if cipher else
                f"{where}: {outcome}")
        log.info("%s; policy %s (%s %s) by %s", text, plan.level.value, source.type,
                 source.domain or plan.nexthop, decided, extra={"fields": {
                     "event": "tls", "mx": plan.host.hostname, "ip": session.peer_ip,
                     "port": plan.host.port, "nexthop": plan.nexthop,
                     "trust": outcome if cipher else "none",
                     "tls_version": session.tls_version, "cipher": cipher[0] if cipher else "",
                     "policy_level": plan.level.value, "policy_type": source.type,
                     "policy_domain": source.domain or plan.nexthop, "decided_by": decided}})

    def _check_certificate(self, session: SmtpSession, plan: HostPlan) -> Failure | None:
        ssl_object = session.ssl_object
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            if plan.level in (Level.MAY, Level.ENCRYPT):
                return None
            return Failure(ResultType.VALIDATION_FAILURE, "the server sent no certificate",
                           "no-peer-certificate")
        policy = plan.policy
        if plan.level.verifies_chain:
            patterns = verify.reference_patterns(policy.match_names,
                                                 hostname=plan.host.hostname,
                                                 nexthop=plan.nexthop)
            names = verify.certificate_names(der)
            if not verify.names_match(names, patterns):
                return Failure(ResultType.CERTIFICATE_HOST_MISMATCH,
                               f"certificate names ({', '.join(names) or 'none'}) match "
                               f"none of {', '.join(patterns)}",
                               "X509_V_ERR_HOSTNAME_MISMATCH")
        elif plan.level is Level.FINGERPRINT:
            if not verify.pin_matches(der, policy.pins):
                certificate, key = verify.fingerprints(der)
                return Failure(ResultType.VALIDATION_FAILURE,
                               f"the certificate (sha256:{certificate}) and its public key "
                               f"(sha256:{key}) match no pin", "fingerprint-mismatch")
        elif plan.tlsa is not None and plan.tlsa.records:
            assert policy.dane is not None
            return policy.dane.verify(plan.tlsa, verify.peer_chain(ssl_object),
                                      plan.host.hostname, plan.nexthop)
        return None

    # -- outcomes ---------------------------------------------------------------------

    async def _fail(self, plan: HostPlan, failure: Failure, session: SmtpSession | None,
                    *, required: bool | None = None) -> None:
        """Report ``failure``; raise :class:`TlsFailure` unless the plan lets mail go on
        (``may``, a report-only policy).

        :param required: Whether this failure rules the MX out; by default, whether the
            plan requires TLS.
        """
        enforced = plan.policy.enforce and (plan.requires_tls if required is None
                                            else required)
        await self._report(plan, failure, session, enforced=enforced)
        if not enforced:
            if plan.policy.waived and self.report is not None:
                log.info("%s: %s [%s] failed the TLS policy (%s) of %s, delivered anyway: "
                         "%s", plan.policy.waived, plan.host.hostname,
                         session.peer_ip if session else "-", plan.level, plan.nexthop,
                         failure.reason)
            return
        if self.report is not None:  # a probe's side connections check quietly
            log.warning("TLS policy (%s) not met by %s [%s] for %s: %s", plan.level,
                        plan.host.hostname, session.peer_ip if session else "-",
                        plan.nexthop, failure.reason, extra={"fields": {
                            "event": "tls_failure", "mx": plan.host.hostname,
                            "ip": session.peer_ip if session else "",
                            "port": plan.host.port, "nexthop": plan.nexthop,
                            "policy_level": plan.level.value,
                            "policy_type": plan.source.type,
                            "policy_domain": plan.source.domain or plan.nexthop,
                            "decided_by": plan.policy.decided_by or "the default",
                            "result_type": failure.result_type.value,
                            "failure_code": failure.code}})
        if session is not None:
            await session.quit()
        raise TlsFailure(failure, requiretls=plan.policy.requiretls)

    async def _report(self, plan: HostPlan, failure: Failure | None,
                      session: SmtpSession | None, *, enforced: bool = True) -> None:
        if self.report is None or (plan.quiet and (failure is None or not enforced)):
            return  # quiet: only a failure that stops the mail is news
        if failure is None and plan.policy.discovery_failure is not None:
            failure, enforced = plan.policy.discovery_failure, False
        await self.report(self._result(plan, failure, session, enforced=enforced))

    def _result(self, plan: HostPlan, failure: Failure | None, session: SmtpSession | None,
                *, enforced: bool = True) -> TlsResult:
        ssl_object = session.ssl_object if session is not None else None
        cipher = ssl_object.cipher() if ssl_object is not None else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        source = plan.source
        result = TlsResult(
            domain=plan.nexthop, level=plan.level.value, policy_type=source.type,
            policy_domain=source.domain or plan.nexthop, mx_hostname=plan.host.hostname,
            receiving_ip=session.peer_ip if session else "",
            sending_ip=session.local_ip if session else "",
            receiving_helo=session.server_name if session else "",
            policy_strings=source.strings, mx_host_patterns=source.mx_patterns,
            failure=failure, enforced=enforced,
            tls_version=session.tls_version if session else "",
            cipher=cipher[0] if cipher else "", decided_by=plan.policy.decided_by,
            certificate=der or b"")
        return result


def as_may(plan: HostPlan) -> HostPlan:
    """The plan for a report-only policy's fallback: ``may``, unreported."""
    return replace(plan, level=Level.MAY, tlsa=None, quiet=True)

