"""Webhook delivery of alerts and freezes: signed, retried with bounded back-off, once across replicas.

Every replica runs a deliverer, but they share one Redis consumer group per account's event feed, so each
event is delivered by one replica. An event is acknowledged after a 2xx answer or after the last attempt
(then it is logged as dropped): a dead endpoint never blocks the feed. The signature lets the receiver check
that the body came from spendgate and is fresh::

    X-Spendgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" keyed with the secret>
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import httpx
import redis.exceptions

from spendgate.clock import pause
from spendgate.domain import SpendgateError
from spendgate.store.redis_store import RedisStore

log = logging.getLogger("spendgate.webhooks")

GROUP = "webhooks"
WINDOW_NAMES = {"1": "day", "2": "week", "3": "month", "4": "total", "5": "minute"}
KIND_NAMES = {"1": "decision", "2": "capture", "3": "void", "4": "alert", "5": "freeze", "6": "unfreeze", "7": "config"}


@dataclasses.dataclass(frozen=True, slots=True)
class WebhookSettings:
    """Where and what to deliver."""

    url: str
    secret: str
    kinds: frozenset[str] = frozenset({"alert", "freeze", "unfreeze"})
    attempts_max: int = 5
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    timeout_s: float = 5.0
    batch_size_max: int = 100
    poll_interval_s: float = 0.5


def sign(secret: str, body: bytes, timestamp_s: int) -> str:
    """Return the signature header value for a body."""
    digest = hmac.new(secret.encode(), f"{timestamp_s}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp_s},v1={digest}"


def verify(secret: str, body: bytes, header: str, *, now_s: int, tolerance_s: int = 300) -> bool:
    """Check a signature header (what a receiver does); rejects stale timestamps."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp_s = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now_s - timestamp_s) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp_s), header)


def event_body(account_id: str, event_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """The JSON document posted for one event."""
    return {
        "id": f"{account_id}/{event_id}",
        "kind": KIND_NAMES.get(fields.get("k", ""), "unknown"),
        "account_id": account_id,
        "node_id": fields.get("node", ""),
        "at_ms": int(fields.get("at", "0") or 0),
        "amount_micros": int(fields.get("amt", "0") or 0),
        "window": WINDOW_NAMES.get(fields.get("win", ""), ""),
        "threshold_percent": int(fields.get("pct", "0") or 0),
        "message": fields.get("msg", ""),
    }


class WebhookDeliverer:
    """Tails every account's event feed through a consumer group and posts the chosen kinds."""

    def __init__(
        self, store: RedisStore, settings: WebhookSettings, consumer: str, client: httpx.AsyncClient | None = None
    ) -> None:
        self._store = store
        self._settings = settings
        self._consumer = consumer
        self._client = client or httpx.AsyncClient(timeout=settings.timeout_s)
        self._groups: set[str] = set()
        self.delivered = 0
        self.dropped = 0

    async def _ensure_group(self, stream: str) -> None:
        if stream in self._groups:
            return
        # New deliverers start at the end of the feed: webhooks announce what happens from now on.
        with contextlib.suppress(redis.exceptions.ResponseError):
            await self._store.client.xgroup_create(stream, GROUP, id="$", mkstream=True)
        self._groups.add(stream)

    async def deliver(self, body: dict[str, Any]) -> bool:
        """Post one event with retries; return whether it was accepted."""
        payload = json.dumps(body, sort_keys=True).encode()
        delay_s = self._settings.backoff_initial_s
        for attempt in range(1, self._settings.attempts_max + 1):
            headers = {
                "content-type": "application/json",
                "x-spendgate-signature": sign(self._settings.secret, payload, int(time.time())),
                "x-spendgate-event-id": str(body["id"]),
            }
            try:
                response = await self._client.post(self._settings.url, content=payload, headers=headers)
                if 200 <= response.status_code < 300:
                    return True
                log.warning("webhook answered %d for %s (attempt %d)", response.status_code, body["id"], attempt)
            except httpx.HTTPError as error:
                log.warning("webhook delivery of %s failed (attempt %d): %s", body["id"], attempt, error)
            if attempt < self._settings.attempts_max:
                await asyncio.sleep(delay_s)
                delay_s = min(self._settings.backoff_max_s, delay_s * 2)
        return False

    async def step(self) -> int:
        """Read and deliver one batch from every account; return how many events were handled."""
        handled = 0
        for account_id in await self._store.account_ids():
            stream = self._store.keys.events(account_id)
            await self._ensure_group(stream)
            reply: Any = await self._store.client.xreadgroup(
                GROUP, self._consumer, {stream: ">"}, count=self._settings.batch_size_max
            )
            for _, entries in reply or []:
                for event_id, fields in entries:
                    body = event_body(account_id, str(event_id), {str(k): str(v) for k, v in fields.items()})
                    if body["kind"] in self._settings.kinds:
                        if await self.deliver(body):
                            self.delivered += 1
                        else:
                            self.dropped += 1
                            log.error(
                                "webhook gave up on %s after %d attempts", body["id"], self._settings.attempts_max
                            )
                    await self._store.client.xack(stream, GROUP, event_id)
                    handled += 1
        return handled

    async def run_forever(self) -> None:
        """Deliver until cancelled."""
        try:
            while True:
                try:
                    handled = await self.step()
                except (SpendgateError, redis.exceptions.RedisError, OSError) as error:
                    log.warning("webhook deliverer paused: %s", error)
                    handled = 0
                if not handled:
                    await pause(self._settings.poll_interval_s)
        finally:
            await self._client.aclose()
