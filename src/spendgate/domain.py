"""The domain model: nodes, limits, decisions and the errors the core raises. Pure; no I/O.

Denials are values (:class:`AuthorizeResult` with a :class:`DenyReason`); exceptions are for bad input and
outages, and :mod:`spendgate.api.errors` is the one place that maps them to gRPC status codes.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping

from spendgate.money import MONEY_MICROS_MAX


class Decision(enum.IntEnum):
    """The answer to an authorization."""

    APPROVED = 1
    DENIED = 2


class DenyReason(enum.IntEnum):
    """Why an authorization was denied, in order of precedence (lowest wins)."""

    NONE = 0
    FROZEN = 1
    SERVICE_NOT_ALLOWED = 2
    PER_TRANSACTION_LIMIT = 3
    VELOCITY_LIMIT = 4
    WINDOW_LIMIT = 5


class Window(enum.IntEnum):
    """A budget window; the values match the Lua scripts' window codes."""

    NONE = 0
    DAY = 1
    WEEK = 2
    MONTH = 3
    TOTAL = 4
    MINUTE = 5


# The windows that carry money limits, in the order reports list them.
MONEY_WINDOWS = (Window.DAY, Window.WEEK, Window.MONTH, Window.TOTAL)


class HoldState(enum.IntEnum):
    """Where an authorization's hold stands."""

    NONE = 0
    HELD = 1
    CAPTURED = 2
    VOIDED = 3
    EXPIRED = 4


class NodeKind(enum.IntEnum):
    """The role of a node in the hierarchy."""

    ACCOUNT = 1
    POOL = 2
    WALLET = 3


# ---------------------------------------------------------------------------------------------------------
# Errors. Each names what to fix; none of them is raised after any state changed.


class SpendgateError(Exception):
    """Base of the errors the core raises on purpose."""


class InvalidArgumentError(SpendgateError):
    """The request is malformed; the message says what to fix."""


class NotFoundError(SpendgateError):
    """A wallet, node or authorization that does not exist."""


class AlreadyExistsError(SpendgateError):
    """An idempotency key reused with a different request."""


class FailedPreconditionError(SpendgateError):
    """The request is well-formed but the state does not allow it (for example capture after void)."""


class UnavailableError(SpendgateError):
    """A backing service (Redis, the ledger) is unreachable or too slow; safe to retry."""


class UnauthenticatedError(SpendgateError):
    """No token, or a token spendgate does not know (revoked or never issued)."""


class PermissionDeniedError(SpendgateError):
    """A valid token used outside its scope (another wallet, another account, a write with a read-only token)."""


class ResourceExhaustedError(SpendgateError):
    """A bound was reached (holds per wallet, in-flight calls)."""


# ---------------------------------------------------------------------------------------------------------
# Bounds on what clients control.

ID_LENGTH_MAX = 64
IDEMPOTENCY_KEY_LENGTH_MAX = 128
SERVICE_LENGTH_MAX = 128
METADATA_ENTRIES_MAX = 16
METADATA_KEY_LENGTH_MAX = 64
METADATA_VALUE_LENGTH_MAX = 256
ALLOWED_SERVICES_MAX = 64

# Node ids are readable slugs: they appear in Redis keys, logs, CSV exports and the CLI.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Idempotency keys are printable ASCII without spaces, so UUIDs, ULIDs and hashes all fit.
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]+$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")


def check_id(value: str, what: str) -> str:
    """Return ``value`` if it is a valid node id, else raise :class:`InvalidArgumentError` naming ``what``."""
    if not value:
        raise InvalidArgumentError(f"{what} is required")
    if len(value) > ID_LENGTH_MAX:
        raise InvalidArgumentError(f"{what} is {len(value)} characters long; the limit is {ID_LENGTH_MAX}")
    if not _ID.fullmatch(value):
        raise InvalidArgumentError(
            f"{what} {value!r} may only hold letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return value


def check_idempotency_key(value: str) -> str:
    """Return ``value`` if it is a valid idempotency key, else raise :class:`InvalidArgumentError`."""
    if not value:
        raise InvalidArgumentError("idempotency_key is required: send a unique key per request (a UUID works)")
    if len(value) > IDEMPOTENCY_KEY_LENGTH_MAX:
        raise InvalidArgumentError(
            f"idempotency_key is {len(value)} characters long; the limit is {IDEMPOTENCY_KEY_LENGTH_MAX}"
        )
    if not _IDEMPOTENCY_KEY.fullmatch(value):
        raise InvalidArgumentError("idempotency_key may only hold printable ASCII characters without spaces")
    return value


def check_amount(value: int, what: str = "amount_micros") -> int:
    """Return ``value`` if it is a positive amount spendgate can hold exactly."""
    if value <= 0:
        raise InvalidArgumentError(f"{what} must be positive (got {value}); amounts are micro-units, $1 = 1000000")
    if value > MONEY_MICROS_MAX:
        raise InvalidArgumentError(f"{what} {value} is above the largest amount accepted ({MONEY_MICROS_MAX})")
    return value


def check_currency(value: str) -> str:
    """Return ``value`` if it looks like an ISO 4217 code; whether it is the account's is the script's call."""
    if not value:
        raise InvalidArgumentError("currency is required (an ISO 4217 code such as USD)")
    if not _CURRENCY.fullmatch(value):
        raise InvalidArgumentError(f"currency {value!r} is not an ISO 4217 code such as USD")
    return value


def check_service(value: str) -> str:
    """Return ``value`` if it is a valid service name (empty means unnamed)."""
    if len(value) > SERVICE_LENGTH_MAX:
        raise InvalidArgumentError(f"service is {len(value)} characters long; the limit is {SERVICE_LENGTH_MAX}")
    if any(not character.isprintable() for character in value):
        raise InvalidArgumentError("service may not hold control characters")
    return value


def check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Return a copy of ``metadata`` if it is within bounds, else raise :class:`InvalidArgumentError`."""
    if len(metadata) > METADATA_ENTRIES_MAX:
        raise InvalidArgumentError(f"metadata has {len(metadata)} entries; the limit is {METADATA_ENTRIES_MAX}")
    for key, value in metadata.items():
        if not key or len(key) > METADATA_KEY_LENGTH_MAX:
            raise InvalidArgumentError(f"metadata keys must be 1 to {METADATA_KEY_LENGTH_MAX} characters long")
        if len(value) > METADATA_VALUE_LENGTH_MAX:
            raise InvalidArgumentError(
                f"metadata value of {key!r} is {len(value)} characters long; the limit is {METADATA_VALUE_LENGTH_MAX}"
            )
    return dict(metadata)


# ---------------------------------------------------------------------------------------------------------
# Configuration of the hierarchy.


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """The limits of one node; ``None`` means no limit of that kind."""

    per_transaction_micros: int | None = None
    day_micros: int | None = None
    week_micros: int | None = None
    month_micros: int | None = None
    total_micros: int | None = None
    velocity_per_minute: int | None = None
    allowed_services: tuple[str, ...] = ()

    def window_limit(self, window: Window) -> int | None:
        """Return the money limit of ``window``, or ``None`` when it has none."""
        return {
            Window.DAY: self.day_micros,
            Window.WEEK: self.week_micros,
            Window.MONTH: self.month_micros,
            Window.TOTAL: self.total_micros,
        }.get(window)


@dataclasses.dataclass(frozen=True, slots=True)
class Breaker:
    """The spend-rate breaker's settings for one node (off unless a node has them).

    It freezes a node when its spend over ``recent_minutes`` exceeds ``multiplier`` times its average over as
    many minutes in the ``trailing_minutes`` before, and is at least ``min_spend_micros``.
    """

    multiplier: float = 5.0
    recent_minutes: int = 5
    trailing_minutes: int = 60
    min_spend_micros: int = 0

    def encode(self) -> str:
        """The form the scripts read (see _lib.lua breaker_step)."""
        return f"{self.multiplier!r},{self.recent_minutes},{self.trailing_minutes},{self.min_spend_micros}"


@dataclasses.dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node of an account's tree as an operator declares it."""

    node_id: str
    kind: NodeKind
    parent_id: str | None
    limits: Limits = Limits()
    frozen_reason: str = ""
    # In shadow mode the node's limits are evaluated and reported ("would have denied") but not enforced.
    shadow: bool = False
    breaker: Breaker | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class AccountPlan:
    """An account's whole tree: the account node first, every parent before its children."""

    account_id: str
    currency: str
    time_zone: str
    nodes: tuple[NodeSpec, ...]


# ---------------------------------------------------------------------------------------------------------
# Requests and results.


@dataclasses.dataclass(frozen=True, slots=True)
class AuthorizeCommand:
    """A request to spend ``amount_micros`` from a wallet."""

    wallet_id: str
    amount_micros: int
    currency: str
    idempotency_key: str
    service: str = ""
    capture: bool = False
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class NodeWindow:
    """One window of one node."""

    node_id: str
    window: Window


@dataclasses.dataclass(frozen=True, slots=True)
class RemainingBudget:
    """What is left in the tightest window of a chain."""

    node_id: str
    window: Window
    limit_micros: int
    remaining_micros: int


@dataclasses.dataclass(frozen=True, slots=True)
class AuthorizeResult:
    """The decision on an authorization."""

    decision: Decision
    authorization_id: str = ""
    deny_reason: DenyReason = DenyReason.NONE
    denied_by: NodeWindow | None = None
    remaining: RemainingBudget | None = None
    hold_expires_at_ms: int = 0
    hold_state: HoldState = HoldState.NONE
    captured_micros: int = 0
    message: str = ""
    # What a node in shadow mode would have denied, had its limits been enforced.
    would_deny_reason: DenyReason = DenyReason.NONE
    would_deny_by: NodeWindow | None = None

    @property
    def approved(self) -> bool:
        """Whether the spend was approved."""
        return self.decision is Decision.APPROVED


@dataclasses.dataclass(frozen=True, slots=True)
class CaptureResult:
    """A settled hold."""

    authorization_id: str
    captured_micros: int
    released_micros: int
    hold_state: HoldState = HoldState.CAPTURED


@dataclasses.dataclass(frozen=True, slots=True)
class VoidResult:
    """A released hold."""

    authorization_id: str
    released_micros: int
    hold_state: HoldState = HoldState.VOIDED


@dataclasses.dataclass(frozen=True, slots=True)
class WindowBudget:
    """One window of a node's budget."""

    window: Window
    window_id: str
    limit_micros: int | None
    spent_micros: int
    held_micros: int
    ends_at_ms: int

    @property
    def remaining_micros(self) -> int | None:
        """The limit less spent and held money (never negative), or ``None`` without a limit."""
        if self.limit_micros is None:
            return None
        return max(0, self.limit_micros - self.spent_micros - self.held_micros)


@dataclasses.dataclass(frozen=True, slots=True)
class NodeBudget:
    """A node's limits and what is spent, held and remaining in each window."""

    node_id: str
    kind: NodeKind
    parent_id: str | None
    account_id: str
    currency: str
    time_zone: str
    frozen_reason: str
    per_transaction_micros: int | None
    velocity_per_minute: int | None
    velocity_used: int
    allowed_services: tuple[str, ...]
    windows: tuple[WindowBudget, ...]

    @property
    def frozen(self) -> bool:
        """Whether the node is frozen."""
        return bool(self.frozen_reason)

    def window(self, window: Window) -> WindowBudget:
        """Return the budget of one window."""
        for budget in self.windows:
            if budget.window is window:
                return budget
        raise KeyError(window)


def with_article(noun: str) -> str:
    """'a pool', 'an account'."""
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"
