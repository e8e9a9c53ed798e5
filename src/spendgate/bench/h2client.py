"""A minimal HTTP/2 gRPC client for the load generator: pre-encoded frames on an asyncio Protocol.

A grpcio Python client spends about as much CPU on a unary call as the server does to answer it (some
220 µs on a two-core machine), so with it the generator, not the server, sets the pace, and the ratios the
benchmark reports are distorted. This client does only what the generator needs, cheaply:

* one plaintext TCP connection per client (HTTP/2 with prior knowledge, as grpcio's insecure channel);
* a request is a HEADERS frame whose HPACK block is encoded once per method with representations that need
  no table state, so every request sends the same bytes but its stream id, then a DATA frame holding the
  gRPC message (the generator's requests are pre-encoded already: :mod:`spendgate.bench.wire`);
* it announces ``SETTINGS_HEADER_TABLE_SIZE = 0``: the server's HPACK encoder then keeps no dynamic table,
  identical headers and trailers encode to identical bytes, and decoded blocks are cached by their bytes, so
  a steady run decodes nothing (:mod:`spendgate.bench.hpack` decodes a new block);
* flow control both ways: the server's windows are respected (DATA waits for WINDOW_UPDATE), ours are
  replenished once half used; PINGs (gRPC's bandwidth probes) are answered, MAX_CONCURRENT_STREAMS is
  honoured, RST_STREAM fails its stream and GOAWAY the streams the server will not process;
* writes made in one turn of the event loop go out in one ``transport.write``, the next calls of the callers
  a read woke up included;
* optionally (a :class:`ReadPacer`, for closed loops), after a read that leaves many answers awaited a
  connection stops reading until the pacer's next tick, when every connection it paused resumes at once:
  the answers that arrived meanwhile, on all of them, are taken in one wake-up of the process. On a small
  machine a wake-up costs more than a call's own work, and a generator woken once per answer takes CPU the
  server needs;
* deadlines: every unary call sends the client's ``grpc-timeout`` and a sweep a few times a second fails
  (and resets) the calls past it, instead of a timer per call.

Calls return ``(status code, message, response bytes)`` instead of raising: the generator counts outcomes.
No TLS, compression, retries, name resolution or keepalive: this is a load generator, not a gRPC library.
"""

from __future__ import annotations

import asyncio
import collections
import math
import struct
import urllib.parse
from collections.abc import Callable
from typing import NamedTuple, cast

from spendgate.bench.hpack import HpackError, decode_block, encode_field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types (RFC 9113 section 6).
DATA = 0x0
HEADERS = 0x1
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9
# Frame flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# Settings (section 6.5.2).
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
# Error codes (section 7).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
FLOW_CONTROL_ERROR = 0x3
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB
INADEQUATE_SECURITY = 0xC
# gRPC status codes (the numbers of grpc.StatusCode).
OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

DEFAULT_WINDOW = 65_535
WINDOW_MAX = 2**31 - 1
STREAM_ID_MAX = 2**31 - 1
DEFAULT_FRAME_SIZE = 16_384
# Streams a server allows before its SETTINGS say otherwise (the least RFC 9113 recommends).
DEFAULT_STREAMS = 100
# The largest gRPC message accepted (grpc's own default receive limit).
MESSAGE_SIZE_MAX = 4 * 1024 * 1024
# Distinct header blocks kept decoded; steady traffic needs a handful (the error messages vary more).
HEADER_CACHE_MAX = 1024
# How often calls past their deadline are looked for.
SWEEP_INTERVAL_S = 0.05
# grpc-timeout has at most eight digits (gRPC over HTTP/2 spec); finest unit that fits first.
_TIMEOUT_UNITS = (("m", 1e3), ("S", 1.0), ("M", 1 / 60), ("H", 1 / 3600))
_TIMEOUT_DIGITS_MAX = 99_999_999

# A frame header (24-bit length and 8-bit type in one 32-bit word, flags, stream id) and the same followed by
# a gRPC message prefix (compressed flag, 32-bit length).
_FRAME = struct.Struct(">IBI")
_DATA_MESSAGE = struct.Struct(">IBIBI")
_GRPC_PREFIX = struct.Struct(">BI")
_GRPC_PREFIX_SIZE = _GRPC_PREFIX.size
_FRAME_HEADER_SIZE = _FRAME.size
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_GOAWAY = struct.Struct(">II")

# RST_STREAM error code -> gRPC status (gRPC over HTTP/2 spec: "Errors").
_RESET_STATUS = {
    REFUSED_STREAM: UNAVAILABLE,
    CANCEL: CANCELLED,
    ENHANCE_YOUR_CALM: RESOURCE_EXHAUSTED,
    INADEQUATE_SECURITY: PERMISSION_DENIED,
}
# HTTP status -> gRPC status, for responses without grpc-status (gRPC's http-grpc-status-mapping).
_HTTP_STATUS = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}
_HTTP_OK = 200

Result = tuple[int, str, bytes | None]
"""What a call ends with: the gRPC status code, its message, and a unary call's response when the code is OK."""


class H2Error(Exception):
    """The connection could not be set up."""


class _Fields(NamedTuple):
    """What the client reads from a header block."""

    http_status: int | None
    grpc_status: int | None
    grpc_message: str


def _fields(block: bytes) -> _Fields:
    http_status: int | None = None
    grpc_status: int | None = None
    message = ""
    for name, value in decode_block(block):
        if name == ":status" and value.isdigit():
            http_status = int(value)
        elif name == "grpc-status" and value.isdigit():
            grpc_status = int(value)
        elif name == "grpc-message":
            message = urllib.parse.unquote(value, errors="replace")
    return _Fields(http_status, grpc_status, message)


def grpc_timeout(seconds: float) -> str:
    """The ``grpc-timeout`` header value of a deadline: the finest unit with at most eight digits."""
    for unit, per_second in _TIMEOUT_UNITS:
        # Rounded first, so that float noise (0.1 s is 100.00000000000001 ms) does not add a unit.
        value = math.ceil(round(seconds * per_second, 6))
        if value <= _TIMEOUT_DIGITS_MAX:
            return f"{value}{unit}"
    return f"{_TIMEOUT_DIGITS_MAX}H"


def request_block(path: str, authority: str, *, token: str = "", timeout_s: float = 0.0) -> bytes:
    """The HPACK block of a gRPC request's headers; the same bytes serve every call of the method."""
    fields = [
        encode_field(":method", "POST"),
        encode_field(":scheme", "http"),
        encode_field(":path", path),
        encode_field(":authority", authority),
        encode_field("content-type", "application/grpc"),
        encode_field("te", "trailers"),
    ]
    if timeout_s > 0:
        fields.append(encode_field("grpc-timeout", grpc_timeout(timeout_s)))
    if token:
        fields.append(encode_field("authorization", f"Bearer {token}", sensitive=True))
    return b"".join(fields)


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _FRAME.pack(len(payload) << 8 | kind, flags, stream_id) + payload


class ReadPacer:
    """Resumes reading on the connections that paused, all together, at most once per ``interval_s``.

    A connection pauses after a read that leaves at least ``awaited_min`` answers awaited on it (fewer, and
    the server could run out of calls to answer while we wait). Resuming every paused connection at the same
    tick makes their reads land in one wake-up of the process.
    """

    def __init__(self, interval_s: float, awaited_min: int) -> None:
        if interval_s <= 0 or awaited_min < 1:
            raise ValueError("a read pacer needs a positive interval and at least one awaited answer")
        self.interval_s = interval_s
        self.awaited_min = awaited_min
        self._paused: list[H2Client] = []
        self._tick: asyncio.TimerHandle | None = None

    def paused(self, client: H2Client) -> None:
        """A connection paused reading: resume it at the next tick."""
        self._paused.append(client)
        if self._tick is None:
            self._tick = asyncio.get_running_loop().call_later(self.interval_s, self._resume)

    def _resume(self) -> None:
        self._tick = None
        paused, self._paused = self._paused, []
        for client in paused:
            client.resume_reading()


class H2Stream:
    """One gRPC call on a connection: a unary call, or a bidirectional stream the caller writes to.

    A bidirectional stream hands each message it receives to ``on_message`` (from the connection's
    ``data_received``: it must not block); ``finished`` resolves to the call's :data:`Result` when it ends.
    """

    __slots__ = (
        "_client",
        "awaited",
        "deadline",
        "end_queued",
        "finished",
        "http_status",
        "id",
        "inbox",
        "local_closed",
        "on_message",
        "outbox",
        "response",
        "send_window",
        "unacked",
    )

    def __init__(
        self,
        client: H2Client,
        stream_id: int,
        finished: asyncio.Future[Result],
        deadline: float,
        on_message: Callable[[bytes], None] | None,
    ) -> None:
        self._client = client
        self.id = stream_id
        self.finished = finished
        self.deadline = deadline
        self.on_message = on_message
        # The last message received (unary calls keep it instead of calling on_message).
        self.response: bytes | None = None
        # Received bytes of a message not yet complete.
        self.inbox = b""
        # Bytes waiting for the server's window, and whether END_STREAM follows them.
        self.outbox = bytearray()
        self.end_queued = False
        self.local_closed = False
        self.send_window = client.peer_initial_window
        # Bytes received since our last WINDOW_UPDATE of this stream.
        self.unacked = 0
        # Answers still expected: a unary call's one, or a bidirectional stream's messages sent less received.
        self.awaited = 0
        # The HTTP status of the response headers (a non-200 one decides the gRPC status if trailers lack it).
        self.http_status: int | None = None

    def write(self, message: bytes) -> None:
        """Send one gRPC message (queued while the server's flow-control windows are full).

        Nothing bounds the queue: the caller bounds what it has in flight. Each message is taken to await one
        answer (for the client's read pause).
        """
        self._client.send_message(self, message, end=False)
        self._client.awaiting(self, 1)

    def end(self) -> None:
        """Half-close: no more messages from us."""
        self._client.send_end(self)

    def cancel(self) -> None:
        """Reset the stream; ``finished`` resolves to CANCELLED."""
        self._client.reset(self, CANCEL, CANCELLED, "cancelled by the client")


class H2Client(asyncio.Protocol):
    """One HTTP/2 connection to a gRPC server, carrying unary calls and bidirectional streams.

    Make one with :func:`connect`. ``token`` is sent as a bearer token, ``timeout_s`` is each unary call's
    deadline, ``window`` the flow-control window we grant the server (per stream and for the connection).
    With a ``pacer``, a read after which at least ``pacer.awaited_min`` answers are still awaited is followed
    by no reading until the pacer's next tick.
    """

    def __init__(
        self,
        authority: str,
        *,
        token: str = "",
        timeout_s: float = 0.0,
        window: int = WINDOW_MAX,
        pacer: ReadPacer | None = None,
    ) -> None:
        if not DEFAULT_WINDOW <= window <= WINDOW_MAX:
            raise ValueError(f"the window must be from {DEFAULT_WINDOW:,} to {WINDOW_MAX:,} bytes")
        self._authority = authority
        self._token = token
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._inbound = b""
        self._streams: dict[int, H2Stream] = {}
        self._next_id = 1
        # Per path: the HEADERS frame's first five octets (length, type, flags) and its block.
        self._requests: dict[str, tuple[bytes, bytes]] = {}
        self._header_cache: dict[bytes, _Fields] = {}
        # A header block continued in CONTINUATION frames: (stream id, HEADERS flags, fragments so far).
        self._continued: tuple[int, int, bytearray] | None = None
        # Ours: the window we grant, and what was received since the last connection WINDOW_UPDATE.
        self._window = window
        self._unacked = 0
        # The server's: its limits and the connection's send window.
        self.peer_initial_window = DEFAULT_WINDOW
        self._send_window = DEFAULT_WINDOW
        self._frame_size = DEFAULT_FRAME_SIZE
        self._stream_limit = DEFAULT_STREAMS
        # Streams with bytes waiting for window, in the order they blocked.
        self._blocked: dict[int, H2Stream] = {}
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        # Why new calls fail at once (the connection is lost, closed or going away); empty while usable.
        self._error = ""
        self._sweeper: asyncio.TimerHandle | None = None
        # Answers awaited over all streams, and the read pause that depends on them.
        self._awaited = 0
        self._pacer = pacer
        self.reading_paused = False

    # ------------------------------------------------------------------------------------------------
    # The calls.

    @property
    def usable(self) -> bool:
        """Whether new calls may start on this connection."""
        return not self._error

    @property
    def active_streams(self) -> int:
        """How many calls are open."""
        return len(self._streams)

    @property
    def connection_send_window(self) -> int:
        """How many DATA bytes the server's connection window lets us send now."""
        return self._send_window

    async def unary(self, path: str, message: bytes) -> Result:
        """One unary call: its status, the status message and the response message (only when OK)."""
        if len(self._streams) >= self._stream_limit or self._next_id > STREAM_ID_MAX:
            await self._admit()
        if self._error:
            return UNAVAILABLE, self._error, None
        deadline = self._loop.time() + self._timeout_s if self._timeout_s > 0 else math.inf
        stream = self._open(path, deadline, None)
        stream.awaited = 1
        self._awaited += 1
        self.send_message(stream, message, end=True)
        try:
            result = await stream.finished
        except asyncio.CancelledError:
            self.reset(stream, CANCEL, CANCELLED, "cancelled by the client")
            raise
        if result[0] == OK and result[2] is None:
            return INTERNAL, "the server sent no response message", None
        return result

    async def open_stream(self, path: str, on_message: Callable[[bytes], None]) -> H2Stream:
        """Open a bidirectional stream (no deadline); if the connection is unusable it is finished at once."""
        await self._admit()
        if self._error:
            finished: asyncio.Future[Result] = self._loop.create_future()
            finished.set_result((UNAVAILABLE, self._error, None))
            return H2Stream(self, 0, finished, math.inf, on_message)
        return self._open(path, math.inf, on_message)

    async def _admit(self) -> None:
        """Wait until the server allows one more stream (or the connection is unusable)."""
        while len(self._streams) >= self._stream_limit and not self._error:
            waiter = self._loop.create_future()
            self._slot_waiters.append(waiter)
            await waiter
        if self._next_id > STREAM_ID_MAX and not self._error:
            self._error = "the connection has used up its stream ids"
            if not self._streams and self._transport is not None:
                self._transport.close()

    def _wake_waiters(self) -> None:
        while self._slot_waiters and (len(self._streams) < self._stream_limit or self._error):
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _open(self, path: str, deadline: float, on_message: Callable[[bytes], None] | None) -> H2Stream:
        stream_id = self._next_id
        self._next_id += 2
        request = self._requests.get(path) or self._request(path)
        stream = H2Stream(self, stream_id, self._loop.create_future(), deadline, on_message)
        self._streams[stream_id] = stream
        self._write(request[0] + _U32.pack(stream_id) + request[1])
        return stream

    def awaiting(self, stream: H2Stream, answers: int) -> None:
        """Count answers a stream now awaits (negative: received)."""
        if stream.id in self._streams:
            stream.awaited += answers
            self._awaited += answers

    def _request(self, path: str) -> tuple[bytes, bytes]:
        block = request_block(path, self._authority, token=self._token, timeout_s=self._timeout_s)
        if len(block) > DEFAULT_FRAME_SIZE:
            raise ValueError(f"the request headers of {path} take {len(block)} bytes, more than one frame")
        head = _FRAME.pack(len(block) << 8 | HEADERS, END_HEADERS, 0)[:5]
        self._requests[path] = head, block
        return head, block

    def send_message(self, stream: H2Stream, message: bytes, *, end: bool) -> None:
        """Send one gRPC message on a stream, with END_STREAM if ``end``."""
        if stream.local_closed or stream.end_queued or stream.finished.done():
            return
        size = len(message) + _GRPC_PREFIX_SIZE
        if not stream.outbox and size <= stream.send_window and size <= self._send_window and size <= self._frame_size:
            stream.send_window -= size
            self._send_window -= size
            flags = END_STREAM if end else 0
            self._write(_DATA_MESSAGE.pack(size << 8 | DATA, flags, stream.id, 0, len(message)) + message)
            stream.local_closed = end
            return
        stream.outbox += _GRPC_PREFIX.pack(0, len(message))
        stream.outbox += message
        stream.end_queued = end
        self._blocked[stream.id] = stream
        self._send_blocked()

    def send_end(self, stream: H2Stream) -> None:
        """Half-close a stream (after whatever it still has queued)."""
        if stream.local_closed or stream.end_queued or stream.finished.done():
            return
        if stream.outbox:
            stream.end_queued = True
            return
        stream.local_closed = True
        self._write(_frame(DATA, END_STREAM, stream.id))

    def _send_blocked(self) -> None:
        """Send what the windows now allow of the queued bytes, stream by stream in the order they blocked."""
        for stream_id, stream in list(self._blocked.items()):
            while stream.outbox and self._send_window > 0 and stream.send_window > 0:
                size = min(len(stream.outbox), self._send_window, stream.send_window, self._frame_size)
                chunk = bytes(stream.outbox[:size])
                del stream.outbox[:size]
                stream.send_window -= size
                self._send_window -= size
                last = not stream.outbox and stream.end_queued
                self._write(_frame(DATA, END_STREAM if last else 0, stream_id, chunk))
                stream.local_closed = last
            if not stream.outbox:
                del self._blocked[stream_id]
            if self._send_window <= 0:
                return

    def reset(self, stream: H2Stream, error_code: int, status: int, message: str) -> None:
        """End a stream with RST_STREAM and finish it with ``status``."""
        if stream.id in self._streams:
            self._write(_frame(RST_STREAM, 0, stream.id, _U32.pack(error_code)))
        self._finish(stream, status, message)

    def _finish(self, stream: H2Stream, status: int, message: str) -> None:
        if self._streams.pop(stream.id, None) is None:
            return
        self._blocked.pop(stream.id, None)
        self._awaited -= stream.awaited
        stream.awaited = 0
        if not stream.finished.done():
            stream.finished.set_result((status, message, stream.response if status == OK else None))
        if self._slot_waiters:
            self._wake_waiters()
        if self._error and not self._streams and self._transport is not None:
            # Going away and nothing left to wait for.
            self._transport.close()

    def _fail_all(self, status: int, message: str, *, above: int = 0) -> None:
        """Finish every stream (with an id above ``above``) and refuse new calls."""
        self._error = self._error or message
        for stream in [stream for stream_id, stream in self._streams.items() if stream_id > above]:
            self._finish(stream, status, message)
        self._wake_waiters()

    # ------------------------------------------------------------------------------------------------
    # Closing.

    def close(self) -> None:
        """Say GOAWAY, fail the open calls with CANCELLED and close the connection."""
        if self._transport is None or self._transport.is_closing():
            return
        self._write(_frame(GOAWAY, 0, 0, _GOAWAY.pack(0, NO_ERROR)))
        self._flush()
        self._fail_all(CANCELLED, "the client closed the connection")
        self._transport.close()

    async def aclose(self) -> None:
        """Close and wait until the connection is gone."""
        self.close()
        await asyncio.shield(self.closed)

    # ------------------------------------------------------------------------------------------------
    # asyncio.Protocol.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the preface, our SETTINGS and the connection window."""
        # create_connection gives a stream transport (uvloop's is not an asyncio.Transport subclass).
        self._transport = cast("asyncio.Transport", transport)
        settings = (
            _SETTING.pack(SETTINGS_HEADER_TABLE_SIZE, 0)
            + _SETTING.pack(SETTINGS_ENABLE_PUSH, 0)
            + _SETTING.pack(SETTINGS_INITIAL_WINDOW_SIZE, self._window)
        )
        self._write(PREFACE + _frame(SETTINGS, 0, 0, settings))
        if self._window > DEFAULT_WINDOW:
            self._write(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._window - DEFAULT_WINDOW)))
        if self._timeout_s > 0:
            self._sweeper = self._loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail whatever is still open."""
        reason = f"connection lost: {exc}" if exc else "connection closed"
        self._fail_all(UNAVAILABLE, reason)
        if self._sweeper is not None:
            self._sweeper.cancel()
        if not self.ready.done():
            self.ready.set_exception(H2Error(reason))
            self.ready.exception()  # Retrieved here: nobody may be waiting any more.
        if not self.closed.done():
            self.closed.set_result(None)

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def _sweep(self) -> None:
        now = self._loop.time()
        for stream in [stream for stream in self._streams.values() if stream.deadline <= now]:
            self.reset(stream, CANCEL, DEADLINE_EXCEEDED, f"deadline of {self._timeout_s:g} s exceeded")
        self._sweeper = self._loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    def data_received(self, data: bytes) -> None:
        """Handle every whole frame received; keep the rest for the next read."""
        if self._inbound:
            data = self._inbound + data
        offset = 0
        end = len(data)
        streams = self._streams
        while end - offset >= _FRAME_HEADER_SIZE:
            word, flags, stream_id = _FRAME.unpack_from(data, offset)
            length = word >> 8
            start = offset + _FRAME_HEADER_SIZE
            stop = start + length
            if length > DEFAULT_FRAME_SIZE:
                # We leave SETTINGS_MAX_FRAME_SIZE at its default: no frame may be larger.
                self._abort(FRAME_SIZE_ERROR, f"a {length}-byte frame, above the {DEFAULT_FRAME_SIZE} allowed")
                return
            if stop > end:
                break
            offset = stop
            kind = word & 0xFF
            stream_id &= STREAM_ID_MAX
            if self._continued is not None and kind != CONTINUATION:
                self._abort(PROTOCOL_ERROR, "a header block was interrupted")
                return
            if kind == DATA:
                self._data(streams.get(stream_id), flags, length, data[start:stop])
            elif kind == HEADERS:
                self._headers(stream_id, flags, data[start:stop])
            else:
                self._control(kind, flags, stream_id, data[start:stop])
            if self._transport is None or self._transport.is_closing():
                return
        self._inbound = data[offset:]
        if not self._flush_scheduled:
            # Scheduled after the wake-ups of the calls this read finished: the next calls they start go out
            # with whatever this read made us send, in one write, in the loop's next turn.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        pacer = self._pacer
        if pacer is not None and self._awaited >= pacer.awaited_min and not self.reading_paused:
            self.pause_reading()
            pacer.paused(self)

    def pause_reading(self) -> None:
        """Stop reading (the read pause)."""
        self.reading_paused = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        """Read again."""
        self.reading_paused = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _data(self, stream: H2Stream | None, flags: int, length: int, payload: bytes) -> None:
        # Flow control counts the whole payload, padding too, whether or not the stream is still open.
        self._unacked += length
        if self._unacked >= self._window >> 1:
            self._write(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._unacked)))
            self._unacked = 0
        if stream is None:
            return
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        if flags & END_STREAM:
            self._messages(stream, payload)
            self._ended(stream, INTERNAL, "the server ended the stream without trailers")
            return
        stream.unacked += length
        if stream.unacked >= self._window >> 1:
            self._write(_frame(WINDOW_UPDATE, 0, stream.id, _U32.pack(stream.unacked)))
            stream.unacked = 0
        self._messages(stream, payload)

    def _messages(self, stream: H2Stream, payload: bytes) -> None:
        """Take the whole gRPC messages out of a stream's received bytes."""
        if stream.inbox:
            payload = stream.inbox + payload
        offset = 0
        end = len(payload)
        while end - offset >= _GRPC_PREFIX_SIZE:
            compressed, size = _GRPC_PREFIX.unpack_from(payload, offset)
            if compressed or size > MESSAGE_SIZE_MAX:
                why = "a compressed message" if compressed else f"a {size}-byte message"
                self.reset(stream, CANCEL, INTERNAL, f"{why}, which this client does not take")
                return
            stop = offset + _GRPC_PREFIX_SIZE + size
            if stop > end:
                break
            message = payload[offset + _GRPC_PREFIX_SIZE : stop]
            offset = stop
            if stream.on_message is None:
                stream.response = message
            else:
                if stream.awaited:
                    stream.awaited -= 1
                    self._awaited -= 1
                stream.on_message(message)
        stream.inbox = payload[offset:]

    def _headers(self, stream_id: int, flags: int, fragment: bytes) -> None:
        if flags & PADDED:
            fragment = fragment[1 : len(fragment) - fragment[0]]
        if flags & PRIORITY_FLAG:
            fragment = fragment[5:]
        if flags & END_HEADERS:
            self._header_block(stream_id, flags, fragment)
        else:
            self._continued = (stream_id, flags, bytearray(fragment))

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        fields = self._header_cache.get(block)
        if fields is None:
            try:
                fields = _fields(block)
            except HpackError as error:
                self._abort(COMPRESSION_ERROR, f"undecodable headers: {error}")
                return
            if len(self._header_cache) < HEADER_CACHE_MAX:
                self._header_cache[block] = fields
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if fields.http_status is not None:
            stream.http_status = fields.http_status
        if not flags & END_STREAM:
            return
        if fields.grpc_status is not None:
            self._ended(stream, fields.grpc_status, fields.grpc_message)
        elif stream.http_status is not None and stream.http_status != _HTTP_OK:
            status = _HTTP_STATUS.get(stream.http_status, UNKNOWN)
            self._ended(stream, status, f"HTTP status {stream.http_status}")
        else:
            self._ended(stream, UNKNOWN, "the server's trailers have no grpc-status")

    def _ended(self, stream: H2Stream, status: int, message: str) -> None:
        """The server ended a stream (END_STREAM)."""
        if not stream.local_closed and stream.id in self._streams:
            # It answered before we finished sending: we will send no more, and the stream closes now.
            self._write(_frame(RST_STREAM, 0, stream.id, _U32.pack(NO_ERROR)))
        self._finish(stream, status, message)

    def _control(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        """Every frame but DATA and HEADERS (unknown types and PRIORITY are ignored, as RFC 9113 asks)."""
        if kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
        elif kind == PING:
            if not flags & ACK:
                self._write(_frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == RST_STREAM:
            stream = self._streams.get(stream_id)
            if stream is not None:
                (code,) = _U32.unpack_from(payload)
                status = _RESET_STATUS.get(code, INTERNAL)
                self._finish(stream, status, f"stream reset by the server (HTTP/2 error {code})")
        elif kind == GOAWAY:
            last_stream_id, code = _GOAWAY.unpack_from(payload)
            detail = payload[_GOAWAY.size :].decode("utf-8", "replace")
            self._fail_all(
                UNAVAILABLE,
                f"the server sent GOAWAY (HTTP/2 error {code}) {detail}".strip(),
                above=last_stream_id & STREAM_ID_MAX,
            )
            if not self._streams and self._transport is not None:
                self._transport.close()
        elif kind == CONTINUATION:
            self._continuation(stream_id, flags, payload)
        elif kind == PUSH_PROMISE:
            self._abort(PROTOCOL_ERROR, "PUSH_PROMISE, though we disabled push")

    def _continuation(self, stream_id: int, flags: int, fragment: bytes) -> None:
        if self._continued is None or self._continued[0] != stream_id:
            self._abort(PROTOCOL_ERROR, "a CONTINUATION frame without its HEADERS")
            return
        self._continued[2].extend(fragment)
        if flags & END_HEADERS:
            _, header_flags, block = self._continued
            self._continued = None
            self._header_block(stream_id, header_flags, bytes(block))

    def _settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload) - _SETTING.size + 1, _SETTING.size):
            identifier, value = _SETTING.unpack_from(payload, offset)
            if identifier == SETTINGS_MAX_CONCURRENT_STREAMS:
                self._stream_limit = value
            elif identifier == SETTINGS_INITIAL_WINDOW_SIZE:
                # The change applies to every open stream's window (RFC 9113 section 6.9.2).
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
            elif identifier == SETTINGS_MAX_FRAME_SIZE:
                self._frame_size = value
        self._write(_frame(SETTINGS, ACK, 0))
        if not self.ready.done():
            self.ready.set_result(None)
        self._send_blocked()
        self._wake_waiters()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        (increment,) = _U32.unpack_from(payload)
        increment &= WINDOW_MAX
        if stream_id == 0:
            self._send_window += increment
            if self._send_window > WINDOW_MAX:
                self._abort(FLOW_CONTROL_ERROR, "the connection window grew past 2^31-1")
                return
        else:
            stream = self._streams.get(stream_id)
            if stream is None:
                return
            stream.send_window += increment
        if self._blocked:
            self._send_blocked()

    def _abort(self, error_code: int, reason: str) -> None:
        """A connection error: GOAWAY with ``error_code``, fail every call with INTERNAL, close."""
        if self._transport is None or self._transport.is_closing():
            return
        # The last stream the server opened that we processed: none (a client takes no pushed streams).
        self._write(_frame(GOAWAY, 0, 0, _GOAWAY.pack(0, error_code) + reason.encode()))
        self._flush()
        self._fail_all(INTERNAL, f"protocol error: {reason}")
        self._transport.close()


async def connect(
    host: str,
    port: int,
    *,
    token: str = "",
    timeout_s: float = 0.0,
    window: int = WINDOW_MAX,
    pacer: ReadPacer | None = None,
    connect_timeout_s: float = 10.0,
) -> H2Client:
    """Open a connection and wait for the server's SETTINGS; raises :class:`H2Error` or ``OSError``.

    The other keyword arguments are :class:`H2Client`'s.
    """
    loop = asyncio.get_running_loop()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def protocol() -> H2Client:
        return H2Client(
            authority,
            token=token,
            timeout_s=timeout_s,
            window=window,
            pacer=pacer,
        )

    _, client = await asyncio.wait_for(loop.create_connection(protocol, host, port), connect_timeout_s)
    try:
        await asyncio.wait_for(asyncio.shield(client.ready), connect_timeout_s)
    except (TimeoutError, H2Error):
        await client.aclose()
        raise
    return client


def parse_target(target: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) as a host and a port."""
    host, separator, port = target.rpartition(":")
    if not separator or not port.isdigit():
        raise ValueError(f"{target!r} is not host:port")
    return host.removeprefix("[").removesuffix("]"), int(port)
