"""harakapy: a Haraka-style mail server for strict outbound SMTP TLS.

The public API for plugins, and all of it: a plugin imports from ``harakapy`` and nothing
below it. docs/hooks.md describes every name in ``__all__``.
"""

from harakapy.clock import Clock
from harakapy.config import Config, ConfigError, IniFile
from harakapy.dane import Dane
from harakapy.dkim import DkimSigner
from harakapy.dns import DnsError, NoSuchDomain, Resolver
from harakapy.inbound.address import Address
from harakapy.inbound.connection import Connection, TlsInfo, Transaction
from harakapy.mta_sts import MtaSts
from harakapy.outbound.mx import MxHost
from harakapy.outbound.tls_policy import PolicyLookupError
from harakapy.passwords import hash_password, is_password_hash, verify_password
from harakapy.plugins import checked_config, hookimpl
from harakapy.results import Action, Result, deny, denydisconnect, denysoft, ok
from harakapy.spool.store import QueuedMessage, QueuedRecipient, RecipientState, SpoolError
from harakapy.tasks import background
from harakapy.tls.context import parse_tls_version, self_signed_context, server_context
from harakapy.tls.policy import (
    DaneAuthority,
    Level,
    Pin,
    Policy,
    PolicySource,
    TlsaLookup,
    TlsaRecord,
)
from harakapy.tls.policy_table import PolicyTable, lookup_keys
from harakapy.tls.results import Failure, ResultType, TlsResult
from harakapy.tlsrpt import Tlsrpt
from harakapy.view import Server

__version__ = "0.1.0"

__all__ = [
    "Action",
    "Address",
    "Clock",
    "Config",
    "ConfigError",
    "Connection",
    "Dane",
    "DaneAuthority",
    "DkimSigner",
    "DnsError",
    "Failure",
    "IniFile",
    "Level",
    "MtaSts",
    "MxHost",
    "NoSuchDomain",
    "Pin",
    "Policy",
    "PolicyLookupError",
    "PolicySource",
    "PolicyTable",
    "QueuedMessage",
    "QueuedRecipient",
    "RecipientState",
    "Resolver",
    "Result",
    "ResultType",
    "Server",
    "SpoolError",
    "TlsInfo",
    "TlsResult",
    "TlsaLookup",
    "TlsaRecord",
    "Tlsrpt",
    "Transaction",
    "__version__",
    "background",
    "checked_config",
    "deny",
    "denydisconnect",
    "denysoft",
    "hash_password",
    "hookimpl",
    "is_password_hash",
    "lookup_keys",
    "ok",
    "parse_tls_version",
    "self_signed_context",
    "server_context",
    "verify_password",
]
