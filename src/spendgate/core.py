"""The core: validates requests, finds chains and windows, and hands each decision to the store's scripts.

It holds no limit logic of its own (that lives in the Lua scripts) and no driver (it is handed a
:class:`~spendgate.store.protocol.SpendStore`) and never reads the time itself (it is handed a clock).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from spendgate.clock import Clock
from spendgate.domain import (
    AccountPlan,
    AuthorizeCommand,
    AuthorizeResult,
    CaptureResult,
    InvalidArgumentError,
    NodeBudget,
    NotFoundError,
    UnavailableError,
    VoidResult,
    check_amount,
    check_currency,
    check_id,
    check_idempotency_key,
    check_metadata,
    check_service,
)
from spendgate.store.protocol import AccountInfo, Chain, SpendStore, StaleChainError, unresolved_chain
from spendgate.windows import windows_at

_AUTHORIZATION_TOKEN = re.compile(r"^[0-9a-f]{32}$")
AUTHORIZATION_ID_LENGTH_MAX = 64 + 1 + 32
# How many accounts SpendCore.load_account_hints reads concurrently.
ACCOUNTS_LOADED_AT_ONCE = 64


class _RandomTokens:
    """128-bit random tokens as 32 hex digits, read from the OS's CSPRNG 256 at a time.

    One ``os.urandom`` call per token is a system call per decision; a buffer makes it one per 256. A lock
    keeps two threads from taking the same token; the buffer is dropped in a forked child, which must never
    hand out the tokens its parent will.
    """

    _BATCH = 256

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._drop)

    def _drop(self) -> None:
        self._hex, self._at = "", 0
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            at = self._at
            if at >= len(self._hex):
                self._hex, at = os.urandom(16 * self._BATCH).hex(), 0
            self._at = at + 32
            return self._hex[at : at + 32]


_tokens = _RandomTokens()


def new_authorization_id(account_id: str) -> str:
    """Return a fresh authorization id; it names its account so a capture needs no lookup."""
    # 128 random bits as 32 hex digits, like uuid4().hex (without building a UUID object per decision).
    return f"{account_id}:{_tokens.next()}"


def parse_authorization_id(authorization_id: str) -> str:
    """Return the account id inside an authorization id, or raise :class:`InvalidArgumentError`."""
    if not authorization_id:
        raise InvalidArgumentError("authorization_id is required: pass the id Authorize returned")
    account_id, _, token = authorization_id.rpartition(":")
    if (
        len(authorization_id) > AUTHORIZATION_ID_LENGTH_MAX
        or not account_id
        or not _AUTHORIZATION_TOKEN.fullmatch(token)
    ):
        raise InvalidArgumentError(
            f"authorization_id {authorization_id[:100]!r} is malformed: pass the id Authorize returned"
        )
    check_id(account_id, "the account in authorization_id")
    return account_id


# JSON's own string quoting (the C function json.dumps uses with its default ensure_ascii).
_quote = json.encoder.encode_basestring_ascii


def fingerprint(command: AuthorizeCommand) -> str:
    """Return a digest of everything that makes two authorization requests the same request.

    The digest is of ``json.dumps([wallet_id, amount_micros, currency, service, capture, sorted metadata
    items], separators=(",", ":"))``; it is kept in idempotency records, so it must never change. The list is
    written out here with json's own quoting, which is the same text at a fraction of the cost per decision
    (a test holds the two equal).
    """
    metadata = json.dumps(sorted(command.metadata.items()), separators=(",", ":")) if command.metadata else "[]"
    canonical = (
        f"[{_quote(command.wallet_id)},{int(command.amount_micros)},{_quote(command.currency)},"
        f"{_quote(command.service)},{'true' if command.capture else 'false'},{metadata}]"
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class SpendCore:
    """Authorize, capture, void and report budgets over a store."""

    def __init__(
        self,
        store: SpendStore,
        clock: Clock,
        *,
        chain_cache_size_max: int = 100_000,
        account_hints_size_max: int = 1_000_000,
        stale_retries_max: int = 3,
    ) -> None:
        self.store = store
        self.clock = clock
        # Each wallet's chain as the last decision on it walked it. authorize.lua checks it against the
        # account's tree version, and walks the chain again itself when the tree changed.
        self._chains: dict[str, Chain] = {}
        # The account each node is in, as far as this server knows: loaded at start (load_account_hints) and
        # by plans applied here, else looked up on a wallet's first call. Only a hint: a wallet missing from
        # its hinted account is looked up again.
        self._account_hints: dict[str, str] = {}
        self._accounts: dict[str, AccountInfo] = {}
        # Lookups under way: a burst of first calls waits for one (kind and id -> its future).
        self._lookups: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self._chain_cache_size_max = chain_cache_size_max
        self._account_hints_size_max = account_hints_size_max
        self._stale_retries_max = stale_retries_max

    async def load_account_hints(self) -> int:
        """Learn every account's time zone and which account each node is in; return how many nodes.

        With them a wallet's first call here is one round trip, the decision's, which walks the chain.
        Without them it looks up the wallet's account first (and the account's time zone, once per account).
        At most ``account_hints_size_max`` nodes are learnt.
        """
        account_ids = await self.store.account_ids()
        # Accounts are read a batch at a time, concurrently: their calls share round trips.
        for start in range(0, len(account_ids), ACCOUNTS_LOADED_AT_ONCE):
            batch = account_ids[start : start + ACCOUNTS_LOADED_AT_ONCE]
            for account_id, nodes in zip(
                batch, await asyncio.gather(*(self._account_nodes(account_id) for account_id in batch)), strict=True
            ):
                if nodes is None:
                    continue  # Deleted since it was listed.
                self._accounts[account_id] = nodes[0]
                for node_id in nodes[1]:
                    if not self._hint(node_id, account_id):
                        return len(self._account_hints)
        return len(self._account_hints)

    async def _account_nodes(self, account_id: str) -> tuple[AccountInfo, list[str]] | None:
        try:
            info = await self.store.account_info(account_id)
        except NotFoundError:
            return None
        return info, await self.store.node_ids(account_id)

    def _hint(self, node_id: str, account_id: str) -> bool:
        if len(self._account_hints) >= self._account_hints_size_max and node_id not in self._account_hints:
            return False
        self._account_hints[node_id] = account_id
        return True

    async def _chain(self, wallet_id: str) -> Chain:
        """The wallet's cached chain; else an unresolved one, which the decision walks."""
        chain = self._chains.get(wallet_id)
        if chain is not None:
            return chain
        account_id = self._account_hints.get(wallet_id)
        if account_id is None:
            account_id = await self._look_up_account(wallet_id)
        return unresolved_chain(await self._account_info(account_id), wallet_id)

    async def _account_info(self, account_id: str) -> AccountInfo:
        info = self._accounts.get(account_id)
        if info is None:
            info = self._accounts[account_id] = await self._once(
                ("account", account_id), lambda: self.store.account_info(account_id)
            )
        return info

    async def _look_up_account(self, wallet_id: str) -> str:
        try:
            account_id: str = await self._once(("wallet", wallet_id), lambda: self.store.account_of(wallet_id))
        except NotFoundError:
            raise NotFoundError(f"no wallet {wallet_id!r}: check the id, or apply a plan that defines it") from None
        self._hint(wallet_id, account_id)
        return account_id

    async def _once(self, key: tuple[str, str], look_up: Callable[[], Awaitable[Any]]) -> Any:
        """Run a lookup, or wait for the same one already under way."""
        pending = self._lookups.get(key)
        if pending is None:
            pending = asyncio.ensure_future(look_up())
            self._lookups[key] = pending
            pending.add_done_callback(lambda _: self._lookups.pop(key, None))
        return await asyncio.shield(pending)

    def _cache(self, chain: Chain) -> None:
        if len(self._chains) >= self._chain_cache_size_max:
            # A bound, not an LRU: a dropped chain costs its wallet's next decision a walk inside its round trip
            # (and a lookup first, for a wallet the hints lack).
            self._chains.clear()
        self._chains[chain.wallet_id] = chain

    async def authorize(self, command: AuthorizeCommand, *, token_mode: str = "") -> AuthorizeResult:
        """Validate, then decide in one script call; denials are results, bad input raises.

        ``token_mode`` is the caller's credential as :mod:`spendgate.api.auth` resolved it: ``""`` with auth
        off, ``"*"`` for the root token, else the hash of the caller's token, which the script checks.
        """
        result, _ = await self.authorize_with_replay(command, token_mode=token_mode)
        return result

    async def authorize_with_replay(
        self, command: AuthorizeCommand, *, token_mode: str = ""
    ) -> tuple[AuthorizeResult, bool]:
        """Like :meth:`authorize`, also saying whether the answer was a replay of an earlier request."""
        check_id(command.wallet_id, "wallet_id")
        check_amount(command.amount_micros)
        check_currency(command.currency)
        check_idempotency_key(command.idempotency_key)
        check_service(command.service)
        check_metadata(command.metadata)
        digest = fingerprint(command)
        wallet_id = command.wallet_id
        for _ in range(self._stale_retries_max):
            chain = await self._chain(wallet_id)
            now_ms = self.clock.now_ms()
            try:
                outcome = await self.store.authorize(
                    chain,
                    command,
                    authorization_id=new_authorization_id(chain.account_id),
                    fingerprint=digest,
                    windows=windows_at(now_ms, chain.time_zone),
                    now_ms=now_ms,
                    token_mode=token_mode,
                )
            except StaleChainError:
                # The account's time zone is not the one this server named the windows in.
                self._chains.pop(wallet_id, None)
                self._accounts.pop(chain.account_id, None)
                continue
            except NotFoundError:
                # The wallet is not in the account this server took it to be in: ask the index where it is.
                self._chains.pop(wallet_id, None)
                self._account_hints.pop(wallet_id, None)
                if await self._look_up_account(wallet_id) == chain.account_id:
                    raise NotFoundError(f"no wallet {wallet_id!r}") from None
                continue
            if outcome.chain is not None:
                self._cache(outcome.chain)
            return outcome.result, outcome.replayed
        raise UnavailableError(f"the tree of wallet {wallet_id!r} kept changing; retry")

    async def capture(
        self, authorization_id: str, amount_micros: int, idempotency_key: str, *, token_mode: str = ""
    ) -> CaptureResult:
        """Settle a hold fully or partially."""
        account_id = parse_authorization_id(authorization_id)
        check_amount(amount_micros)
        check_idempotency_key(idempotency_key)
        return await self.store.capture(
            account_id, authorization_id, amount_micros, idempotency_key, self.clock.now_ms(), token_mode
        )

    async def void(self, authorization_id: str, *, token_mode: str = "") -> VoidResult:
        """Release a hold."""
        account_id = parse_authorization_id(authorization_id)
        return await self.store.void(account_id, authorization_id, self.clock.now_ms(), token_mode)

    async def get_budget(self, node_id: str) -> NodeBudget:
        """Report a node's budget in the windows open now."""
        check_id(node_id, "node_id")
        account_id = self._account_hints.get(node_id)
        info = self._accounts.get(account_id) if account_id is not None else None
        if info is not None:
            # One round trip where the node's account is known (the metrics collector reads many budgets).
            now_ms = self.clock.now_ms()
            try:
                budget = await self.store.budget(info.account_id, node_id, windows_at(now_ms, info.time_zone), now_ms)
            except NotFoundError:
                budget = None  # Not in that account (any more).
            if budget is None:
                self._account_hints.pop(node_id, None)
            elif budget.time_zone == info.time_zone:
                return budget
            else:
                self._accounts.pop(info.account_id, None)
        account_id = await self.store.account_of(node_id)
        info = await self._account_info(account_id)
        self._hint(node_id, account_id)
        now_ms = self.clock.now_ms()
        return await self.store.budget(account_id, node_id, windows_at(now_ms, info.time_zone), now_ms)

    async def sweep(self) -> int:
        """Release every expired hold of every account; return how many were released."""
        released = 0
        for account_id in await self.store.account_ids():
            # Bounded batches; an account with a backlog is revisited on the next sweep.
            released += await self.store.expire_holds(account_id, self.clock.now_ms())
        return released

    async def apply_plan(self, plan: AccountPlan) -> None:
        """Create or reconfigure an account's nodes from a plan."""
        await self.store.put_plan(plan)
        # The cached chains of the account's wallets may be out of date: authorize.lua walks each again.
        self.learn(plan, [node.node_id for node in plan.nodes])

    def learn(self, plan: AccountPlan, node_ids: Iterable[str]) -> None:
        """Remember that these nodes are in the plan's account, and the account's time zone."""
        account_id = plan.account_id
        self._accounts[account_id] = AccountInfo(account_id, plan.currency, plan.time_zone)
        for node_id in node_ids:
            self._hint(node_id, account_id)
