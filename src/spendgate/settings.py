"""One frozen settings object, read from ``SPENDGATE_*`` environment variables and overridden by flags."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from spendgate.domain import InvalidArgumentError

# Writer loops of a standalone `spendgate ledger` process. Each loop reads a batch, inserts it and only then
# reads the next, so one loop leaves the database idle while it reads and parses and itself idle while the
# database commits; two loops overlap those halves (about 1.6 times one loop's rate in `make bench`).
STANDALONE_LEDGER_WRITERS = 2
# A linger is a wait every call under load may pay: more than 10 ms would be a misconfiguration.
REDIS_LINGER_US_MAX = 10_000


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Everything a spendgate process can be configured with. Units are named last."""

    host: str = "127.0.0.1"
    port: int = 50051
    # A unix socket path to listen on as well (for sidecars); empty for none.
    unix_socket: str = ""
    # Without a Redis URL the server runs the same Lua scripts on an in-process fakeredis.
    redis_url: str = ""
    redis_timeout_s: float = 0.25
    redis_connections_max: int = 64
    # Send the hot path's scripts over spendgate's own pipelined connection (store/pipe.py) instead of
    # redis-py's pool; TLS URLs always use redis-py. Off is for comparing the two.
    redis_pipe: bool = True
    # How long, at most, the pipe holds a lone write for company while the event loop is busy (store/pipe.py):
    # fewer, larger round trips at saturation, no wait at a steady low load; 0 (the default) is off. It raised
    # closed-loop unary throughput in `make bench` but lengthened the tail near the loop's limit (README).
    redis_linger_us: int = 0
    key_prefix: str = "sg"
    hold_ttl_s: float = 300.0
    idempotency_ttl_s: float = 86_400.0
    # How long a captured, voided or expired hold is remembered, to answer late captures precisely.
    hold_retention_s: float = 86_400.0
    sweep_interval_s: float = 1.0
    shutdown_grace_s: float = 10.0
    # Where the embedded default keeps its ledger; empty database_url means SQLite under data_dir.
    data_dir: str = ".spendgate"
    database_url: str = ""
    # Whether the server keeps a ledger (and runs its writers). Every server started from the command line or
    # the environment (load_settings) does; only code that builds Settings itself starts without one.
    ledger: bool = False
    # Writer loops the server runs; 0 leaves draining the outbox to `spendgate ledger` processes.
    ledger_writers: int = 1
    # The writers' consumer name in the outbox's group (hostname-pid by default; a stable name is better).
    ledger_consumer: str = ""
    ledger_batch_size_max: int = 1000
    ledger_linger_ms: int = 20
    plan: str = ""
    # TLS: with a certificate and key the port speaks only TLS; with a client CA as well, clients must present
    # a certificate signed by it (mutual TLS).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Whether bearer tokens are required. Every server started from the command line or the environment
    # (load_settings) has it on unless SPENDGATE_AUTH=off; only code that builds Settings itself, such as
    # in-process tests, starts from off.
    auth: bool = False
    # The deployment's root token (may do anything). Without one, a server with auth on makes one at start
    # and prints it; set it for replicas to share.
    admin_token: str = ""
    log_level: str = "INFO"
    # "json" (one object per line, for log pipelines) or "text" (for people at a terminal).
    log_format: str = "json"
    # Prometheus /metrics on this HTTP port; 0 turns the endpoint off (metrics are still kept).
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # At most this many nodes get per-node spend and utilization series (the busiest first).
    metrics_nodes_max: int = 1000
    metrics_interval_s: float = 5.0
    # Alerts and freezes are posted here when set, signed with webhook_secret (HMAC-SHA256).
    webhook_url: str = ""
    webhook_secret: str = ""
    # Comma-separated event kinds to post: alert, freeze, unfreeze, decision, capture, void, config.
    webhook_kinds: str = "alert,freeze,unfreeze"
    # Utilization thresholds (percent of a window's limit) that raise an alert, once per window.
    alert_percents: str = "50,80,100"
    message_size_max_bytes: int = 64 * 1024
    # ApplyPlan's own bound: a plan of 100,000 wallets is about 8 MiB of YAML.
    plan_size_max_bytes: int = 32 * 1024 * 1024
    metadata_size_max_bytes: int = 8 * 1024
    holds_per_wallet_max: int = 1000
    # HTTP/2 streams one client connection may have open at once; the server refuses more (UNAVAILABLE, which
    # the clients retry), so one connection cannot grow the server's memory without bound.
    streams_per_connection_max: int = 256
    concurrent_rpcs_max: int = 10_000
    # Run every thread but the event loop's (grpc's poller and event engine among them) as SCHED_BATCH, so
    # their wake-ups never preempt the event loop's thread (spendgate/threads.py); Linux only, no privilege.
    batch_helper_threads: bool = True

    def __post_init__(self) -> None:
        for name in (
            "redis_timeout_s",
            "hold_ttl_s",
            "idempotency_ttl_s",
            "hold_retention_s",
            "sweep_interval_s",
        ):
            if getattr(self, name) <= 0:
                raise InvalidArgumentError(f"{name} must be positive")
        if not 0 <= self.redis_linger_us <= REDIS_LINGER_US_MAX:
            raise InvalidArgumentError(f"redis_linger_us must be from 0 to {REDIS_LINGER_US_MAX}")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise InvalidArgumentError(f"{name} {getattr(self, name)} is not a TCP port")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise InvalidArgumentError("TLS needs both tls_cert_file and tls_key_file")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise InvalidArgumentError("mutual TLS (tls_client_ca_file) needs tls_cert_file and tls_key_file")
        if self.webhook_url and not self.webhook_secret:
            raise InvalidArgumentError("webhook_url needs webhook_secret: deliveries are always signed")
        try:
            percents = [int(part) for part in self.alert_percents.split(",") if part.strip()]
        except ValueError as error:
            raise InvalidArgumentError(f"alert_percents {self.alert_percents!r} must be whole numbers") from error
        if any(not 1 <= p <= 1000 for p in percents):
            raise InvalidArgumentError("alert_percents must be from 1 to 1000")
        if self.log_format not in ("json", "text"):
            raise InvalidArgumentError(f"log_format {self.log_format!r} must be json or text")

    @property
    def alert_percent_list(self) -> tuple[int, ...]:
        """The alert thresholds as numbers."""
        return tuple(int(part) for part in self.alert_percents.split(",") if part.strip())

    @property
    def embedded(self) -> bool:
        """Whether the server runs on the in-process fakeredis."""
        return not self.redis_url


def _convert(field: dataclasses.Field[Any], raw: str) -> Any:
    kind = field.type
    try:
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as error:
        raise InvalidArgumentError(f"SPENDGATE_{field.name.upper()}={raw!r} is not a {kind}") from error
    return raw


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read settings from ``SPENDGATE_<NAME>`` variables, then apply non-``None`` overrides (flags)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {"auth": True, "ledger": True}
    for field in dataclasses.fields(Settings):
        raw = environ.get(f"SPENDGATE_{field.name.upper()}")
        if raw is not None:
            values[field.name] = _convert(field, raw)
    values.update({name: value for name, value in overrides.items() if value is not None})
    return Settings(**values)
