"""Who is calling, and may they: bearer tokens scoped to a wallet (agents) or an account (readers, admins).

Tokens are random secrets shown once; spendgate keeps only their SHA-256 hashes (the secrets carry 240 bits
of randomness, so a fast hash is enough; there is nothing to brute-force). On the hot path (Authorize,
Capture, Void) the hash goes into the decision script, which checks it in the same atomic step, so a check
costs no extra round trip and a revocation is seen by the very next call on every replica. Other calls look
the token up first. Every check happens before any state is touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from typing import Any

import grpc

from spendgate.domain import PermissionDeniedError, UnauthenticatedError
from spendgate.store.protocol import TokenRecord
from spendgate.store.redis_store import RedisStore

TOKEN_PREFIX = "sg_"  # noqa: S105 -- a marker that makes leaked tokens easy to grep for, not a secret
TOKEN_LENGTH_MAX = 256
ROLES = ("agent", "reader", "admin")


def hash_token(secret: str) -> str:
    """The stored form of a token: the hex SHA-256 of its secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    """A new token secret (240 random bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(30)


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """The caller: the root (deployment) operator, or the holder of a scoped token."""

    role: str
    account_id: str = ""
    scope_node_id: str = ""
    token_id: str = ""
    name: str = ""

    @property
    def root(self) -> bool:
        """Whether the caller may do anything anywhere (the root token, or auth turned off)."""
        return self.role == "root"

    @property
    def actor(self) -> str:
        """How the audit log names the caller."""
        if self.root:
            return "root"
        return f"token:{self.token_id} ({self.role} {self.name})"


ROOT = Principal(role="root")


class Authenticator:
    """Reads the caller's bearer token and checks it against the token store."""

    def __init__(self, store: RedisStore, *, enabled: bool, root_token: str) -> None:
        self._store = store
        self.enabled = enabled
        self._root_token = root_token

    def token_mode(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """The credential the scripts check: ``""`` (auth off), ``"*"`` (root) or the caller's token hash."""
        if not self.enabled:
            return ""
        secret = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, secret = str(value).partition(" ")
                if scheme.lower() != "bearer":
                    raise UnauthenticatedError("the authorization header must be 'Bearer <token>'")
        if not secret:
            raise UnauthenticatedError("no token: send the metadata 'authorization: Bearer <token>'")
        if len(secret) > TOKEN_LENGTH_MAX:
            raise UnauthenticatedError("unknown or revoked token")
        if self._root_token and hmac.compare_digest(secret.encode(), self._root_token.encode()):
            return "*"
        return hash_token(secret)

    async def principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        """Who is calling (looks the token up)."""
        mode = self.token_mode(context)
        if mode in ("", "*"):
            return ROOT
        record = await self._store.lookup_token(mode)
        if record is None:
            raise UnauthenticatedError("unknown or revoked token")
        return principal_of(record)

    async def require(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        account_id: str | None,
        write: bool,
        node_id: str = "",
    ) -> Principal:
        """Return the caller if they may read (or with ``write``, change) ``node_id`` in ``account_id``.

        ``account_id=None`` means deployment-wide, which only the root may touch.
        """
        return self.allow(await self.principal(context), account_id=account_id, write=write, node_id=node_id)

    async def require_node(
        self, context: grpc.aio.ServicerContext[Any, Any], node_id: str, *, write: bool
    ) -> Principal:
        """Return the caller if they may read (or with ``write``, change) ``node_id``.

        The caller is authenticated before the node is looked up, and an agent is held to its wallet before
        that too: a caller without a valid token learns nothing about which nodes exist (``NOT_FOUND`` is
        for callers who could see the node if it did).
        """
        caller = await self.principal(context)
        if caller.root:
            return caller
        if caller.role == "agent" and node_id != caller.scope_node_id:
            raise PermissionDeniedError(f"this agent token may only read wallet {caller.scope_node_id!r}")
        account_id = await self._store.account_of(node_id)
        return self.allow(caller, account_id=account_id, write=write, node_id=node_id)

    async def refuse_before_miss(self, token_mode: str, wallet_id: str) -> None:
        """Raise what the decision script would have answered this caller, when the wallet was not found.

        The hot path finds the wallet (its account, then in the script its chain) before the script checks the
        token; on a miss this makes an unknown token ``UNAUTHENTICATED`` and another wallet's agent
        ``PERMISSION_DENIED`` rather than ``NOT_FOUND``. It costs a lookup on the error path only.
        """
        if token_mode in ("", "*"):
            return
        record = await self._store.lookup_token(token_mode)
        if record is None:
            raise UnauthenticatedError("unknown or revoked token")
        if record.role == "agent" and record.scope_node_id != wallet_id:
            raise PermissionDeniedError(f"this agent token is for wallet {record.scope_node_id!r}")
        if record.role == "reader":
            raise PermissionDeniedError("a read-only token cannot spend")

    def allow(self, caller: Principal, *, account_id: str | None, write: bool, node_id: str = "") -> Principal:
        """Return ``caller`` if they may read (or with ``write``, change) ``node_id`` in ``account_id``."""
        if caller.root:
            return caller
        if account_id is None:
            raise PermissionDeniedError("this needs the deployment's root token")
        if caller.account_id != account_id:
            raise PermissionDeniedError(f"this token belongs to account {caller.account_id!r}, not {account_id!r}")
        if caller.role == "agent":
            if write or node_id != caller.scope_node_id:
                raise PermissionDeniedError(f"this agent token may only read wallet {caller.scope_node_id!r}")
            return caller
        if write and caller.role != "admin":
            raise PermissionDeniedError("this token is read-only")
        return caller


async def issue_token(
    store: RedisStore, *, role: str, scope_node_id: str, account_id: str, name: str, now_ms: int
) -> tuple[str, TokenRecord]:
    """Create a token; return its secret (to show once) and its stored record."""
    secret = new_secret()
    token_hash = hash_token(secret)
    record = TokenRecord(
        token_hash=token_hash,
        token_id=token_hash[:16],
        role=role,
        scope_node_id=scope_node_id,
        account_id=account_id,
        name=name,
        created_at_ms=now_ms,
    )
    await store.create_token(record)
    return secret, record


def principal_of(record: TokenRecord) -> Principal:
    """The caller a token record stands for."""
    return Principal(
        role=record.role,
        account_id=record.account_id,
        scope_node_id=record.scope_node_id,
        token_id=record.token_id,
        name=record.name,
    )
