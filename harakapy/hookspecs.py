"""Every hook harakapy calls. Each docstring is the reference for that hook.

Decision hooks (marked ``firstresult=True``) ask plugins in ``config/plugins`` order and stop
at the first answer that is not ``None``. The ``server`` argument of every hook is the
plugin's own view of the server (:class:`harakapy.Server`): config, ``me``, ``notes``, DNS,
message submission, its logger and state directory. Notification hooks call every plugin and ignore
what they return. Implementations may be ``def`` or ``async def`` and may take any subset of
the arguments, by name. A plugin that raises (or outlives ``[main] plugin_timeout``) in a
decision hook is logged with its traceback and answered as a temporary failure: never as an
accept.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from harakapy.inbound.address import Address
    from harakapy.inbound.connection import Connection, Transaction
    from harakapy.outbound.mx import MxHost
    from harakapy.results import Result
    from harakapy.spool.store import QueuedMessage, QueuedRecipient
    from harakapy.tls.policy import DaneAuthority, Policy
    from harakapy.tls.results import TlsResult
    from harakapy.view import Server

hookspec = pluggy.HookspecMarker("harakapy")

# -- lifecycle ------------------------------------------------------------------------------


@hookspec
def startup(server: Server) -> None:
    """Called once, after the config and plugins are loaded and before any listener opens.

    Check your settings here: raise :class:`~harakapy.ConfigError` and
    ``harakapy run`` prints it and exits non-zero before listening (or use
    :func:`~harakapy.checked_config`). Background tasks (``@background``) start after every
    plugin's ``startup`` passed.

    :param server: This plugin's view: ``server.config``, ``server.notes``, ``server.me``.

    Every plugin is called; an exception stops the server from starting.
    """


@hookspec
def config_reload(server: Server) -> None:
    """Called after SIGHUP re-read the config directory, with ``server.config`` already the
    new config and plugin files (``DIR/plugins``, the shipped ones) freshly imported,
    before the new config takes over. Plugins from installed packages (entry points) are
    not re-imported: upgrading one needs a restart.

    Raise :class:`~harakapy.config.ConfigError` to refuse the new config: the server logs
    why and keeps running on the old one.

    :param server: This plugin's view, showing the new config.

    Every plugin is called; an exception refuses the reload. Once the new config has taken
    over, the old plugin set's background tasks are cancelled and the new set's started.
    """


@hookspec
def shutdown(server: Server) -> None:
    """Called once when the server stops, after the listeners closed, in-flight
    transactions finished or were cut off, and background tasks were cancelled.

    Every plugin is called; exceptions are logged.
    """


@hookspec(firstresult=True)
def inbound_tls(server: Server) -> ssl.SSLContext | None:
    """Supply the server-side TLS context for inbound STARTTLS and implicit-TLS listeners.

    Asked at startup and after each reload. Return an :class:`ssl.SSLContext` (server side,
    key and certificate loaded), or ``None`` to let the next plugin decide. When no plugin
    answers, STARTTLS is not offered and no implicit-TLS listener may be configured. The
    shipped ``tls`` plugin reads ``config/tls.ini``.

    Stops at the first non-None result.
    """


# -- inbound, one connection --------------------------------------------------------------


@hookspec(firstresult=True)
def connect(connection: Connection, server: Server) -> Result | None:
    """A client connected; decide whether it may talk to us.

    ``None`` or :func:`~harakapy.ok` sends the ``220`` greeting. :func:`~harakapy.deny` or
    :func:`~harakapy.denydisconnect` answers ``554`` and closes; :func:`~harakapy.denysoft`
    answers ``421`` and closes.

    :param connection: The new connection (``remote_ip``, ``local_port``, ``notes``).

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def helo(connection: Connection, hostname: str, server: Server) -> Result | None:
    """The client sent ``HELO hostname``.

    ``None`` or ``ok()`` answers ``250``; a refusal answers with its code and the client
    must try again (``DENYDISCONNECT`` closes).

    :param hostname: The argument as sent, stripped.

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def ehlo(connection: Connection, hostname: str, server: Server) -> Result | None:
    """The client sent ``EHLO hostname``; as :func:`helo`, answered with the extension list.

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def auth(connection: Connection, mechanism: str, user: str, password: str,
         server: Server) -> Result | None:
    """Check credentials from ``AUTH PLAIN`` or ``AUTH LOGIN``.

    Only ever called over TLS: AUTH is not offered on a plaintext connection. Return
    :func:`~harakapy.ok` to authenticate ``user`` (then ``connection.auth_user`` is set and
    the shipped ``relay`` plugin lets the client relay), :func:`~harakapy.deny` for wrong
    credentials (``535 5.7.8``), ``None`` when the user is not yours. When nobody accepts,
    the answer is ``535 5.7.8``. Verify hashes in a thread (``asyncio.to_thread``): they are
    slow on purpose.

    :param mechanism: ``"PLAIN"`` or ``"LOGIN"``.
    :param user: The authentication identity, decoded as UTF-8.
    :param password: The password, decoded as UTF-8. Never log it.

    Stops at the first non-None result.
    """


# -- inbound, one transaction -------------------------------------------------------------


@hookspec(firstresult=True)
def mail(connection: Connection, transaction: Transaction, sender: Address,
         params: dict[str, str | bool], server: Server) -> Result | None:
    """The client sent ``MAIL FROM``; a new transaction has begun.

    ``None`` or ``ok()`` answers ``250 2.1.0``.

    :param transaction: The new transaction (``notes`` is empty). Set
        ``transaction.requiretls = True`` to have this message delivered only as
        REQUIRETLS allows (RFC 8689; docs/requiretls.md), as if the client had asked.
    :param sender: The reverse path; ``sender.is_null`` for ``MAIL FROM:<>``.
    :param params: ESMTP parameters, upper-case names (``SIZE``, ``BODY``, ``SMTPUTF8``,
        ``REQUIRETLS``).

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def rcpt(connection: Connection, transaction: Transaction, recipient: Address,
         params: dict[str, str | bool], server: Server) -> Result | None:
    """The client sent ``RCPT TO``: decide whether we take mail for ``recipient``.

    Unlike the other hooks, ``None`` from every plugin is a refusal: ``550 5.7.1`` relaying
    denied, so that a server is never an open relay by omission. Return :func:`~harakapy.ok`
    to accept (``250 2.1.5``). Recipients of a relaying client (``connection.relaying``)
    go to :func:`queue_outbound`, the others to :func:`queue`.

    :param recipient: The forward path, ``recipient.domain`` lower-case.

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def data(connection: Connection, transaction: Transaction, server: Server) -> Result | None:
    """The client sent ``DATA``, before the ``354`` and before any message text.

    A refusal here answers the ``DATA`` command itself.

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def data_post(connection: Connection, transaction: Transaction,
              server: Server) -> Result | None:
    """The whole message has arrived (``transaction.message`` holds it, our ``Received:``
    header first); decide before it is queued.

    A refusal answers the end of data; ``None`` or ``ok()`` goes on to queueing.

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def queue(connection: Connection, transaction: Transaction, server: Server) -> Result | None:
    """Deliver a message locally (the client is not relaying): store it, forward it, or
    refuse it.

    Return :func:`~harakapy.ok` once the message is safe: the client then hears
    ``250 2.0.0 Ok: queued as <id>``. When no plugin answers, the client hears ``451`` and
    keeps the message.

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def queue_outbound(connection: Connection, transaction: Transaction,
                   server: Server) -> Result | None:
    """Queue a message from a relaying client for delivery to other servers.

    As :func:`queue`: ``ok()`` means the message is safe; nobody answering gives ``451``.

    Stops at the first non-None result.
    """


@hookspec
def disconnect(connection: Connection, server: Server) -> None:
    """The connection closed, whoever closed it.

    Every plugin is called; exceptions are logged.
    """


# -- outbound ------------------------------------------------------------------------------


@hookspec
def init_outbound(message: QueuedMessage, server: Server) -> None:
    """A message entered the outbound queue (it is in the spool, fsynced).

    :param message: The queued message: ``id``, ``sender``, ``recipients`` (each with
        ``address``, ``domain``, ``state``), ``arrival``, ``size``; ``message.read()`` loads
        the text.

    Every plugin is called; exceptions are logged.
    """


@hookspec(firstresult=True)
def get_mx(message: QueuedMessage, domain: str, server: Server
           ) -> list[MxHost] | MxHost | str | None:
    """Choose the next hops for ``domain`` instead of DNS: a smarthost, a backend.

    Return an :class:`~harakapy.outbound.mx.MxHost` (``MxHost("10.0.0.5", port=2525,
    lmtp=True)``), a string ``"host"`` or ``"host:port"``, or a list of them tried in
    order; ``None`` lets the next plugin decide, and when none does, the MX records in DNS
    are used (RFC 5321 5.1).

    Stops at the first non-None result. A plugin that fails defers the mail (4.3.0); it
    never falls back to DNS.
    """


@hookspec(firstresult=True)
def tls_policy(domain: str, hosts: list[MxHost], routed: bool, message: QueuedMessage | None,
               server: Server) -> Policy | None:
    """The TLS policy for mail to ``domain``: what each of its MX hosts must offer.

    :param domain: The destination: the recipient domain. When a ``get_mx`` plugin routed
        the mail (``routed`` is true), the policy is that route's: Postfix looks up the
        next hop (``[host]:port``), not the recipient domain, and so does ``tls_require``.
    :param hosts: The hosts to be tried, in order (MX records or the route).
    :param message: The message being delivered; ``None`` when ``harakapy tls-policy``
        asks.

    Return a :class:`~harakapy.tls.policy.Policy` (``Policy(Level.VERIFY)``), or ``None``
    to let the next plugin decide; when none does, ``[outbound] default_level`` in
    ``config/tls.ini`` applies (``may``). The shipped order puts the operator's table
    first (``tls_require``, ``tls_pin``); the ``dane`` and ``mta_sts`` plugins go after
    them, DANE before MTA-STS (RFC 8461 section 2: MTA-STS must not override DANE).

    Stops at the first non-None result. A plugin that fails defers the mail (4.7.0): a
    broken policy source never becomes a weaker policy.
    """


@hookspec(firstresult=True)
def dane_authority(server: Server) -> DaneAuthority | None:
    """Supply the DANE verifier for policies at ``dane``/``dane-only`` that came without
    one, such as a ``tls_require`` table entry ``example.com dane-only``.

    Return an object with the :class:`~harakapy.tls.policy.DaneAuthority` methods
    (``lookup`` and ``verify``), or ``None``. The ``dane`` plugin answers it. With no
    answer, ``dane`` behaves as ``may`` and ``dane-only`` never delivers (``dane-required``).

    Stops at the first non-None result. A plugin that fails defers the mail (4.7.0).
    """


@hookspec
def tls_result(result: TlsResult, server: Server) -> None:
    """One outbound TLS negotiation ended, in success or failure (invariant 5).

    :param result: A :class:`~harakapy.tls.results.TlsResult`: ``domain``, ``level``, the
        RFC 8460 ``policy_type``/``policy_domain``/``policy_strings``/
        ``mx_host_patterns``, ``mx_hostname``, ``receiving_ip``, ``receiving_helo``,
        ``sending_ip``, ``tls_version``, ``cipher``, and on failure ``failure``
        (``result_type``, ``reason``, ``code``). ``enforced`` is false when the failure
        did not stop the mail (``may``, a report-only policy).

    Called once per session in which TLS was required or attempted, before any message
    data is sent on it; a reused session is not reported again (RFC 8460 4.1).

    Every plugin is called; exceptions are logged.
    """


@hookspec
def delivered(message: QueuedMessage, recipients: list[QueuedRecipient], mx: str,
              reply: str, server: Server) -> None:
    """Recipients were accepted by a receiving server (recorded in the spool first).

    :param mx: The host that accepted them.
    :param reply: Its reply, e.g. ``"250 2.0.0 Ok: queued as 4X1"``.

    Every plugin is called; exceptions are logged.
    """


@hookspec
def deferred(message: QueuedMessage, recipients: list[QueuedRecipient], reason: str,
             next_attempt: float, server: Server) -> None:
    """Recipients could not be delivered now and will be tried again.

    :param reason: Why (the server's 4xx reply, or the connection or DNS failure).
    :param next_attempt: When, in seconds since the epoch.

    Every plugin is called; exceptions are logged.
    """


@hookspec(firstresult=True)
def bounce(message: QueuedMessage, recipients: list[QueuedRecipient], dsn: bytes,
           server: Server) -> Result | bytes | None:
    """Recipients failed for good; ``dsn`` is the RFC 3464 report we will send the sender.

    Return ``None`` to send it, other ``bytes`` to send those instead (a rewritten
    report), or :func:`~harakapy.ok` to send nothing (the plugin dealt with it). Messages
    from the null sender ``<>`` never get a DSN and do not reach this hook.

    Stops at the first non-None result. When a plugin fails, the DSN as built is sent:
    a broken plugin never loses a notice.
    """
