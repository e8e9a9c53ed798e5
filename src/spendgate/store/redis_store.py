"""The Redis store: runs the Lua scripts, and turns their replies into domain values.

It works the same over a real Redis (``redis.asyncio``) and the embedded in-process fakeredis, since both run
the same scripts. Every call is bounded by ``timeout_s``; a Redis that is down or slow raises
:class:`~spendgate.domain.UnavailableError` and never hangs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib.resources
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import redis.asyncio as aioredis
import redis.exceptions

from spendgate.domain import (
    AccountPlan,
    AlreadyExistsError,
    AuthorizeCommand,
    AuthorizeResult,
    Breaker,
    CaptureResult,
    Decision,
    DenyReason,
    FailedPreconditionError,
    HoldState,
    InvalidArgumentError,
    Limits,
    NodeBudget,
    NodeKind,
    NodeSpec,
    NodeWindow,
    NotFoundError,
    PermissionDeniedError,
    RemainingBudget,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    VoidResult,
    Window,
    WindowBudget,
    with_article,
)
from spendgate.money import format_amount
from spendgate.store.keys import Keys
from spendgate.store.pipe import Argument, Encoded, PipeStats, RedisPipe, encode_command, flatten
from spendgate.store.protocol import AccountInfo, AuthorizeOutcome, Backlog, Chain, StaleChainError, TokenRecord
from spendgate.windows import WindowIds

_SCRIPTS = (
    "authorize",
    "capture",
    "void",
    "expire",
    "budget",
    "resolve",
    "put_node",
    "delete_node",
    "node_activity",
    "freeze",
    "restore_counters",
)
# Admin calls write or read many nodes per round trip; they get a longer deadline than the hot path.
PUT_BATCH_SIZE = 500
# Chains whose fixed script arguments are kept (a bound, not an LRU, like the core's chain cache).
CHAIN_ARGUMENTS_CACHED_MAX = 100_000
BULK_TIMEOUT_S = 30.0
# The configuration fields of a node's hash, in the order _node_spec reads them.
_CONFIG_FIELDS = ("kind", "parent", "ptx", "l:d", "l:w", "l:m", "l:t", "vel", "svc", "frz", "shd", "brk")
_KIND_NAMES = {NodeKind.ACCOUNT: "account", NodeKind.POOL: "pool", NodeKind.WALLET: "wallet"}
_KINDS = {name: kind for kind, name in _KIND_NAMES.items()}
_WINDOW_WORDS = {
    Window.DAY: "day",
    Window.WEEK: "week",
    Window.MONTH: "month",
    Window.TOTAL: "total",
    Window.MINUTE: "minute",
}

# Failures that mean "Redis is not answering", as opposed to a bug in a script or in this module.
REDIS_OUTAGES: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.ReadOnlyError,
    TimeoutError,
    OSError,
)


def load_script_source(name: str) -> str:
    """Return a script's source with the shared library prepended (one atomic chunk per script)."""
    lua = importlib.resources.files("spendgate.store") / "lua"
    return (lua / "_lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


@functools.lru_cache(maxsize=4096)
def _approval_message(amount_micros: int, currency: str, settled: bool) -> str:
    # Agents repeat the same few amounts: the approval's sentence is formatted once per amount.
    return f"approved: {format_amount(amount_micros, currency)} {'settled' if settled else 'held'}"


def explain(
    decision: Decision,
    deny_reason: DenyReason,
    denied_by: NodeWindow | None,
    hold_state: HoldState,
    *,
    limit: int,
    used: int,
    amount_micros: int,
    currency: str,
) -> str:
    """Say in a sentence why a decision went the way it did."""
    if decision is Decision.APPROVED:
        return _approval_message(amount_micros, currency, hold_state is HoldState.CAPTURED)
    node = denied_by.node_id if denied_by else "?"
    match deny_reason:
        case DenyReason.FROZEN:
            return f"denied: {node} is frozen"
        case DenyReason.SERVICE_NOT_ALLOWED:
            return f"denied: {node} does not allow this service"
        case DenyReason.PER_TRANSACTION_LIMIT:
            return (
                f"denied: {format_amount(amount_micros, currency)} is above the per-transaction limit of "
                f"{node} ({format_amount(limit, currency)})"
            )
        case DenyReason.VELOCITY_LIMIT:
            return f"denied: {node} already approved {used} of its {limit} transactions this minute"
        case _:
            window = _WINDOW_WORDS.get(denied_by.window if denied_by else Window.NONE, "?")
            return (
                f"denied: {format_amount(amount_micros, currency)} would take {node} past its {window} limit "
                f"of {format_amount(limit, currency)} ({format_amount(used, currency)} spent or held)"
            )


_DECISIONS = {str(int(value)): value for value in Decision}
_DENY_REASONS = {str(int(value)): value for value in DenyReason}
_WINDOWS = {str(int(value)): value for value in Window}
_HOLD_STATES = {str(int(value)): value for value in HoldState}


# The fields of authorize.lua's 'OK' reply, before a walked chain's.
_AUTHORIZE_REPLY_LENGTH = 19


def _not_a_wallet(node_id: str, kind: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{node_id!r} is {with_article(kind)}, not a wallet: agents spend from wallets")


def _authorize_result(reply: list[Any], command: AuthorizeCommand) -> AuthorizeResult:
    """The AuthorizeResult of an 'OK' reply of authorize.lua (see the script's header for the fields)."""
    decision = _DECISIONS[reply[1]]
    tight_window = _WINDOWS[reply[7]]
    would_reason = _DENY_REASONS[reply[15]]
    denied = decision is Decision.DENIED
    denied_by = NodeWindow(str(reply[4]), _WINDOWS[reply[5]]) if denied else None
    hold_state = _HOLD_STATES[reply[11]]
    deny_reason = _DENY_REASONS[reply[3]]
    return AuthorizeResult(
        decision=decision,
        authorization_id=str(reply[2]),
        deny_reason=deny_reason,
        denied_by=denied_by,
        remaining=RemainingBudget(str(reply[6]), tight_window, int(reply[8]), int(reply[9]))
        if tight_window is not Window.NONE
        else None,
        hold_expires_at_ms=int(reply[10]),
        hold_state=hold_state,
        captured_micros=int(reply[12]),
        message=explain(
            decision,
            deny_reason,
            denied_by,
            hold_state,
            limit=int(reply[13]),
            used=int(reply[14]),
            amount_micros=command.amount_micros,
            currency=command.currency,
        ),
        would_deny_reason=would_reason,
        would_deny_by=NodeWindow(str(reply[16]), _WINDOWS[reply[17]]) if would_reason is not DenyReason.NONE else None,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _ChainArguments:
    """What authorize.lua is given that is the same on every authorization from one chain, encoded once."""

    holds_and_outbox: Encoded  # KEYS[1], KEYS[2]
    events: Encoded  # KEYS[5]
    nodes: Encoded  # KEYS[7..]: the chain's node hashes
    tail: Encoded  # ARGV[22..]: holds_per_wallet_max, the account's time zone, then the chain's node ids


class ScriptBatcher:
    """Sends concurrent script calls to Redis together: one pipelined round trip carries many decisions.

    A call joins the queue; a drainer sends everything queued as one pipeline (at most ``batch_size_max``
    calls) and hands each caller its reply. While a pipeline is in flight new calls queue up, so under load
    batches grow by themselves and at low load a call goes out at once. At most ``in_flight_max`` pipelines
    are out at a time. Each script is still one atomic EVALSHA; batching changes the transport, not the
    decisions.
    """

    def __init__(self, client: aioredis.Redis, *, batch_size_max: int = 256, in_flight_max: int = 4) -> None:
        self._client = client
        self._batch_size_max = batch_size_max
        self._in_flight_max = in_flight_max
        self._in_flight = 0
        # (script, EVALSHA arguments after the sha: numkeys, keys, args; the caller's future)
        self._queue: list[tuple[Any, list[Any], asyncio.Future[Any]]] = []

    async def call(self, script: Any, keys: Sequence[str | bytes | int], args: Sequence[str | bytes | int]) -> Any:
        """Run one script (an AsyncScript) in the next batch and return its reply."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((script, [len(keys), *keys, *args], future))
        if self._in_flight < self._in_flight_max:
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._drain(), name="redis-batch")
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._batch_size_max]
                del self._queue[: self._batch_size_max]
                await self._send(batch, reload_scripts=True)
        finally:
            self._in_flight -= 1

    async def _send(self, batch: list[tuple[Any, list[Any], asyncio.Future[Any]]], *, reload_scripts: bool) -> None:
        pipe = self._client.pipeline(transaction=False)
        for script, values, _ in batch:
            pipe.execute_command("EVALSHA", script.sha, *values)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except BaseException as error:  # The connection failed: every call in the batch learns it.
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error if isinstance(error, Exception) else ConnectionError(str(error)))
            if not isinstance(error, Exception):
                raise
            return
        retry = []
        for entry, reply in zip(batch, replies, strict=True):
            future = entry[2]
            if isinstance(reply, redis.exceptions.NoScriptError) and reload_scripts:
                retry.append(entry)
            elif future.done():
                continue
            elif isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)
        if retry:
            # Redis lost its script cache (a restart, SCRIPT FLUSH): load and send those calls once more.
            for script in {id(entry[0]): entry[0] for entry in retry}.values():
                await self._client.script_load(script.script)
            await self._send(retry, reload_scripts=False)


class RedisStore:
    """A :class:`~spendgate.store.protocol.SpendStore` over Redis (or fakeredis) and the Lua scripts."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        keys: Keys | None = None,
        timeout_s: float = 0.25,
        hold_ttl_ms: int = 300_000,
        idempotency_ttl_ms: int = 86_400_000,
        retention_ms: int = 86_400_000,
        expire_count_max: int = 10_000,
        alert_percents: tuple[int, ...] = (50, 80, 100),
        events_length_max: int = 10_000,
        on_outage: Callable[[], None] | None = None,
        holds_per_wallet_max: int = 1000,
        batching: bool = True,
        pipe: RedisPipe | None = None,
    ) -> None:
        self._client = client
        self.keys = keys or Keys()
        self._timeout_s = timeout_s
        self._hold_ttl_ms = hold_ttl_ms
        self._idempotency_ttl_ms = idempotency_ttl_ms
        self._retention_ms = retention_ms
        # Releasing expired holds before a decision is what keeps them from blocking it. The bound is large:
        # the sweeper normally leaves nothing for an authorization to release, and a backlog (after a
        # sweeper outage) is paid for once, by the first calls after it.
        self._expire_count_max = expire_count_max
        self._alert_percents = ",".join(str(p) for p in alert_percents)
        self._events_length_max = events_length_max
        self._on_outage = on_outage
        self._holds_per_wallet_max = holds_per_wallet_max
        self._scripts = {name: client.register_script(load_script_source(name)) for name in _SCRIPTS}
        self._batcher = ScriptBatcher(client) if batching else None
        # The hot path's transport where there is one (real Redis over TCP or a Unix socket): it batches by
        # itself, so it replaces the batcher.
        self._pipe = pipe
        # Per chain, the script keys and arguments that are the same on every authorization from it, and the
        # store's settings among authorize.lua's arguments, each run encoded once (see pipe.Encoded).
        self._chain_arguments: dict[Chain, _ChainArguments] = {}
        self._account_arguments: dict[str, tuple[Encoded, Encoded]] = {}
        self._authorize_ttls = self._authorize_bounds = Encoded()
        self._encode_settings()
        # Whether the client is the embedded in-process fakeredis (set by the composition root).
        self.in_process = False

    def _encode_settings(self) -> None:
        self._authorize_ttls = Encoded(self._hold_ttl_ms, self._idempotency_ttl_ms, self._retention_ms)
        self._authorize_bounds = Encoded(self._expire_count_max, self._alert_percents, self._events_length_max)

    @property
    def hold_ttl_ms(self) -> int:
        """How long an uncaptured hold lives, in milliseconds."""
        return self._hold_ttl_ms

    @hold_ttl_ms.setter
    def hold_ttl_ms(self, value: int) -> None:
        self._hold_ttl_ms = value
        self._encode_settings()

    @property
    def events_length_max(self) -> int:
        """The approximate cap of each account's event stream (fixed at construction)."""
        return self._events_length_max

    @property
    def pipe_stats(self) -> PipeStats | None:
        """What the pipe has sent (commands and the writes that carried them), when there is a pipe."""
        return self._pipe.stats if self._pipe is not None else None

    @property
    def client(self) -> aioredis.Redis:
        """The underlying Redis client (for the ledger writer and for tests)."""
        return self._client

    async def _call(self, coroutine: Any, timeout_s: float | None = None) -> Any:
        try:
            async with asyncio.timeout(timeout_s or self._timeout_s):
                return await coroutine
        except REDIS_OUTAGES as error:
            self._outage(error)

    def _outage(self, error: BaseException) -> NoReturn:
        """Raise UnavailableError for a Redis that is not answering (after counting it)."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Python 3.11's asyncio.timeout can turn a cancellation that races its deadline into a
            # TimeoutError; a task being cancelled must stop, not see an outage and carry on.
            raise asyncio.CancelledError from error
        if self._on_outage is not None:
            self._on_outage()
        raise UnavailableError(f"redis is unavailable: {type(error).__name__}: {error}") from error

    async def _run(self, script: str, keys: Sequence[Argument], args: Sequence[Argument]) -> list[Any]:
        """Run a script; keys and arguments may hold :class:`~spendgate.store.pipe.Encoded` runs."""
        if self._pipe is not None:
            try:
                reply = await self._piped(self._pipe, self._scripts[script], keys, args)
            except REDIS_OUTAGES as error:
                self._outage(error)
        elif self._batcher is not None:
            reply = await self._call(self._batcher.call(self._scripts[script], flatten(keys), flatten(args)))
        else:
            reply = await self._call(self._scripts[script](keys=flatten(keys), args=flatten(args)))  # type: ignore[arg-type]
        return list(reply) if isinstance(reply, list) else [reply]

    async def _command(self, *args: str | int) -> Any:
        """One plain command on the hot path's transport (a wallet's first call looks up its account)."""
        if self._pipe is None:
            return await self._call(self._client.execute_command(*args))  # type: ignore[no-untyped-call]
        try:
            return await self._pipe.execute(*args)
        except REDIS_OUTAGES as error:
            self._outage(error)

    @staticmethod
    async def _piped(pipe: RedisPipe, script: Any, keys: Sequence[Argument], args: Sequence[Argument]) -> Any:
        key_count = sum(key.count if isinstance(key, Encoded) else 1 for key in keys)
        command = encode_command(["EVALSHA", script.sha, key_count, *keys, *args])
        try:
            return await pipe.send(command)
        except redis.exceptions.NoScriptError:
            # Redis lost its script cache (a restart, SCRIPT FLUSH): load the script and run it once more.
            await pipe.execute("SCRIPT", "LOAD", script.script)
            return await pipe.send(command)

    # ------------------------------------------------------------------------------------------------
    # Lookups.

    async def account_of(self, node_id: str) -> str:
        """Return the account a node belongs to."""
        account = await self._command("GET", self.keys.node_index(node_id))
        if account is None:
            raise NotFoundError(f"no node {node_id!r}: check the id, or apply a plan that defines it")
        return str(account)

    async def account_info(self, account_id: str) -> AccountInfo:
        """Return an account's currency and time zone."""
        currency, time_zone = await self._command("HMGET", self.keys.node(account_id, account_id), "cur", "tz")
        if currency is None:
            raise NotFoundError(f"no account {account_id!r}")
        return AccountInfo(account_id=account_id, currency=str(currency), time_zone=str(time_zone))

    async def resolve_wallet(self, wallet_id: str) -> Chain:
        """Return a wallet's chain up to its account."""
        try:
            account_id = await self.account_of(wallet_id)
        except NotFoundError:
            raise NotFoundError(f"no wallet {wallet_id!r}: check the id, or apply a plan that defines it") from None
        reply = await self._run("resolve", [self.keys.node(account_id, wallet_id)], [])
        if reply[0] == "ERR":
            if reply[1] == "NOT_A_WALLET":
                raise _not_a_wallet(wallet_id, str(reply[2]))
            raise NotFoundError(f"no wallet {wallet_id!r}")
        count = int(reply[4])
        node_ids = tuple(str(reply[5 + 2 * i]) for i in range(count))
        return Chain(
            account_id=account_id,
            node_ids=node_ids,
            topo=str(reply[1]),
            currency=str(reply[2]),
            time_zone=str(reply[3]),
        )

    async def node_ids(self, account_id: str) -> list[str]:
        """Return the ids of an account's nodes (every kind), in no order."""
        return [str(node_id) for node_id in await self._call(self._client.smembers(self.keys.nodes(account_id)))]

    async def account_ids(self) -> list[str]:
        """Return every account id."""
        return sorted(str(a) for a in await self._call(self._client.smembers(self.keys.accounts())))

    async def ping(self) -> None:
        """Raise ``UnavailableError`` if Redis does not answer."""
        await self._call(self._client.ping())

    async def close(self) -> None:
        """Close the connection pool (and the pipe)."""
        if self._pipe is not None:
            await self._pipe.close()
        await self._client.aclose()

    # ------------------------------------------------------------------------------------------------
    # Money.

    async def authorize(
        self,
        chain: Chain,
        command: AuthorizeCommand,
        *,
        authorization_id: str,
        fingerprint: str,
        windows: WindowIds,
        now_ms: int,
        token_mode: str = "",
    ) -> AuthorizeOutcome:
        """Decide and apply one authorization in one script call.

        The script walks a chain that is unresolved or out of date itself (see authorize.lua's step 1), then
        checks the caller's token, before anything is written.
        """
        account = chain.account_id
        fixed = self._chain_arguments.get(chain)
        if fixed is None:
            fixed = self._chain_arguments_of(chain)
        # The order is authorize.lua's KEYS and ARGV (see its header).
        args: list[Argument] = [
            now_ms,
            chain.topo,
            command.amount_micros,
            command.currency,
            command.service,
            "1" if command.capture else "0",
            fingerprint,
            self._authorize_ttls,
            authorization_id,
            windows.day,
            windows.week,
            windows.month,
            windows.minute,
            json.dumps(dict(command.metadata), sort_keys=True, separators=(",", ":")) if command.metadata else "{}",
            command.idempotency_key,
            self._authorize_bounds,
            token_mode,
            fixed.tail,
        ]
        reply = await self._run(
            "authorize",
            [
                fixed.holds_and_outbox,
                self.keys.idempotency(account, chain.wallet_id, command.idempotency_key),
                self.keys.hold(account, authorization_id),
                fixed.events,
                self._token_key(account, token_mode),
                fixed.nodes,
            ],
            args,
        )
        if reply[0] == "ERR":
            code, detail = reply[1], reply[2]
            await self._raise_token_error(str(code), str(detail), token_mode)
            if code == "NOT_FOUND":
                raise NotFoundError(f"no wallet {chain.wallet_id!r} in account {account!r}")
            if code == "NOT_A_WALLET":
                raise _not_a_wallet(chain.wallet_id, str(detail))
            if code == "STALE_CHAIN":
                raise StaleChainError(detail)
            if code == "IDEMPOTENCY_CONFLICT":
                raise AlreadyExistsError(
                    f"idempotency_key {command.idempotency_key!r} was already used for a different request on "
                    f"wallet {chain.wallet_id!r}; use a new key for a new request"
                )
            if code == "HOLDS_EXHAUSTED":
                raise ResourceExhaustedError(
                    f"wallet {chain.wallet_id!r} already has {detail} open holds, the most allowed: capture or void "
                    "some first"
                )
            if code == "CURRENCY_MISMATCH":
                raise InvalidArgumentError(
                    f"currency {command.currency!r} is not the currency of account {account!r} ({detail})"
                )
            raise RuntimeError(f"authorize.lua answered an unknown error {code!r}")
        walked = None
        if len(reply) > _AUTHORIZE_REPLY_LENGTH:
            # The chain the script walked: topo, currency, then the node ids.
            walked = Chain(
                account_id=account,
                node_ids=tuple(str(node_id) for node_id in reply[_AUTHORIZE_REPLY_LENGTH + 2 :]),
                topo=str(reply[_AUTHORIZE_REPLY_LENGTH]),
                currency=str(reply[_AUTHORIZE_REPLY_LENGTH + 1]),
                time_zone=chain.time_zone,
            )
        return AuthorizeOutcome(_authorize_result(reply, command), reply[18] == "1", walked)

    def _chain_arguments_of(self, chain: Chain) -> _ChainArguments:
        account = chain.account_id
        shared = self._account_arguments.get(account)
        if shared is None:
            shared = Encoded(self.keys.holds(account), self.keys.outbox(account)), Encoded(self.keys.events(account))
            self._account_arguments[account] = shared
        fixed = _ChainArguments(
            holds_and_outbox=shared[0],
            events=shared[1],
            nodes=Encoded(*(self.keys.node(account, node_id) for node_id in chain.node_ids)),
            tail=Encoded(self._holds_per_wallet_max, chain.time_zone, *chain.node_ids),
        )
        if not chain.resolved:
            # Used once: the first call's reply carries the chain that later calls use.
            return fixed
        if len(self._chain_arguments) >= CHAIN_ARGUMENTS_CACHED_MAX:
            self._chain_arguments.clear()
            self._account_arguments.clear()
        self._chain_arguments[chain] = fixed
        return fixed

    async def capture(
        self,
        account_id: str,
        authorization_id: str,
        amount_micros: int,
        idempotency_key: str,
        now_ms: int,
        token_mode: str = "",
    ) -> CaptureResult:
        """Settle a hold fully or partially; the rest is released."""
        keys = [
            self.keys.holds(account_id),
            self.keys.outbox(account_id),
            self.keys.hold(account_id, authorization_id),
            self.keys.events(account_id),
            self._token_key(account_id, token_mode),
        ]
        args: list[str | int] = [
            now_ms,
            amount_micros,
            idempotency_key,
            self._retention_ms,
            authorization_id,
            self.events_length_max,
            token_mode,
        ]
        reply = await self._run("capture", keys, args)
        if reply[0] == "ERR":
            await self._raise_token_error(str(reply[1]), str(reply[2]), token_mode)
            raise _hold_error("capture", authorization_id, str(reply[1]), str(reply[2]), amount_micros)
        return CaptureResult(
            authorization_id=authorization_id, captured_micros=int(reply[1]), released_micros=int(reply[2])
        )

    async def void(self, account_id: str, authorization_id: str, now_ms: int, token_mode: str = "") -> VoidResult:
        """Release a hold."""
        keys = [
            self.keys.holds(account_id),
            self.keys.hold(account_id, authorization_id),
            self.keys.events(account_id),
            self._token_key(account_id, token_mode),
        ]
        args: list[str | int] = [now_ms, self._retention_ms, authorization_id, self.events_length_max, token_mode]
        reply = await self._run("void", keys, args)
        if reply[0] == "ERR":
            await self._raise_token_error(str(reply[1]), str(reply[2]), token_mode)
            raise _hold_error("void", authorization_id, str(reply[1]), str(reply[2]), 0)
        return VoidResult(authorization_id=authorization_id, released_micros=int(reply[1]))

    def _token_key(self, account_id: str, token_mode: str) -> str:
        # With auth off or the root token there is nothing to look up; the key is a placeholder in the slot.
        return self.keys.token(account_id, token_mode if token_mode not in ("", "*") else "-")

    async def _raise_token_error(self, code: str, detail: str, token_mode: str) -> None:
        if code == "PERMISSION_DENIED":
            raise PermissionDeniedError(f"permission denied: {detail}")
        if code == "UNAUTHENTICATED":
            # The token is not in this account's slot: it is unknown or revoked, or it belongs elsewhere.
            if await self.lookup_token(token_mode) is not None:
                raise PermissionDeniedError("permission denied: this token belongs to another account")
            raise UnauthenticatedError("unknown or revoked token: send 'authorization: Bearer <token>'")

    # ------------------------------------------------------------------------------------------------
    # Tokens. Only SHA-256 hashes of the secrets are stored; each token has a deployment-wide record (to find
    # its role and scope) and a copy in its account's slot (which the scripts check atomically).

    async def create_token(self, record: TokenRecord) -> None:
        """Store a token's record under its hash."""
        fields: dict[Any, Any] = {
            "id": record.token_id,
            "role": record.role,
            "scope": record.scope_node_id,
            "account": record.account_id,
            "name": record.name,
            "created": str(record.created_at_ms),
        }
        scoped: dict[Any, Any] = {"role": record.role, "scope": record.scope_node_id}
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(self.keys.token_index(record.token_hash), mapping=fields)
        pipe.hset(
            self.keys.token(record.account_id, record.token_hash),
            mapping=scoped,
        )
        pipe.sadd(self.keys.tokens(), record.token_hash)
        await self._call(pipe.execute())

    async def lookup_token(self, token_hash: str) -> TokenRecord | None:
        """Return a token's record, or ``None`` for an unknown or revoked token."""
        if token_hash in ("", "*"):
            return None
        values = await self._call(self._client.hgetall(self.keys.token_index(token_hash)))
        if not values:
            return None
        return TokenRecord(
            token_hash=token_hash,
            token_id=values["id"],
            role=values["role"],
            scope_node_id=values["scope"],
            account_id=values["account"],
            name=values["name"],
            created_at_ms=int(values["created"]),
        )

    async def list_tokens(self) -> list[TokenRecord]:
        """Every token's record (without secrets)."""
        hashes = sorted(str(h) for h in await self._call(self._client.smembers(self.keys.tokens())))
        records = [await self.lookup_token(token_hash) for token_hash in hashes]
        return [record for record in records if record is not None]

    async def revoke_token(self, record: TokenRecord) -> None:
        """Delete a token everywhere; the next call with it fails on every replica."""
        # The account copy goes first: it is the one the hot path checks.
        await self._call(self._client.delete(self.keys.token(record.account_id, record.token_hash)))
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(self.keys.token_index(record.token_hash))
        pipe.srem(self.keys.tokens(), record.token_hash)
        await self._call(pipe.execute())

    async def expire_holds(self, account_id: str, now_ms: int) -> int:
        """Release one batch of an account's expired holds."""
        reply = await self._run(
            "expire", [self.keys.holds(account_id)], [now_ms, self._expire_count_max, self._retention_ms]
        )
        return int(reply[0])

    async def budget(self, account_id: str, node_id: str, windows: WindowIds, now_ms: int) -> NodeBudget:
        """Return a node's budget in the windows open at ``now_ms``."""
        keys = [
            self.keys.node(account_id, node_id),
            self.keys.node(account_id, account_id),
            self.keys.holds(account_id),
        ]
        args: list[str | int] = [
            now_ms,
            windows.day,
            windows.week,
            windows.month,
            windows.minute,
            self._expire_count_max,
            self._retention_ms,
        ]
        reply = await self._run("budget", keys, args)
        if reply[0] == "ERR":
            raise NotFoundError(f"no node {node_id!r}")
        ids = {
            Window.DAY: str(reply[10]),
            Window.WEEK: str(reply[11]),
            Window.MONTH: str(reply[12]),
            Window.TOTAL: "all",
        }
        window_budgets = []
        for index, window in enumerate((Window.DAY, Window.WEEK, Window.MONTH, Window.TOTAL)):
            limit, spent, held = reply[13 + 3 * index : 16 + 3 * index]
            window_budgets.append(
                WindowBudget(
                    window=window,
                    window_id=ids[window],
                    limit_micros=int(limit) if limit != "" else None,
                    spent_micros=int(spent),
                    held_micros=int(held),
                    ends_at_ms=windows.ends_at_ms(window) if ids[window] == windows.id_of(window) else 0,
                )
            )
        return NodeBudget(
            node_id=node_id,
            kind=_KINDS[str(reply[1])],
            parent_id=str(reply[2]) or None,
            account_id=account_id,
            currency=str(reply[8]),
            time_zone=str(reply[9]),
            frozen_reason=str(reply[3]),
            per_transaction_micros=int(reply[5]) if reply[5] != "" else None,
            velocity_per_minute=int(reply[6]) if reply[6] != "" else None,
            velocity_used=int(reply[7] or 0),
            allowed_services=tuple(str(reply[4]).split("\n")) if reply[4] != "" else (),
            windows=tuple(window_budgets),
        )

    # ------------------------------------------------------------------------------------------------
    # Configuration.

    async def put_plan(
        self,
        plan: AccountPlan,
        *,
        nodes: Sequence[NodeSpec] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Create or reconfigure nodes of a plan (all of them by default; parents first), keeping counters.

        Ownership of every id is checked before anything changes; then the nodes are written in pipelined
        batches of ``PUT_BATCH_SIZE`` script calls, in order, so a parent always exists before its children.
        ``progress`` is called with the number of nodes written after each batch.
        """
        account = plan.account_id
        todo = list(plan.nodes if nodes is None else nodes)
        for start in range(0, len(todo), PUT_BATCH_SIZE):
            batch = todo[start : start + PUT_BATCH_SIZE]
            owners = await self._call(self._client.mget([self.keys.node_index(n.node_id) for n in batch]))
            for node, owner in zip(batch, owners, strict=True):
                if owner is not None and owner != account:
                    raise InvalidArgumentError(
                        f"node id {node.node_id!r} already belongs to account {owner!r}; ids are unique "
                        "across the deployment"
                    )
        done = 0
        for start in range(0, len(todo), PUT_BATCH_SIZE):
            batch = todo[start : start + PUT_BATCH_SIZE]
            pipe = self._client.pipeline(transaction=False)
            for node in batch:
                parent_key = self.keys.node(account, node.parent_id) if node.parent_id else ""
                keys = [
                    self.keys.node(account, node.node_id),
                    self.keys.node(account, account),
                    self.keys.node_index(node.node_id),
                    self.keys.accounts(),
                    parent_key,
                    self.keys.nodes(account),
                ]
                await self._scripts["put_node"](
                    keys=keys, args=[account, *_node_fields(node, plan, parent_key)], client=pipe
                )
            replies = await self._call(pipe.execute(), timeout_s=BULK_TIMEOUT_S)
            for node, reply in zip(batch, replies, strict=True):
                if reply[0] == "ERR":
                    raise InvalidArgumentError(
                        f"node {node.node_id!r} names a parent {node.parent_id!r} that does not exist"
                    )
            done += len(batch)
            if progress is not None:
                progress(done)

    async def read_plan(self, account_id: str) -> AccountPlan | None:
        """Return an account's tree as it is configured now (parents first), or ``None`` if there is none."""
        info = await self._call(self._client.hmget(self.keys.node(account_id, account_id), ["cur", "tz"]))
        if info[0] is None:
            return None
        node_ids = sorted(await self.node_ids(account_id))
        specs: dict[str, NodeSpec] = {}
        for start in range(0, len(node_ids), PUT_BATCH_SIZE):
            batch = node_ids[start : start + PUT_BATCH_SIZE]
            pipe = self._client.pipeline(transaction=False)
            for node_id in batch:
                pipe.hmget(self.keys.node(account_id, node_id), list(_CONFIG_FIELDS))
            for node_id, values in zip(batch, await self._call(pipe.execute(), timeout_s=BULK_TIMEOUT_S), strict=True):
                if values[0] is not None:
                    specs[node_id] = _node_spec(node_id, dict(zip(_CONFIG_FIELDS, values, strict=True)))
        ordered: list[NodeSpec] = []
        children: dict[str | None, list[NodeSpec]] = {}
        for spec in specs.values():
            children.setdefault(spec.parent_id, []).append(spec)
        stack = [s for s in children.get(None, [])]
        while stack:
            spec = stack.pop()
            ordered.append(spec)
            stack.extend(reversed(children.get(spec.node_id, [])))
        return AccountPlan(account_id=account_id, currency=str(info[0]), time_zone=str(info[1]), nodes=tuple(ordered))

    async def delete_node(self, account_id: str, node_id: str, *, force: bool, windows: WindowIds) -> None:
        """Remove one node whose children are already gone; refuse if it carries money, unless forced."""
        keys = [
            self.keys.node(account_id, node_id),
            self.keys.node(account_id, account_id),
            self.keys.node_index(node_id),
            self.keys.nodes(account_id),
        ]
        reply = await self._run(
            "delete_node", keys, [node_id, "1" if force else "0", windows.day, windows.week, windows.month]
        )
        if reply[0] == "ERR":
            if reply[1] == "UNSAFE":
                raise FailedPreconditionError(f"{node_id} {reply[2]}; pass force to remove it anyway")
            raise NotFoundError(f"no node {node_id!r}")

    async def node_activity(self, account_id: str, node_id: str, windows: WindowIds) -> tuple[int, int]:
        """Return (held, spent in open day/week/month windows) of a node, in micro-units."""
        keys = [self.keys.node(account_id, node_id), self.keys.node(account_id, account_id)]
        reply = await self._run("node_activity", keys, [windows.day, windows.week, windows.month])
        if reply[0] == "ERR":
            raise NotFoundError(f"no node {node_id!r}")
        return int(reply[1]), int(reply[2])

    async def freeze(
        self, account_id: str, node_id: str, reason: str, *, void_holds: bool, now_ms: int
    ) -> tuple[bool, int, int]:
        """Freeze (non-empty reason) or unfreeze (empty reason) a node.

        Returns whether it was frozen before, how many holds were voided and the money they released.
        """
        keys = [self.keys.node(account_id, node_id), self.keys.holds(account_id), self.keys.events(account_id)]
        args: list[str | int] = [
            node_id,
            reason,
            "1" if void_holds else "0",
            now_ms,
            self._retention_ms,
            self.events_length_max,
        ]
        reply = await self._call(self._scripts["freeze"](keys=keys, args=args), timeout_s=BULK_TIMEOUT_S)
        if reply[0] == "ERR":
            raise NotFoundError(f"no node {node_id!r}")
        return reply[1] == "1", int(reply[2]), int(reply[3])

    async def append_events(self, account_id: str, events: Sequence[dict[str, str]]) -> None:
        """Append events (for example configuration changes) to an account's live feed, in one pipeline."""
        pipe = self._client.pipeline(transaction=False)
        for fields in events:
            pipe.xadd(
                self.keys.events(account_id), dict[Any, Any](fields), maxlen=self.events_length_max, approximate=True
            )
        await self._call(pipe.execute(), timeout_s=BULK_TIMEOUT_S)

    async def read_events(self, last_ids: dict[str, str], count_max: int) -> list[tuple[str, str, dict[str, str]]]:
        """Return up to ``count_max`` events per account after the given stream ids (account -> last id).

        Returns (account id, event id, fields) in stream order per account.
        """
        if not last_ids:
            return []
        streams: dict[Any, Any] = {self.keys.events(account): last for account, last in last_ids.items()}
        accounts = {self.keys.events(account): account for account in last_ids}
        reply = await self._call(self._client.xread(streams, count=count_max))
        events = []
        for stream, entries in reply or []:
            for event_id, fields in entries:
                events.append((accounts[str(stream)], str(event_id), {str(k): str(v) for k, v in fields.items()}))
        return events

    async def restore_counters(
        self, account_id: str, windows: Mapping[Window, str], spent: Mapping[str, Mapping[Window, int]]
    ) -> int:
        """Set every node's spent counters in ``windows`` (and recount held money from the open holds)."""
        node_ids = sorted(spent)
        keys = [self.keys.holds(account_id), *(self.keys.node(account_id, node_id) for node_id in node_ids)]
        args: list[str | int] = [windows[Window.DAY], windows[Window.WEEK], windows[Window.MONTH]]
        for node_id in node_ids:
            args += [spent[node_id].get(window, 0) for window in (Window.DAY, Window.WEEK, Window.MONTH, Window.TOTAL)]
        reply = await self._call(self._scripts["restore_counters"](keys=keys, args=args), timeout_s=BULK_TIMEOUT_S)
        return int(reply)

    async def backlog(self, account_id: str) -> Backlog:
        """Return an account's open holds and ledger outbox backlog (the writer trims what it committed)."""
        pipe = self._client.pipeline(transaction=False)
        pipe.zcard(self.keys.holds(account_id))
        pipe.xlen(self.keys.outbox(account_id))
        pipe.xrange(self.keys.outbox(account_id), count=1)
        holds, length, first = await self._call(pipe.execute())
        oldest_ms = int(str(first[0][0]).split("-")[0]) if first else 0
        # Stream ids carry Redis's wall clock, so the outbox's age is measured against the wall clock too.
        age_ms = max(0, time.time_ns() // 1_000_000 - oldest_ms) if first else 0
        return Backlog(holds=int(holds), outbox_entries=int(length), outbox_oldest_age_ms=age_ms)

    async def last_event_id(self, account_id: str) -> str:
        """Return the id of the newest event of an account ('0-0' when there is none)."""
        entries = await self._call(self._client.xrevrange(self.keys.events(account_id), count=1))
        return str(entries[0][0]) if entries else "0-0"


def _node_fields(node: NodeSpec, plan: AccountPlan, parent_key: str) -> list[str]:
    """Return the configuration fields of a node's hash (see _lib.lua for their meaning)."""
    limits = node.limits
    fields = ["id", node.node_id, "kind", _KIND_NAMES[node.kind]]
    if node.frozen_reason:
        fields += ["frz", node.frozen_reason]
    if node.parent_id:
        fields += ["parent", node.parent_id, "pkey", parent_key]
    for name, value in (
        ("ptx", limits.per_transaction_micros),
        ("l:d", limits.day_micros),
        ("l:w", limits.week_micros),
        ("l:m", limits.month_micros),
        ("l:t", limits.total_micros),
        ("vel", limits.velocity_per_minute),
    ):
        if value is not None:
            fields += [name, str(value)]
    if limits.allowed_services:
        fields += ["svc", "\n".join(limits.allowed_services)]
    if node.shadow:
        fields += ["shd", "1"]
    if node.breaker is not None:
        fields += ["brk", node.breaker.encode()]
    if node.kind is NodeKind.ACCOUNT:
        fields += ["cur", plan.currency, "tz", plan.time_zone]
    return fields


def _hold_error(action: str, authorization_id: str, code: str, detail: str, amount_micros: int) -> Exception:
    match code:
        case "NOT_FOUND":
            return NotFoundError(f"no authorization {authorization_id!r} (unknown, or resolved over a day ago)")
        case "ALREADY_CAPTURED" if action == "capture":
            return FailedPreconditionError(
                f"cannot capture {authorization_id}: it was already captured ({detail} micros) by another "
                "request; a hold is captured or voided once"
            )
        case "ALREADY_CAPTURED":
            return FailedPreconditionError(f"cannot void {authorization_id}: it was already captured")
        case "VOIDED":
            return FailedPreconditionError(f"cannot {action} {authorization_id}: it was voided")
        case "EXPIRED":
            return FailedPreconditionError(
                f"cannot {action} {authorization_id}: its hold expired and the money was released; authorize again"
            )
        case "ABOVE_HOLD":
            return InvalidArgumentError(
                f"cannot capture {amount_micros} micros on {authorization_id}: only {detail} micros are held"
            )
    return RuntimeError(f"{action}.lua answered an unknown error {code!r}")


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _node_spec(node_id: str, config: dict[str, str | None]) -> NodeSpec:
    """Rebuild a node's declared configuration from its hash fields (the inverse of _node_fields)."""
    breaker = None
    if config["brk"]:
        multiplier, recent, trailing, min_spend = str(config["brk"]).split(",")
        breaker = Breaker(float(multiplier), int(recent), int(trailing), int(min_spend))
    services = str(config["svc"] or "")
    return NodeSpec(
        node_id=node_id,
        kind=_KINDS[str(config["kind"])],
        parent_id=config["parent"] or None,
        limits=Limits(
            per_transaction_micros=_int_or_none(config["ptx"]),
            day_micros=_int_or_none(config["l:d"]),
            week_micros=_int_or_none(config["l:w"]),
            month_micros=_int_or_none(config["l:m"]),
            total_micros=_int_or_none(config["l:t"]),
            velocity_per_minute=_int_or_none(config["vel"]),
            allowed_services=tuple(services.split("\n")) if services else (),
        ),
        frozen_reason=str(config["frz"] or ""),
        shadow=config["shd"] == "1",
        breaker=breaker,
    )
