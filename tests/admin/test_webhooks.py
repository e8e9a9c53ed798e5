"""Webhooks: alerts and freezes posted to a receiver, signed, and retried until it accepts them."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from spendgate.domain import Limits
from spendgate.webhooks import WebhookDeliverer, WebhookSettings, sign, verify

from .support import USD, StartFleet, wait_for

SECRET = "whsec-test-0123456789"  # noqa: S105 - the test receiver's signing key, not a credential


class Receiver:
    """A tiny HTTP endpoint on 127.0.0.1 that records every POST and answers with the statuses it is given."""

    def __init__(self, statuses: list[int]) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self._statuses = statuses
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                status = receiver._statuses.pop(0) if receiver._statuses else 200
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks/spendgate"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.start()

    def bodies(self) -> list[dict[str, object]]:
        return [json.loads(body) for _, body in self.requests]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    # The first delivery fails with a 500: the deliverer must try again.
    endpoint = Receiver([500])
    yield endpoint
    endpoint.close()


def test_alerts_and_freezes_are_posted_signed_and_retried(start_fleet: StartFleet, receiver: Receiver) -> None:
    fleet = start_fleet(webhook_url=receiver.url, webhook_secret=SECRET, webhook_kinds="alert,freeze")
    server = fleet.harness.server
    stream = server.store.keys.events("acme")

    # The deliverer joins the feed at its end when it starts; wait for it before making events.
    async def groups() -> list[str]:
        return [group["name"] for group in await server.store.client.xinfo_groups(stream)]

    wait_for(lambda: "webhooks" in fleet.harness.run(groups()), what="the webhook deliverer to join the feed")

    fleet.admin.set_limits("sales-agent-01", Limits(day_micros=2 * USD))  # config: not a posted kind
    assert fleet.spend.authorize("sales-agent-01", 1_200_000, capture=True).approved  # 60 %: an alert
    fleet.admin.freeze("sales-agent-01", "paged by the alert")
    # The deliverer reads the feed in order: once this last freeze is posted, every event before it was handled.
    fleet.admin.freeze("content-agent-02", "end of test")

    wait_for(lambda: len(receiver.requests) >= 4, what="four deliveries")
    bodies = receiver.bodies()
    assert [(b["kind"], b["node_id"]) for b in bodies] == [
        ("alert", "sales-agent-01"),  # answered 500
        ("alert", "sales-agent-01"),  # the retry, answered 200
        ("freeze", "sales-agent-01"),
        ("freeze", "content-agent-02"),
    ]
    first, retry, _, _ = receiver.requests
    assert first[1] == retry[1]
    assert first[0]["x-spendgate-event-id"] == retry[0]["x-spendgate-event-id"] == bodies[0]["id"]
    assert bodies[0]["threshold_percent"] == 50
    assert bodies[0]["amount_micros"] == 1_200_000
    assert bodies[0]["account_id"] == "acme"
    assert bodies[2]["message"] == "paged by the alert"
    for headers, body in receiver.requests:
        assert headers["content-type"] == "application/json"
        signature = headers["x-spendgate-signature"]
        assert verify(SECRET, body, signature, now_s=int(time.time()))
        assert not verify("another-secret", body, signature, now_s=int(time.time()))
        assert not verify(SECRET, body.replace(b'"acme"', b'"evil"'), signature, now_s=int(time.time()))


def test_the_signature_is_the_documented_hmac_of_timestamp_dot_body() -> None:
    # What a receiver computes from the README alone, without spendgate's own verify().
    expected = hmac.new(SECRET.encode(), b"1700000000." + b'{"kind": "freeze"}', hashlib.sha256).hexdigest()
    assert sign(SECRET, b'{"kind": "freeze"}', 1_700_000_000) == f"t=1700000000,v1={expected}"


def test_verify_rejects_stale_and_malformed_signatures() -> None:
    body = b'{"kind": "freeze"}'
    header = sign(SECRET, body, 1_700_000_000)
    assert verify(SECRET, body, header, now_s=1_700_000_100)
    assert not verify(SECRET, body, header, now_s=1_700_000_000 + 301)
    assert not verify(SECRET, body, "v1=abc", now_s=1_700_000_000)
    assert not verify(SECRET, body, "t=soon,v1=abc", now_s=1_700_000_000)
    assert not verify(SECRET, body, header.replace("v1=", "v1=0"), now_s=1_700_000_000)


BODY = {"id": "acme/1-0", "kind": "freeze", "node_id": "w1"}


def deliverer(handler: httpx.MockTransport, attempts_max: int = 4) -> WebhookDeliverer:
    settings = WebhookSettings(
        url="https://hooks.example.com/spendgate",
        secret=SECRET,
        attempts_max=attempts_max,
        backoff_initial_s=0.001,
        backoff_max_s=0.002,
    )
    # deliver() never touches the store, so none is given.
    store: Any = None
    return WebhookDeliverer(store, settings, "test", client=httpx.AsyncClient(transport=handler))


async def test_deliver_retries_failures_until_the_receiver_accepts() -> None:
    seen: list[httpx.Request] = []
    answers: list[int | Exception] = [500, httpx.ConnectError("refused"), 503, 204]

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer)

    sender = deliverer(httpx.MockTransport(handle))
    assert await sender.deliver(BODY) is True
    assert len(seen) == 4
    assert {request.content for request in seen} == {json.dumps(BODY, sort_keys=True).encode()}
    for request in seen:
        assert request.headers["x-spendgate-event-id"] == "acme/1-0"
        assert verify(SECRET, request.content, request.headers["x-spendgate-signature"], now_s=int(time.time()))
    await sender._client.aclose()


async def test_deliver_gives_up_after_its_attempts() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(500)

    sender = deliverer(httpx.MockTransport(handle), attempts_max=3)
    assert await sender.deliver(BODY) is False
    assert len(seen) == 3
    await sender._client.aclose()
