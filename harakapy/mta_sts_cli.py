"""What ``harakapy mta-sts list|refresh|publish`` and ``harakapy tls-policy`` show of
MTA-STS: the cache as the server uses it (the same SQLite file, safe beside a running
server), a fetch made now, and the records and policy file to publish for our domains.
"""

from __future__ import annotations

import datetime
from typing import Any

from harakapy.clock import Clock
from harakapy.config import Config
from harakapy.dns import Resolver
from harakapy.mta_sts import MtaSts, policy_id, policy_text, sts_config
from harakapy.tls.mta_sts import Mode
from harakapy.tls.sts_client import StsAnswer
from harakapy.tls.sts_config import Published
from harakapy.tls.sts_store import CachedPolicy

PLUGIN = "mta_sts"


def open_mta_sts(config: Config) -> MtaSts:
    """The client over the server's cache, with the real clock.

    :raises ConfigError: config/mta_sts.ini (or tls.ini) is wrong.
    """
    return MtaSts.from_config(config, Resolver.from_config(config), Clock())


def _when(timestamp: float) -> str:
    if not timestamp:
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def entry_facts(entry: CachedPolicy, now: float) -> dict[str, Any]:
    """One cache entry for ``--json`` and the text forms."""
    policy = entry.policy()
    return {
        "domain": entry.domain,
        "id": entry.record_id,
        "mode": policy.mode.value if policy else "",
        "mx": list(policy.mx) if policy else [],
        "max_age": policy.max_age if policy else 0,
        "valid": entry.valid_at(now),
        "fetched": _when(entry.fetched),
        "expires": _when(entry.expires),
        "txt_checked": _when(entry.checked),
        "used": _when(entry.used),
        "last_error": entry.error,
        "retry_after": _when(entry.retry_after) if entry.failed_id else "-",
        "policy": list(policy.lines) if policy else [],
    }


def format_entry(facts: dict[str, Any], indent: str = "") -> list[str]:
    if facts["mode"]:
        state = "valid" if facts["valid"] else "EXPIRED"
        head = (f"policy id {facts['id']}, mode {facts['mode']}, max_age "
                f"{facts['max_age']}, {state}")
    else:
        head = "no policy fetched"
    lines = [f"{indent}{head}",
             f"{indent}  fetched {facts['fetched']}, expires {facts['expires']}, "
             f"TXT checked {facts['txt_checked']}, mail sent {facts['used']}"]
    if facts["mx"]:
        lines.append(f"{indent}  mx: {', '.join(facts['mx'])}")
    if facts["last_error"]:
        lines.append(f"{indent}  last error: {facts['last_error']}")
        if facts["retry_after"] != "-":
            lines.append(f"{indent}  not fetched again before {facts['retry_after']}")
    return lines


async def cache_list(config: Config) -> list[dict[str, Any]]:
    service = open_mta_sts(config)
    try:
        now = service.clock.time()
        return [entry_facts(entry, now) for entry in
                sorted(await service.entries(), key=lambda e: e.domain)]
    finally:
        service.close()


def format_list(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "the MTA-STS cache is empty"
    lines: list[str] = []
    for facts in entries:
        lines.append(facts["domain"])
        lines += format_entry(facts, "  ")
    return "\n".join(lines)


async def refresh(config: Config, domain: str) -> tuple[StsAnswer, dict[str, Any] | None]:
    service = open_mta_sts(config)
    try:
        answer = await service.refresh(domain)
        entry = await service.entry(domain)
        return answer, entry_facts(entry, service.clock.time()) if entry else None
    finally:
        service.close()


def format_refresh(domain: str, answer: StsAnswer, facts: dict[str, Any] | None) -> str:
    if answer.failure is not None:
        head = f"{domain}: {answer.failure.result_type.value}: {answer.failure.reason}"
        if answer.policy is not None:
            head += "; the cached policy still applies"
        elif answer.defer:
            head += "; mail to it waits until its TXT record can be read"
        else:
            head += "; mail to it goes as if it had no policy"
    elif answer.fetched:
        head = f"{domain}: policy fetched"
    elif answer.policy is not None:
        head = f"{domain}: nothing fetched; the cached policy applies"
    else:
        head = f"{domain}: no MTA-STS policy (no _mta-sts TXT record, or mode none)"
    lines = [head]
    if facts is not None:
        lines += format_entry(facts, "  ")
    return "\n".join(lines)


async def state(config: Config, domain: str) -> dict[str, Any]:
    """For ``harakapy tls-policy``: the cache entry of ``domain`` (empty for none)."""
    service = open_mta_sts(config)
    try:
        entry = await service.entry(domain)
        return entry_facts(entry, service.clock.time()) if entry else {}
    finally:
        service.close()


def format_state(facts: dict[str, Any]) -> list[str]:
    if not facts:
        return ["MTA-STS:     nothing cached (no policy, or not looked up yet)"]
    first, *rest = format_entry(facts)
    return [f"MTA-STS:     {first}", *(f"             {line.lstrip()}" for line in rest)]


async def publication(config: Config, domain: str) -> dict[str, Any]:
    """The records and the policy file for a domain of ours.

    :raises DnsError: the MX hosts come from DNS (no ``mx`` in ``[publish NAME]``), and
        DNS failed.
    """
    domain = domain.strip().rstrip(".").lower()
    settings = sts_config(config)
    published = settings.published.get(domain)
    configured = published is not None
    if published is None:
        published = Published(domain)
    service = MtaSts(settings, _NoStore(), Resolver.from_config(config), Clock())
    mx = await service.published_mx(published)
    text = policy_text(published, mx)
    return {
        "domain": domain,
        "configured": configured,
        "mode": published.mode.value,
        "mx": list(mx),
        "mx_from_dns": not published.mx,
        "max_age": published.max_age,
        "id": policy_id(text),
        "policy": text.decode(),
        "rua": list(published.rua),
        "served": settings.listener is not None and configured,
    }


def format_publication(facts: dict[str, Any]) -> str:
    domain = facts["domain"]
    lines = [f"; MTA-STS (RFC 8461) for {domain}"]
    if not facts["configured"]:
        lines.append(f"; defaults: no [publish {domain}] section in config/mta_sts.ini")
    if not facts["mx"] and facts["mode"] != Mode.NONE.value:
        lines.append(f"; WARNING: {domain} has no MX records: a policy without mx lines "
                     f"is invalid")
    lines += ["", "; DNS records:",
              f'_mta-sts.{domain}. 3600 IN TXT "v=STSv1; id={facts["id"]}"']
    if facts["rua"]:
        lines.append(f'_smtp._tls.{domain}. 3600 IN TXT "v=TLSRPTv1; '
                     f'rua={",".join(facts["rua"])}"')
    else:
        lines.append(f'; _smtp._tls.{domain}. 3600 IN TXT "v=TLSRPTv1; '
                     f'rua=mailto:tlsrpt@{domain}"   (set rua in [publish {domain}])')
    lines.append(f"; and mta-sts.{domain}: an A/AAAA record of the HTTPS server below")
    where = ("served by harakapy's [listen] HTTPS listener" if facts["served"]
             else "serve it as a static file, Content-Type text/plain")
    lines += ["", f"; https://mta-sts.{domain}/.well-known/mta-sts.txt ({where}):",
              facts["policy"].replace("\r\n", "\n").rstrip("\n")]
    if facts["mx_from_dns"]:
        lines += ["", f"; the mx lines are {domain}'s MX records now; list them in "
                      f"[publish {domain}] mx to keep them fixed"]
    lines += ["", "; The id changes with every change of the policy: publish the policy "
                  "file first, then the TXT record."]
    return "\n".join(lines)


class _NoStore:
    """Publishing needs no cache; this keeps the command from creating one."""

    def get(self, domain: str) -> None:
        return None

    def put(self, entry: CachedPolicy) -> None:
        pass

    def touch(self, domain: str, now: float) -> None:
        pass

    def delete(self, domain: str) -> None:
        pass

    def entries(self) -> list[CachedPolicy]:
        return []
