"""The benchmark's own HTTP/2 gRPC client: against a real spendgate in process, and frame by frame.

Against the server: answers decode to what grpcio gets, errors carry their status and message, and a stream
moves more than a flow-control window each way (so both directions' flow control works: a client that ignored
the server's window would be refused, one that never replenished its own would hang). Frame by frame, over a
fake transport: PINGs are acked, GOAWAY and a lost connection fail the calls they strand, deadlines fire, the
read pause pauses. And the load generator's phases run over both clients.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import grpc
import pytest

from helpers import FLEET_YAML, START_MS, new_prefix
from spendgate._gen.spendgate.v1 import spend_pb2, spend_pb2_grpc
from spendgate.app import SpendgateServer, running_server
from spendgate.bench import h2client
from spendgate.bench.hpack import HpackError, decode_block, encode_field, huffman_decode
from spendgate.bench.loadgen import LoadJob, run_job
from spendgate.bench.wire import AUTHORIZE_METHOD, STREAM_METHOD, stream_request
from spendgate.clock import ManualClock
from spendgate.settings import Settings

WALLET = "research-agent-01"
CALL_TIMEOUT_S = 10.0
FRAME = struct.Struct(">IBI")
BEARER = "test-bearer"


@pytest.fixture
async def spendgate() -> AsyncIterator[SpendgateServer]:
    """A spendgate serving the example fleet on a free port, on an in-process fakeredis, auth off."""
    settings = Settings(port=0, plan=str(FLEET_YAML), key_prefix=new_prefix())
    client = fakeredis.FakeAsyncRedis(decode_responses=True)
    async with running_server(settings, clock=ManualClock(START_MS), client=client) as server:
        yield server


async def connect(server: SpendgateServer, **options: Any) -> h2client.H2Client:
    host, port = h2client.parse_target(server.address)
    return await h2client.connect(host, port, timeout_s=CALL_TIMEOUT_S, **options)


def authorize(key: str, **fields: Any) -> spend_pb2.AuthorizeRequest:
    values: dict[str, Any] = {"wallet_id": WALLET, "amount_micros": 1, "currency": "USD", "idempotency_key": key}
    return spend_pb2.AuthorizeRequest(**(values | fields))


# ---------------------------------------------------------------------------------------------------------
# Against a real server.


async def test_an_approval_decodes_to_what_grpcio_gets(spendgate: SpendgateServer) -> None:
    request = authorize("same-key")
    client = await connect(spendgate)
    try:
        code, message, encoded = await client.unary(AUTHORIZE_METHOD, request.SerializeToString())
    finally:
        await client.aclose()
    assert (code, message) == (0, "")
    assert encoded is not None
    ours = spend_pb2.AuthorizeResponse.FromString(encoded)
    assert ours.decision == spend_pb2.DECISION_APPROVED
    assert ours.authorization_id
    async with grpc.aio.insecure_channel(spendgate.address) as channel:
        # The same idempotency key: grpcio gets the replay of the answer our client got.
        theirs = await spend_pb2_grpc.SpendServiceStub(channel).Authorize(request, timeout=CALL_TIMEOUT_S)
    assert ours == theirs


async def test_a_bad_request_gets_invalid_argument_with_the_message_grpcio_sees(spendgate: SpendgateServer) -> None:
    request = authorize("bad-key", amount_micros=0)
    client = await connect(spendgate)
    try:
        code, message, encoded = await client.unary(AUTHORIZE_METHOD, request.SerializeToString())
    finally:
        await client.aclose()
    async with grpc.aio.insecure_channel(spendgate.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await spend_pb2_grpc.SpendServiceStub(channel).Authorize(request, timeout=CALL_TIMEOUT_S)
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message == raised.value.details()
    assert "amount" in message
    assert encoded is None


async def test_an_unknown_method_is_unimplemented(spendgate: SpendgateServer) -> None:
    client = await connect(spendgate)
    try:
        code, _, encoded = await client.unary("/spendgate.v1.SpendService/NoSuchMethod", b"")
    finally:
        await client.aclose()
    assert code == grpc.StatusCode.UNIMPLEMENTED.value[0]
    assert encoded is None


async def test_a_stream_moves_more_than_a_window_each_way(spendgate: SpendgateServer) -> None:
    # Our window is the protocol's default, so the server must wait for our WINDOW_UPDATEs; the requests
    # carry bounded metadata (~5 KB each) until they exceed the windows the server granted us at the start.
    client = await connect(spendgate, window=h2client.DEFAULT_WINDOW)
    granted = max(client.peer_initial_window, client.connection_send_window)
    metadata = {f"k{index:02d}" + "k" * 61: "v" * 256 for index in range(16)}
    answers: list[spend_pb2.AuthorizeStreamResponse] = []
    sent = received = 0

    def on_message(message: bytes) -> None:
        nonlocal received
        received += len(message)
        answers.append(spend_pb2.AuthorizeStreamResponse.FromString(message))

    try:
        stream = await client.open_stream(STREAM_METHOD, on_message)
        count = 0
        while sent <= granted + h2client.DEFAULT_WINDOW:
            item = stream_request(b"%d" % count, authorize(f"stream-{count}", metadata=metadata).SerializeToString())
            stream.write(item)
            sent += len(item)
            count += 1
        stream.end()
        code, message, _ = await asyncio.wait_for(stream.finished, 60)
    finally:
        await client.aclose()
    assert (code, message) == (0, "")
    assert received > h2client.DEFAULT_WINDOW
    assert sorted(int(answer.request_id) for answer in answers) == list(range(count))
    assert all(answer.response.decision == spend_pb2.DECISION_APPROVED for answer in answers)


async def test_a_lost_connection_fails_the_pending_calls_instead_of_hanging() -> None:
    # A server that speaks just enough HTTP/2 to be connected to, then hangs up when a request arrives.
    requests = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(FRAME.pack(0 << 8 | h2client.SETTINGS, 0, 0))
        await reader.readexactly(len(h2client.PREFACE))
        while True:
            word, _, _ = FRAME.unpack(await reader.readexactly(FRAME.size))
            await reader.readexactly(word >> 8)
            if word & 0xFF == h2client.HEADERS:
                requests.set()
                writer.close()
                return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await h2client.connect("127.0.0.1", port)
        code, message, encoded = await asyncio.wait_for(client.unary(AUTHORIZE_METHOD, b""), CALL_TIMEOUT_S)
        assert requests.is_set()
        assert code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "connection" in message
        assert encoded is None
        assert not client.usable
        later = await client.unary(AUTHORIZE_METHOD, b"")
        assert later[0] == grpc.StatusCode.UNAVAILABLE.value[0]
        await client.aclose()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("client", ["h2", "grpc"])
@pytest.mark.parametrize("kind", ["unary", "stream"])
async def test_the_load_generator_phases_run_over_both_clients(
    spendgate: SpendgateServer, client: str, kind: str
) -> None:
    job = LoadJob(
        kind=kind,
        process_index=0,
        key_prefix=f"{kind}-{client}-",
        wallets=(WALLET,),
        amount_micros=1,
        one_shot=False,  # authorize, then capture each approval: Capture goes over the same client
        concurrency=8,
        streams=2,
        start_at=time.time(),
        warmup_s=0.05,
        duration_s=0.4,
        target=spendgate.address,
        client=client,
    )
    result = await run_job(job)
    assert result.failure == ""
    assert result.errors == {}
    assert result.calls > 0
    assert result.captures > 0
    assert result.decisions == {"approved": result.calls}
    assert result.unknown_outcomes == 0


# ---------------------------------------------------------------------------------------------------------
# Frame by frame, over a fake transport.


class FakeTransport(asyncio.Transport):
    """Keeps what the client writes; says whether reading is paused."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.paused = False
        self.resumed = asyncio.Event()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        self.resumed.set()

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        """Every frame written so far as (type, flags, stream id, payload), the preface skipped."""
        data = bytes(self.written)
        data = data.removeprefix(h2client.PREFACE)
        frames = []
        offset = 0
        while offset < len(data):
            word, flags, stream_id = FRAME.unpack_from(data, offset)
            start = offset + FRAME.size
            frames.append((word & 0xFF, flags, stream_id, data[start : start + (word >> 8)]))
            offset = start + (word >> 8)
        self.written.clear()
        return frames


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return FRAME.pack(len(payload) << 8 | kind, flags, stream_id) + payload


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(h2client.SETTINGS, 0, 0, b"".join(struct.pack(">HI", key, value) for key, value in pairs))


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


RESPONSE_HEADERS = encode_field(":status", "200") + encode_field("content-type", "application/grpc")
OK_TRAILERS = encode_field("grpc-status", "0")


def answer(stream_id: int, payload: bytes) -> bytes:
    """A whole unary answer: headers, the message, trailers."""
    return (
        frame(h2client.HEADERS, h2client.END_HEADERS, stream_id, RESPONSE_HEADERS)
        + frame(h2client.DATA, 0, stream_id, grpc_message(payload))
        + frame(h2client.HEADERS, h2client.END_HEADERS | h2client.END_STREAM, stream_id, OK_TRAILERS)
    )


async def fake_client(*server_settings: tuple[int, int], **options: Any) -> tuple[h2client.H2Client, FakeTransport]:
    client = h2client.H2Client("test:1", **options)
    transport = FakeTransport()
    client.connection_made(transport)
    client.data_received(settings(*server_settings))
    await asyncio.sleep(0)  # the flush
    transport.frames()
    return client, transport


async def settled() -> None:
    """Let the client's callbacks (flushes, wake-ups) run."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_the_preface_announces_no_header_table_and_the_window() -> None:
    client = h2client.H2Client("test:1", window=1 << 20)
    transport = FakeTransport()
    client.connection_made(transport)
    await settled()
    assert bytes(transport.written).startswith(h2client.PREFACE)
    frames = transport.frames()
    assert frames[0][:3] == (h2client.SETTINGS, 0, 0)
    announced = dict(struct.iter_unpack(">HI", frames[0][3]))
    assert announced == {
        h2client.SETTINGS_HEADER_TABLE_SIZE: 0,
        h2client.SETTINGS_ENABLE_PUSH: 0,
        h2client.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20,
    }
    assert frames[1] == (h2client.WINDOW_UPDATE, 0, 0, struct.pack(">I", (1 << 20) - h2client.DEFAULT_WINDOW))
    assert not client.ready.done()
    client.data_received(settings())
    await settled()
    assert client.ready.done()
    assert transport.frames() == [(h2client.SETTINGS, h2client.ACK, 0, b"")]


async def test_a_ping_is_acked_with_its_payload() -> None:
    client, transport = await fake_client()
    client.data_received(frame(h2client.PING, 0, 0, b"12345678"))
    await settled()
    assert transport.frames() == [(h2client.PING, h2client.ACK, 0, b"12345678")]
    client.data_received(frame(h2client.PING, h2client.ACK, 0, b"12345678"))
    await settled()
    assert transport.frames() == []


async def test_a_unary_call_is_one_headers_and_one_data_frame_and_reads_its_answer() -> None:
    client, transport = await fake_client(timeout_s=3.0, token=BEARER)
    call = asyncio.ensure_future(client.unary(AUTHORIZE_METHOD, b"request"))
    await settled()
    (headers, data) = transport.frames()
    assert headers[:3] == (h2client.HEADERS, h2client.END_HEADERS, 1)
    assert dict(decode_block(headers[3])) == {
        ":method": "POST",
        ":scheme": "http",
        ":path": AUTHORIZE_METHOD,
        ":authority": "test:1",
        "content-type": "application/grpc",
        "te": "trailers",
        "grpc-timeout": "3000m",
        "authorization": f"Bearer {BEARER}",
    }
    assert data == (h2client.DATA, h2client.END_STREAM, 1, grpc_message(b"request"))
    # The answer split at an awkward place between two reads.
    whole = answer(1, b"response")
    client.data_received(whole[:20])
    client.data_received(whole[20:])
    assert await call == (0, "", b"response")
    assert client.active_streams == 0


async def test_a_trailers_only_answer_carries_its_status_and_decoded_message() -> None:
    client, _ = await fake_client()
    call = asyncio.ensure_future(client.unary(AUTHORIZE_METHOD, b""))
    await settled()
    block = (
        RESPONSE_HEADERS
        + encode_field("grpc-status", str(grpc.StatusCode.NOT_FOUND.value[0]))
        + encode_field("grpc-message", "no wallet %22x%22")
    )
    client.data_received(frame(h2client.HEADERS, h2client.END_HEADERS | h2client.END_STREAM, 1, block))
    assert await call == (grpc.StatusCode.NOT_FOUND.value[0], 'no wallet "x"', None)


async def test_send_flow_control_waits_for_the_servers_window() -> None:
    client, transport = await fake_client()  # the server's windows stay at the default 65,535 bytes
    message = b"x" * 100_000
    call = asyncio.ensure_future(client.unary(AUTHORIZE_METHOD, message))
    await settled()
    frames = transport.frames()
    assert [kind for kind, *_ in frames] == [h2client.HEADERS] + [h2client.DATA] * 4
    assert sum(len(payload) for kind, _, _, payload in frames if kind == h2client.DATA) == h2client.DEFAULT_WINDOW
    assert all(flags == 0 for kind, flags, _, _ in frames if kind == h2client.DATA)
    # The connection window opens first: still nothing, the stream's is spent too.
    client.data_received(frame(h2client.WINDOW_UPDATE, 0, 0, struct.pack(">I", 50_000)))
    await settled()
    assert transport.frames() == []
    client.data_received(frame(h2client.WINDOW_UPDATE, 0, 1, struct.pack(">I", 50_000)))
    await settled()
    rest = transport.frames()
    assert sum(len(payload) for *_, payload in rest) == len(message) + 5 - h2client.DEFAULT_WINDOW
    assert rest[-1][1] == h2client.END_STREAM
    client.data_received(answer(1, b""))
    assert await call == (0, "", b"")


async def test_a_larger_initial_window_in_settings_releases_queued_data() -> None:
    client, transport = await fake_client()
    call = asyncio.ensure_future(client.unary(AUTHORIZE_METHOD, b"y" * 70_000))
    await settled()
    transport.frames()
    client.data_received(settings((h2client.SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20)))
    client.data_received(frame(h2client.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 20)))
    await settled()
    frames = transport.frames()
    assert frames[0] == (h2client.SETTINGS, h2client.ACK, 0, b"")
    assert sum(len(payload) for kind, _, _, payload in frames if kind == h2client.DATA) == 70_005 - 65_535
    client.data_received(answer(1, b""))
    assert (await call)[0] == 0


async def test_received_data_is_replenished_at_half_the_window() -> None:
    client, transport = await fake_client(window=h2client.DEFAULT_WINDOW)
    received: list[bytes] = []
    stream = await client.open_stream(STREAM_METHOD, received.append)
    await settled()
    transport.frames()
    chunk = grpc_message(b"z" * 16_000)
    for _ in range(2):
        client.data_received(frame(h2client.DATA, 0, stream.id, chunk))
    await settled()
    assert transport.frames() == [], "under half the window: no update yet"
    client.data_received(frame(h2client.DATA, 0, stream.id, chunk))
    await settled()
    updates = {(stream_id, struct.unpack(">I", payload)[0]) for kind, _, stream_id, payload in transport.frames()}
    assert updates == {(0, 3 * len(chunk)), (stream.id, 3 * len(chunk))}
    assert received == [b"z" * 16_000] * 3


async def test_max_concurrent_streams_is_honoured() -> None:
    client, transport = await fake_client((h2client.SETTINGS_MAX_CONCURRENT_STREAMS, 2))
    calls = [asyncio.ensure_future(client.unary(AUTHORIZE_METHOD, b"")) for _ in range(3)]
    await settled()
    opened = [stream_id for kind, _, stream_id, _ in transport.frames() if kind == h2client.HEADERS]
    assert opened == [1, 3]
    client.data_received(answer(1, b""))
    await settled()
    opened = [stream_id for kind, _, stream_id, _ in transport.frames() if kind == h2client.HEADERS]
    assert opened == [5]
    client.data_received(answer(3, b"") + answer(5, b""))
    assert [(await call)[0] for call in calls] == [0, 0, 0]


async def test_goaway_fails_the_calls_the_server_will_not_process_and_refuses_new_ones() -> None:
    client, transport = await fake_client()
    calls = [asyncio.ensure_future(client.unary(AUTHORIZE_METHOD, b"")) for _ in range(3)]
    await settled()
    client.data_received(frame(h2client.GOAWAY, 0, 0, struct.pack(">II", 1, h2client.NO_ERROR) + b"bye"))
    await settled()
    assert calls[1].done()
    assert calls[2].done()
    assert calls[1].result()[0] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "GOAWAY" in calls[2].result()[1]
    assert not calls[0].done(), "stream 1 is still being processed"
    assert not client.usable
    assert (await client.unary(AUTHORIZE_METHOD, b""))[0] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert not transport.closing
    client.data_received(answer(1, b"last"))
    assert await calls[0] == (0, "", b"last")
    assert transport.closing, "nothing left to wait for: the connection closes"


async def test_rst_stream_fails_its_call() -> None:
    client, _ = await fake_client()
    call = asyncio.ensure_future(client.unary(AUTHORIZE_METHOD, b""))
    await settled()
    client.data_received(frame(h2client.RST_STREAM, 0, 1, struct.pack(">I", h2client.REFUSED_STREAM)))
    code, message, _ = await call
    assert code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "reset" in message


async def test_a_lost_connection_fails_every_open_call() -> None:
    client, _ = await fake_client()
    calls = [asyncio.ensure_future(client.unary(AUTHORIZE_METHOD, b"")) for _ in range(2)]
    await settled()
    client.connection_lost(ConnectionResetError("reset by peer"))
    results = await asyncio.gather(*calls)
    assert [code for code, _, _ in results] == [grpc.StatusCode.UNAVAILABLE.value[0]] * 2
    assert "reset by peer" in results[0][1]
    assert client.closed.done()


async def test_a_call_past_its_deadline_fails_and_is_reset() -> None:
    client, transport = await fake_client(timeout_s=0.1)
    started = time.monotonic()
    code, message, _ = await asyncio.wait_for(client.unary(AUTHORIZE_METHOD, b""), CALL_TIMEOUT_S)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "deadline" in message
    assert time.monotonic() - started < 1.0, "failed near its deadline, not at some later time"
    await settled()
    resets = [frame for frame in transport.frames() if frame[0] == h2client.RST_STREAM]
    assert resets == [(h2client.RST_STREAM, 0, 1, struct.pack(">I", h2client.CANCEL))]
    client.close()


async def test_the_read_pacer_pauses_busy_connections_and_resumes_them_together() -> None:
    pacer = h2client.ReadPacer(0.02, awaited_min=2)
    (first, first_transport), (second, second_transport) = [await fake_client(pacer=pacer) for _ in range(2)]
    calls = [asyncio.ensure_future(client.unary(AUTHORIZE_METHOD, b"")) for client in (first, second) for _ in range(3)]
    await settled()
    paused_at = time.monotonic()
    first.data_received(answer(1, b""))
    second.data_received(answer(1, b""))
    assert first_transport.paused, "two answers still awaited on it"
    assert second_transport.paused
    await asyncio.wait_for(first_transport.resumed.wait(), CALL_TIMEOUT_S)
    assert time.monotonic() - paused_at >= 0.015
    assert not second_transport.paused, "resumed at the same tick as the first"
    first.data_received(answer(3, b""))
    assert not first_transport.paused, "one answer awaited: no pause"
    first.data_received(answer(5, b""))
    second.data_received(answer(3, b"") + answer(5, b""))
    assert [(await call)[0] for call in calls] == [0] * 6


async def test_a_server_protocol_error_fails_the_connection() -> None:
    client, transport = await fake_client()
    call = asyncio.ensure_future(client.unary(AUTHORIZE_METHOD, b""))
    await settled()
    # An indexed field pointing into a dynamic table we said must be empty.
    client.data_received(frame(h2client.HEADERS, h2client.END_HEADERS, 1, bytes([0x80 | 62])))
    code, message, _ = await call
    assert code == grpc.StatusCode.INTERNAL.value[0]
    assert "headers" in message
    assert transport.closing
    goaway = [frame for frame in transport.frames() if frame[0] == h2client.GOAWAY]
    assert struct.unpack(">II", goaway[0][3][:8]) == (0, h2client.COMPRESSION_ERROR)


def test_grpc_timeout_uses_the_finest_unit_that_fits() -> None:
    assert h2client.grpc_timeout(5.0) == "5000m"
    assert h2client.grpc_timeout(0.0004) == "1m"
    assert h2client.grpc_timeout(200_000.0) == "200000S"
    assert h2client.grpc_timeout(10**9) == "16666667M"


def test_targets_parse_to_host_and_port() -> None:
    assert h2client.parse_target("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert h2client.parse_target("[::1]:443") == ("::1", 443)
    with pytest.raises(ValueError, match="host:port"):
        h2client.parse_target("localhost")


# ---------------------------------------------------------------------------------------------------------
# HPACK.


def test_hpack_decodes_the_rfc_7541_examples() -> None:
    # C.4.1: the first request of the Huffman examples (its :authority is indexed incrementally, which a
    # table of size zero simply does not keep).
    block = bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff")
    assert decode_block(block) == [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ]
    assert huffman_decode(bytes.fromhex("a8eb10649cbf")) == b"no-cache"
    # C.2.2: a literal field without indexing.
    assert decode_block(bytes.fromhex("040c2f73616d706c652f70617468")) == [(":path", "/sample/path")]


def test_hpack_refuses_what_needs_a_dynamic_table() -> None:
    with pytest.raises(HpackError, match="static table"):
        decode_block(bytes([0x80 | 62]))
    with pytest.raises(HpackError, match="size update"):
        decode_block(bytes([0x3F, 0xE1, 0x1F]))  # a table size update to 4,096
    assert decode_block(bytes([0x20]) + encode_field("te", "trailers")) == [("te", "trailers")]


def test_hpack_fields_round_trip_without_table_state() -> None:
    fields = [(":path", "/a/b"), ("te", "trailers"), ("x-long", "v" * 300), ("authorization", "Bearer t")]
    block = b"".join(encode_field(name, value, sensitive=name == "authorization") for name, value in fields)
    assert decode_block(block) == fields
    assert encode_field(":method", "POST") == b"\x83"  # whole in the static table: one octet
