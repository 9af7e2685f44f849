"""The ``harakapy`` command: argument parsing and exit codes. It decides nothing itself.

Exit codes: 0 done; 1 the server could not run (address in use, I/O); 2 the command line
or the config directory is wrong (the message names file and line).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import shutil
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from harakapy import __version__, logs, shipped
from harakapy.config import ConfigError

log = logging.getLogger("harakapy.cli")


def _fail(message: str, code: int) -> int:
    print(f"harakapy: {message}", file=sys.stderr)
    return code


def _run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def cmd_run(args: argparse.Namespace) -> int:
    import os

    from harakapy import privileges
    from harakapy.config import Config
    from harakapy.inbound.settings import InboundSettings
    from harakapy.server import ListenError, MailServer
    from harakapy.spool.store import SpoolError
    from harakapy.supervisor import StartError, Supervisor, bind
    from harakapy.systemd import Notifier

    root = Path(args.config_dir) if args.config_dir else None
    worker = _worker_slot(args.worker) if args.worker else None
    logs.setup(args.log_format, args.log_level, worker=worker[0] + 1 if worker else None)

    async def single(server: MailServer) -> None:
        notifier = Notifier()
        await server.start()
        notifier.ready(f"serving on {', '.join(str(a) for a, _ in server.listeners)}")
        await server.serve(notifier=notifier)

    async def supervised(config: Config, settings: InboundSettings) -> int:
        options = ["--log-format", args.log_format, "--log-level", args.log_level]
        # The config and the plugins are checked before any worker starts (and after
        # root is given up: no plugin is imported as root).
        return await Supervisor(root, config, settings, options,
                                check=lambda: MailServer(config)).run()

    try:
        if worker is not None:
            _run_loop(_run_worker(args, root, worker))
            return 0
        config = Config.load(root)
        settings = InboundSettings.from_config(config)
        if settings.workers > 1:
            return _run_loop(supervised(config, settings))
        sockets = None
        if settings.user and os.geteuid() == 0:
            # Bound as root, then root is given up before a plugin loads or a client
            # is read (harakapy.privileges).
            sockets = dict(zip(settings.listen, bind(settings.listen, 1)[0], strict=True))
        privileges.prepare(settings.identity(), [config.queue_dir(), config.state_dir()])
        privileges.drop(settings.identity())
        server = MailServer(config, sockets=sockets)  # checks the plugins before serving
        _run_loop(single(server))
        return 0
    except ConfigError as exc:
        return _fail(f"config error: {exc}", 2)
    except privileges.PrivilegeError as exc:
        return _fail(str(exc), 2)
    except SpoolError as exc:
        return _fail(f"cannot use the spool: {exc}", 1)
    except (ListenError, StartError) as exc:
        code = getattr(exc, "code", 1)
        return _fail(str(exc), code) if code else 0
    except KeyboardInterrupt:
        pass
    return 0


def _worker_slot(text: str) -> tuple[int, int]:
    slot, _, count = text.partition("/")
    return int(slot), int(count)


async def _run_worker(args: argparse.Namespace, root: Path | None,
                      slot: tuple[int, int]) -> None:
    """One worker under the supervisor (``harakapy.supervisor``): the listeners it was
    handed, its slot of the spool, and a line on the ready pipe once it serves."""
    import os
    import socket

    from harakapy.config import Config
    from harakapy.inbound.settings import InboundSettings
    from harakapy.server import ListenError, MailServer
    from harakapy.supervisor import die_with_parent

    die_with_parent(args.parent)
    config = Config.load(root)
    listen = InboundSettings.from_config(config).listen
    descriptors = [int(fd) for fd in args.listen_fds.split(",") if fd]
    if len(descriptors) != len(listen):
        raise ListenError("the listen addresses changed since the supervisor started; "
                          "restart harakapy")
    sockets = {address: socket.socket(fileno=fd)
               for address, fd in zip(listen, descriptors, strict=True)}
    server = MailServer(config, slot=slot, sockets=sockets)
    await server.start()
    os.write(args.ready_fd, b"ready\n")
    os.close(args.ready_fd)
    await server.serve()


def cmd_init(args: argparse.Namespace) -> int:
    target = Path(args.directory)
    if target.exists() and not target.is_dir():
        return _fail(f"{target} exists and is not a directory", 2)
    if target.is_dir() and any(target.iterdir()) and not args.force:
        return _fail(f"{target} is not empty; use --force to write into it anyway", 2)
    try:
        target.mkdir(parents=True, exist_ok=True)
        shutil.copytree(shipped.CONFIG_DIR, target / "config", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        (target / "plugins").mkdir(exist_ok=True)
        (target / "queue").mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        return _fail(f"cannot write {target}: {exc.strerror or exc}", 1)
    print(f"wrote {target}/config, {target}/plugins and {target}/queue; "
          f"start with: harakapy run -c {target}")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    from harakapy.passwords import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.user}: ")
        if getpass.getpass("again: ") != password:
            return _fail("passwords differ", 2)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        return _fail("empty password", 2)
    print(f"{args.user} = {hash_password(password)}")
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    import json

    from harakapy.config import Config
    from harakapy.outbound import control
    from harakapy.spool import report
    from harakapy.spool.store import JournalEvent, Spool, SpoolError

    try:
        config = Config.load(Path(args.config_dir) if args.config_dir else None)
    except ConfigError as exc:
        return _fail(f"config error: {exc}", 2)
    spool = Spool(config.queue_dir())
    if not spool.msg_dir.is_dir():
        return _fail(f"no spool at {spool.root} (has the server run with this config?)", 2)
    try:
        message_id = report.check_id(args.id) if getattr(args, "id", None) else None
        if args.action == "list":
            queued = report.messages(spool)
            if args.json:
                print(json.dumps([report.summary(m) for m in queued], indent=1))
            else:
                for message in queued:
                    print(report.format_line(message))
                print(f"{len(queued)} message(s) queued")
        elif args.action == "show":
            assert message_id is not None
            message = spool.load(message_id)
            print(json.dumps(report.summary(message), indent=1) if args.json
                  else report.format_show(message))
        elif args.action == "stats":
            counts = report.stats(spool)
            if args.json:
                print(json.dumps(counts, indent=1))
            else:
                for key, value in counts.items():
                    print(f"{key}: {value}")
        elif args.action == "flush":
            if message_id is not None:
                spool.load(message_id)  # a clear error for an unknown id
            answer = control.request(spool.root, {"cmd": "flush", "id": message_id})
            if answer is None:
                ids = [message_id] if message_id else list(spool.ids())
                for one in ids:
                    spool.record(one, JournalEvent(flush=True))
                print(f"no server running: {len(ids)} message(s) will be tried at its start")
            else:
                print(f"retrying {answer.get('count', 0)} delivery job(s) now")
        elif args.action == "delete":
            assert message_id is not None
            spool.load(message_id)
            answer = control.request(spool.root, {"cmd": "delete", "id": message_id})
            if answer is None:
                spool.remove(message_id)
            print(f"deleted {message_id}")
    except SpoolError as exc:
        return _fail(str(exc), 2)
    except BrokenPipeError:
        raise
    except OSError as exc:
        return _fail(f"cannot reach the server on {spool.root}: {exc}", 1)
    return 0


def cmd_tls_policy(args: argparse.Namespace) -> int:
    import json

    from harakapy import mta_sts_cli
    from harakapy.dane import Dane
    from harakapy.dane import describe as describe_dane
    from harakapy.dane import format_description as format_dane
    from harakapy.outbound.diagnose import diagnose, format_text
    from harakapy.outbound.tls_policy import PolicyLookupError
    from harakapy.server import MailServer

    logs.setup("text", "warning")
    root = Path(args.config_dir) if args.config_dir else None

    async def main() -> str:
        server = MailServer.from_directory(root)
        await server.prepare()
        try:
            authority, _ = await server.plugins.call_first_named("dane_authority")
            if isinstance(authority, Dane):
                authority.keep_facts = True
            result = await diagnose(server, args.domain, probe=args.probe)
            if isinstance(authority, Dane) and result.level in ("dane", "dane-only"):
                facts = await describe_dane(authority, result.domain, result.next_hops)
                result.details["dane"] = facts
                result.detail_lines += format_dane(facts)
        finally:
            await server.plugins.call_all("shutdown")
        if any(plugin.name == mta_sts_cli.PLUGIN for plugin in server.plugins.plugins):
            facts = await mta_sts_cli.state(server.config, result.domain)
            result.details["mta_sts"] = facts
            result.detail_lines += mta_sts_cli.format_state(facts)
        return json.dumps(result.as_dict(), indent=1) if args.json else format_text(result)

    try:
        print(_run_loop(main()))
    except ConfigError as exc:
        return _fail(f"config error: {exc}", 2)
    except PolicyLookupError as exc:
        return _fail(f"{exc}; the log above has why", 1)
    return 0


def cmd_mta_sts(args: argparse.Namespace) -> int:
    import json

    from harakapy import mta_sts_cli
    from harakapy.config import Config
    from harakapy.dns import DnsError

    logs.setup("text", "warning")
    root = Path(args.config_dir) if args.config_dir else None

    failed = False

    async def main() -> str:
        nonlocal failed
        config = Config.load(root)
        if args.action == "list":
            entries = await mta_sts_cli.cache_list(config)
            return json.dumps(entries, indent=1) if args.json else \
                mta_sts_cli.format_list(entries)
        if args.action == "refresh":
            domain = args.domain.strip().rstrip(".").lower()
            answer, facts = await mta_sts_cli.refresh(config, domain)
            failed = answer.failure is not None
            if args.json:
                return json.dumps({"domain": domain, "applies": answer.policy is not None,
                                   "failure": answer.failure.reason if answer.failure
                                   else "", "entry": facts}, indent=1)
            return mta_sts_cli.format_refresh(domain, answer, facts)
        facts = await mta_sts_cli.publication(config, args.domain)
        return json.dumps(facts, indent=1) if args.json else \
            mta_sts_cli.format_publication(facts)

    try:
        print(_run_loop(main()))
    except ConfigError as exc:
        return _fail(f"config error: {exc}", 2)
    except DnsError as exc:
        return _fail(f"the MX records of {args.domain} could not be read: {exc.reason}", 1)
    except OSError as exc:
        return _fail(f"the MTA-STS cache could not be opened: {exc}", 1)
    return 1 if failed else 0


def cmd_tlsrpt(args: argparse.Namespace) -> int:
    import datetime
    import json

    from harakapy.clock import Clock
    from harakapy.config import Config
    from harakapy.dns import DnsError, Resolver
    from harakapy.tls.tlsrpt_report import compressed
    from harakapy.tlsrpt import Tlsrpt, utc_day

    logs.setup("text", "warning")
    if args.action in ("import", "received"):
        return _tlsrpt_received(args)
    try:
        day = datetime.date.fromisoformat(args.date) if args.date else None
    except ValueError:
        return _fail(f"--date {args.date!r} is not YYYY-MM-DD", 2)

    async def main() -> tuple[str, int]:
        config = Config.load(Path(args.config_dir) if args.config_dir else None)
        clock = Clock()
        service = Tlsrpt.from_config(config, Resolver.from_config(config), clock,
                                     _spool_submit(config, clock))
        try:
            wanted = day or (utc_day(clock.time()) if args.action == "show" else
                             utc_day(clock.time()) - datetime.timedelta(days=1))
            if not await service.ship():
                return ("harakapy: the fleet's Redis cannot be reached: reports need every "
                        "node's counts (config/redis.ini)", 1)
            domains = [args.domain] if getattr(args, "domain", None) else \
                await service.ledger.domains(wanted)
            reports = [await service.report(wanted, domain) for domain in domains]
            if args.action == "show":
                if args.json:
                    return json.dumps(reports, indent=1), 0
                return _format_reports(wanted, domains, reports), 0
            lines, failed = [], False
            if not args.dry_run and wanted >= utc_day(clock.time()):
                return (f"harakapy: {wanted.isoformat()} is not over (UTC): its reports "
                        f"would be partial; --dry-run shows them", 2)
            if not args.dry_run:
                for domain in domains:
                    # The delivery log, as the server's round keeps it: what an endpoint
                    # accepted (or the spool took) is not sent again.
                    for outcome in await service.send(wanted, domain):
                        failed = failed or outcome.state != "sent"
                        lines.append(f"{domain}: {outcome.rua}: {outcome.state}"
                                     + (f" ({outcome.error})" if outcome.error else ""))
                return "\n".join(lines) or "nothing to send now (sent already, or not "\
                    "due for a retry)", int(failed)
            for domain, report in zip(domains, reports, strict=True):
                record = await service.discover(domain)
                if record is None or not record.rua:
                    lines.append(f"{domain}: asks for no reports (no usable _smtp._tls)")
                    continue
                for rua in record.rua:
                    if rua.scheme == "mailto":
                        lines.append(service.mime(report, compressed(report), domain,
                                                  rua.target).decode("ascii", "replace"))
                    else:
                        lines.append(f"POST {rua} (application/tlsrpt+gzip):")
                        lines.append(json.dumps(report, indent=1))
            return "\n".join(lines) or f"no sessions on {wanted.isoformat()}", 0
        finally:
            service.close()
            if service.fleet is not None:
                await service.fleet.link.close()

    try:
        text, code = _run_loop(main())
    except ConfigError as exc:
        return _fail(f"config error: {exc}", 2)
    except DnsError as exc:
        return _fail(f"a _smtp._tls record could not be read: {exc.reason}", 1)
    print(text, file=sys.stderr if code == 2 else sys.stdout)
    return code


def _tlsrpt_received(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from harakapy.config import Config
    from harakapy.tls.tlsrpt_received import ReceivedStore, ReportError, parse_report
    from harakapy.tlsrpt import received_path

    try:
        config = Config.load(Path(args.config_dir) if args.config_dir else None)
    except ConfigError as exc:
        return _fail(f"config error: {exc}", 2)
    store = ReceivedStore(received_path(config))
    try:
        if args.action == "import":
            code = 0
            for name in args.files:
                try:
                    report = parse_report(Path(name).read_bytes())
                except OSError as exc:
                    print(f"{name}: cannot read: {exc.strerror}", file=sys.stderr)
                    code = 1
                    continue
                except ReportError as exc:
                    print(f"{name}: not a TLS report: {exc.reason}", file=sys.stderr)
                    code = 1
                    continue
                added = store.add(report)
                print(f"{name}: {'stored' if added else 'already stored'} "
                      f"({report['organization-name']}, {report['report-id']})")
            return code
        summaries = store.summary(args.since or "")
        if args.json:
            print(json.dumps([dataclasses.asdict(s) for s in summaries], indent=1))
        elif not summaries:
            print("no TLS reports received")
        else:
            for item in summaries:
                kinds = ", ".join(f"{count} {kind}" for kind, count in
                                  sorted(item.by_type.items(), key=lambda kv: -kv[1]))
                print(f"{item.organization}  {item.mx}: {item.succeeded} succeeded, "
                      f"{item.failed} failed" + (f" ({kinds})" if kinds else "") +
                      f"; {item.reports} report(s)")
        return 0
    finally:
        store.close()


def _spool_submit(config: Any, clock: Any):
    """``server.submit`` for a command: the message goes into the spool, durably, and a
    running server is asked to deliver it now; without one, it goes at the next start."""
    from harakapy.outbound import control
    from harakapy.outbound.requiretls import opts_out
    from harakapy.spool.store import Spool

    async def submit(sender: str, recipients: list[str], message: bytes, *,
                     id: str | None = None, requiretls: bool = False) -> Any:
        if id is None:
            raise ValueError("a command's message needs an id of its own")
        spool = Spool(config.queue_dir())
        spool.create()
        queued = await asyncio.to_thread(spool.accept, id=id, sender=sender,
                                         recipients=recipients, message=message,
                                         requiretls=requiretls,
                                         tls_optional=not requiretls and opts_out(message),
                                         arrival=clock.time())
        await asyncio.to_thread(control.request, spool.root, {"cmd": "adopt", "id": id})
        return queued

    return submit


def _format_reports(day, domains, reports) -> str:
    if not reports:
        return f"no sessions on {day.isoformat()} (UTC)"
    lines = [f"TLS sessions on {day.isoformat()} (UTC), as each domain's report will say:"]
    for domain, report in zip(domains, reports, strict=True):
        lines.append(f"{domain}  (report-id {report['report-id']})")
        for entry in report["policies"]:
            policy, summary = entry["policy"], entry["summary"]
            lines.append(f"  {policy['policy-type']} {policy['policy-domain']}: "
                         f"{summary['total-successful-session-count']} succeeded, "
                         f"{summary['total-failure-session-count']} failed")
            for detail in entry["failure-details"]:
                lines.append(f"    {detail['failed-session-count']} x "
                             f"{detail['result-type']} at "
                             f"{detail.get('receiving-mx-hostname', '-')} "
                             f"[{detail.get('receiving-ip', '-')}]"
                             + (f" ({detail['failure-reason-code']})"
                                if "failure-reason-code" in detail else ""))
    return "\n".join(lines)


def cmd_dkim(args: argparse.Namespace) -> int:
    import os

    from harakapy import dkim
    from harakapy.config import Config

    domain = args.domain.strip().rstrip(".").lower()
    if not domain or "/" in domain or not all(part for part in domain.split(".")):
        return _fail(f"{args.domain!r} is not a domain name", 2)
    if not args.selector.replace("-", "").replace("_", "").isalnum():
        return _fail(f"{args.selector!r} is not a selector (letters, digits, - and _)", 2)
    try:
        config = Config.load(Path(args.config_dir) if args.config_dir else None)
    except ConfigError as exc:
        return _fail(f"config error: {exc}", 2)
    if config.config_dir is None:
        return _fail("give the config directory the key goes into: -c DIR", 2)
    folder = config.config_dir / "dkim"
    path = folder / f"{domain}.{args.selector}.key"
    if path.exists():
        return _fail(f"{path} exists; a new key needs a new selector (see key rotation in "
                     f"docs/plugins/dkim_sign.md)", 2)
    content, key_part = dkim.generate(args.algorithm, bits=args.bits)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content)
    except OSError as exc:
        return _fail(f"cannot write {path}: {exc.strerror}", 1)
    print(f"; the key is in {path}")
    print("; publish this DNS record:")
    print(dkim.txt_record(domain, args.selector, key_part))
    print("; then add to config/dkim_sign.ini:")
    print(f"[sign {domain} {args.selector}]")
    print(f"key = dkim/{path.name}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from harakapy.check import check_directory

    root = Path(args.config_dir) if args.config_dir else None
    logs.setup("text", "error")  # a plugin's log lines at start are not the report
    report = _run_loop(check_directory(root))
    for error in report.errors:
        print(error, file=sys.stderr)
    for note in report.notes:
        print(note, file=sys.stderr)
    if not report.ok:
        print(f"harakapy: {len(report.errors)} error(s); {root or 'the shipped defaults'} "
              f"would not start", file=sys.stderr)
        return 2
    print(f"{root or 'the shipped defaults'}: ok; plugins: {', '.join(report.plugins)}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    import json

    from harakapy.config import Config
    from harakapy.plugins import PluginManager

    root = Path(args.config_dir) if args.config_dir else None
    try:
        manager = PluginManager.load(Config.load(root))
    except ConfigError as exc:
        return _fail(f"config error: {exc}", 2)
    rows = [{"position": index + 1, "name": plugin.name, "origin": plugin.origin,
             "hooks": manager.hooks_of(plugin),
             "background": [task.name for task in manager.background
                            if task.plugin == plugin.name]}
            for index, plugin in enumerate(manager.plugins)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['position']:>2}. {row['name']}  ({row['origin']})")
        print(f"      hooks: {', '.join(row['hooks']) or 'none'}")
        if row["background"]:
            print(f"      background: {', '.join(row['background'])}")
    return 0


def cmd_plugin_new(args: argparse.Namespace) -> int:
    from harakapy import plugin_skeleton

    name = args.name
    if not plugin_skeleton.NAME.match(name):
        return _fail(f"{name!r} is not a plugin name for a new file (letters, digits and "
                     f"'_', not starting with a digit)", 2)
    root = Path(args.config_dir)
    written = []
    for path, text in ((root / "plugins" / f"{name}.py", plugin_skeleton.plugin_source(name)),
                       (root / "tests" / f"test_{name}.py", plugin_skeleton.test_source(name))):
        if path.exists():
            return _fail(f"{path} exists; not overwritten", 1)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as exc:
            return _fail(f"cannot write {path}: {exc.strerror}", 1)
        written.append(path)
    for path in written:
        print(f"wrote {path}")
    print(f'add "{name}" to {root / "config" / "plugins"} to use it; '
          f"test it: python -m pytest {written[1]}")
    return 0


def cmd_systemd_unit(args: argparse.Namespace) -> int:
    from harakapy.config import Config
    from harakapy.inbound.settings import InboundSettings
    from harakapy.systemd import unit

    root = Path(args.config_dir).resolve()
    try:
        settings = InboundSettings.from_config(Config.load(root))
    except ConfigError as exc:
        return _fail(f"config error: {exc}", 2)
    print(unit(root, user=settings.user, group=settings.group), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harakapy", description="A Haraka-style mail server for strict outbound SMTP TLS.")
    parser.add_argument("--version", action="version", version=f"harakapy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="run the SMTP listeners (and the outbound queue)",
                              description="Run the server until SIGTERM. SIGHUP re-reads "
                                          "the config directory.")
    run.add_argument("-c", "--config-dir", metavar="DIR",
                     help="config directory (default: the shipped defaults, listening on "
                          "127.0.0.1:2525)")
    run.add_argument("--log-format", choices=("text", "json"), default="text")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                     default="info")
    # How the supervisor starts its workers (harakapy.supervisor); not for people.
    run.add_argument("--worker", help=argparse.SUPPRESS)
    run.add_argument("--parent", type=int, default=0, help=argparse.SUPPRESS)
    run.add_argument("--ready-fd", type=int, default=-1, help=argparse.SUPPRESS)
    run.add_argument("--listen-fds", default="", help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    check = commands.add_parser(
        "check", help="validate the whole config directory without starting",
        description="Load and check every file of the config directory and each plugin's "
                    "settings, as 'run' and SIGHUP do, without listening or opening the "
                    "spool. Prints every error as file:line: message; exits 0 only when "
                    "the directory would start.")
    check.add_argument("-c", "--config-dir", metavar="DIR",
                       help="config directory (default: the shipped defaults)")
    check.set_defaults(func=cmd_check)

    systemd_unit = commands.add_parser(
        "systemd-unit", help="print a systemd unit (Type=notify) for this directory",
        description="Print a systemd service unit that runs 'harakapy run -c DIR' with "
                    "readiness and watchdog notifications and hardening options. Save it "
                    "as /etc/systemd/system/harakapy.service.")
    systemd_unit.add_argument("-c", "--config-dir", metavar="DIR", required=True,
                              help="the config directory the service runs")
    systemd_unit.set_defaults(func=cmd_systemd_unit)

    plugins = commands.add_parser(
        "plugins", help="the plugins in run order, where each was found, its hooks",
        description="List the plugins of config/plugins in run order, with the file (or "
                    "entry point) each was loaded from and the hooks it implements.")
    plugins.add_argument("-c", "--config-dir", metavar="DIR",
                         help="config directory (default: the shipped defaults)")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=cmd_plugins)

    plugin = commands.add_parser("plugin", help="write a new plugin to start from")
    plugin_actions = plugin.add_subparsers(dest="action", metavar="ACTION", required=True)
    new = plugin_actions.add_parser(
        "new", help="a commented plugin skeleton and a test for it",
        description="Write DIR/plugins/NAME.py (a working rcpt hook, the other common "
                    "hooks shown) and DIR/tests/test_NAME.py, a test of it that passes.")
    new.add_argument("name", metavar="NAME")
    new.add_argument("-c", "--config-dir", metavar="DIR", required=True,
                     help="the config directory to write into")
    new.set_defaults(func=cmd_plugin_new)

    init = commands.add_parser("init", help="write a working config directory",
                               description="Write DIR/config (the shipped defaults, each "
                                           "file documented), DIR/plugins and DIR/queue.")
    init.add_argument("directory", metavar="DIR")
    init.add_argument("--force", action="store_true", help="write into a non-empty DIR")
    init.set_defaults(func=cmd_init)

    queue = commands.add_parser(
        "queue", help="inspect and steer the outbound spool",
        description="Inspect and steer the spool, whether or not the server runs.")
    actions = queue.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("list", "one line per queued message"),
                       ("stats", "counts by recipient state and domain")):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("--json", action="store_true", help="machine-readable output")
    show = actions.add_parser("show", help="one message: envelope, states, history, header")
    show.add_argument("id", metavar="ID")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    flush = actions.add_parser("flush", help="retry now (all, or one message)")
    flush.add_argument("id", metavar="ID", nargs="?")
    delete = actions.add_parser("delete", help="remove a message from the queue")
    delete.add_argument("id", metavar="ID")
    for action in actions.choices.values():
        action.add_argument("-c", "--config-dir", metavar="DIR",
                            help="config directory (default: the shipped defaults' spool)")
    queue.set_defaults(func=cmd_queue)

    policy = commands.add_parser(
        "tls-policy", help="show the outbound TLS policy for a domain, and why",
        description="Print the effective outbound TLS policy for DOMAIN, the plugin that "
                    "decided it and why, and the hosts mail would go to. With --probe, "
                    "connect to each of them (EHLO, STARTTLS, QUIT; never MAIL FROM) and "
                    "show what each check found.")
    policy.add_argument("domain", metavar="DOMAIN")
    policy.add_argument("-c", "--config-dir", metavar="DIR",
                        help="config directory (default: the shipped defaults)")
    policy.add_argument("--json", action="store_true", help="machine-readable output")
    policy.add_argument("--probe", action="store_true",
                        help="connect to each MX under the policy and report what it does")
    policy.set_defaults(func=cmd_tls_policy)

    sts = commands.add_parser(
        "mta-sts", help="the MTA-STS policy cache, and our own domains' policies",
        description="list: the cached MTA-STS policies of destinations. refresh DOMAIN: "
                    "read its TXT record and fetch its policy now. publish DOMAIN: the DNS "
                    "records and the policy file to publish for a domain of ours "
                    "([publish DOMAIN] in config/mta_sts.ini).")
    sts_actions = sts.add_subparsers(dest="action", metavar="ACTION", required=True)
    sts_actions.add_parser("list", help="the cached policies, with their state")
    for name, text in (("refresh", "fetch a destination's policy now"),
                       ("publish", "records and policy file for a domain of ours")):
        sts_actions.add_parser(name, help=text, description=text).add_argument(
            "domain", metavar="DOMAIN")
    for action in sts_actions.choices.values():
        action.add_argument("-c", "--config-dir", metavar="DIR",
                            help="config directory (default: the shipped defaults)")
        action.add_argument("--json", action="store_true", help="machine-readable output")
    sts.set_defaults(func=cmd_mta_sts)

    tlsrpt = commands.add_parser(
        "tlsrpt", help="the TLS reports (RFC 8460) harakapy sends",
        description="show: what each domain's report will say for a day (default today, "
                    "UTC). send: send a finished day's reports (default yesterday) to "
                    "their https: destinations now, as the server's round would, once "
                    "each; with --dry-run, print each report as it would go out (the "
                    "mail, or the JSON to POST). import: store reports other senders "
                    "sent about our domains. received: a summary of them.")
    tlsrpt_actions = tlsrpt.add_subparsers(dest="action", metavar="ACTION", required=True)
    show_reports = tlsrpt_actions.add_parser("show", help="the reports we will send")
    show_reports.add_argument("--domain", metavar="DOMAIN")
    show_reports.add_argument("--json", action="store_true", help="the reports' JSON")
    send_reports = tlsrpt_actions.add_parser("send", help="send a day's reports now")
    send_reports.add_argument("--dry-run", action="store_true",
                              help="print what would be sent, send nothing")
    for action in tlsrpt_actions.choices.values():
        action.add_argument("--date", metavar="YYYY-MM-DD", help="the UTC day")
    imported = tlsrpt_actions.add_parser(
        "import", help="store TLS reports received about our domains (JSON or gzip)")
    imported.add_argument("files", metavar="FILE", nargs="+")
    received = tlsrpt_actions.add_parser(
        "received", help="the received reports, per reporting organisation and MX")
    received.add_argument("--since", metavar="YYYY-MM-DD")
    received.add_argument("--json", action="store_true", help="machine-readable output")
    for action in tlsrpt_actions.choices.values():
        action.add_argument("-c", "--config-dir", metavar="DIR", help="config directory")
    tlsrpt.set_defaults(func=cmd_tlsrpt)

    dkim_command = commands.add_parser(
        "dkim", help="DKIM keys for dkim_sign",
        description="keygen DOMAIN SELECTOR: write a new signing key into "
                    "DIR/config/dkim/ and print the DNS TXT record to publish and the "
                    "config/dkim_sign.ini section to add.")
    dkim_actions = dkim_command.add_subparsers(dest="action", metavar="ACTION", required=True)
    keygen = dkim_actions.add_parser("keygen", help="a new key and its DNS record")
    keygen.add_argument("domain", metavar="DOMAIN")
    keygen.add_argument("selector", metavar="SELECTOR")
    keygen.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa",
                        help="rsa (every verifier has it) or ed25519 (RFC 8463, beside rsa)")
    keygen.add_argument("--bits", type=int, default=2048, choices=(1024, 2048, 3072, 4096),
                        help="RSA key size")
    keygen.add_argument("-c", "--config-dir", metavar="DIR", help="config directory")
    dkim_command.set_defaults(func=cmd_dkim)

    passwd = commands.add_parser(
        "passwd", help="hash a password for auth/flat_file",
        description="Print a 'USER = HASH' line (Argon2id) for [users] in "
                    "config/auth_flat_file.ini. Reads the password from the terminal, or "
                    "one line from standard input.")
    passwd.add_argument("user", metavar="USER")
    passwd.set_defaults(func=cmd_passwd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # `harakapy queue list | head`: the reader had enough; that is not an error.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
