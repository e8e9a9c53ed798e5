"""The request fingerprint kept in idempotency records must never change: it is pinned to its JSON definition."""

from __future__ import annotations

import hashlib
import json

from hypothesis import given
from hypothesis import strategies as st

from spendgate.core import fingerprint
from spendgate.domain import AuthorizeCommand

text = st.text(max_size=20)


def defined_fingerprint(command: AuthorizeCommand) -> str:
    """The definition: a digest of the request's JSON list (what every earlier version stored)."""
    canonical = json.dumps(
        [
            command.wallet_id,
            command.amount_micros,
            command.currency,
            command.service,
            command.capture,
            sorted(command.metadata.items()),
        ],
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@given(
    wallet_id=text,
    amount_micros=st.integers(min_value=1, max_value=10**15),
    currency=text,
    service=text,
    capture=st.booleans(),
    metadata=st.dictionaries(text, text, max_size=4),
)
def test_the_fingerprint_is_its_json_definition(
    wallet_id: str, amount_micros: int, currency: str, service: str, capture: bool, metadata: dict[str, str]
) -> None:
    command = AuthorizeCommand(
        wallet_id=wallet_id,
        amount_micros=amount_micros,
        currency=currency,
        idempotency_key="k",
        service=service,
        capture=capture,
        metadata=metadata,
    )
    assert fingerprint(command) == defined_fingerprint(command)


def test_a_known_request_keeps_its_digest() -> None:
    command = AuthorizeCommand(
        wallet_id="research-agent-01", amount_micros=250_000, currency="USD", idempotency_key="k", capture=True
    )
    digest = hashlib.sha256(b'["research-agent-01",250000,"USD","",true,[]]').hexdigest()[:32]
    assert fingerprint(command) == digest
