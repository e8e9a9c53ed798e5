"""Pre-encoded request bytes, so the load generator spends its CPU on sending, not on building messages.

Protocol buffers parse a concatenation of two encodings as their merge, so a request is the fixed part
(wallet, amount, currency, capture; encoded once per wallet) followed by its own idempotency key field,
appended as raw bytes. The generator hands these bytes to gRPC with no serializer.
"""

from __future__ import annotations

from spendgate._gen.spendgate.v1 import spend_pb2

# Field tags (field number << 3 | wire type 2, length-delimited) of the fields appended as raw bytes.
_AUTHORIZE_IDEMPOTENCY_KEY_TAG = b"\x22"  # AuthorizeRequest.idempotency_key = 4
_STREAM_REQUEST_ID_TAG = b"\x0a"  # AuthorizeStreamRequest.request_id = 1
_STREAM_REQUEST_TAG = b"\x12"  # AuthorizeStreamRequest.request = 2

AUTHORIZE_METHOD = "/spendgate.v1.SpendService/Authorize"
CAPTURE_METHOD = "/spendgate.v1.SpendService/Capture"
STREAM_METHOD = "/spendgate.v1.SpendService/AuthorizeStream"


# The one-byte varints, which are most of them (lengths of ids and keys).
_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


def varint(value: int) -> bytes:
    """The protobuf base-128 varint encoding of a non-negative integer."""
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def length_delimited(tag: bytes, payload: bytes) -> bytes:
    """One length-delimited field: its tag, the payload's length and the payload."""
    return tag + varint(len(payload)) + payload


def authorize_prefix(wallet_id: str, amount_micros: int, currency: str, service: str, capture: bool) -> bytes:
    """The part of an AuthorizeRequest that is the same for every request of one wallet."""
    request = spend_pb2.AuthorizeRequest(
        wallet_id=wallet_id, amount_micros=amount_micros, currency=currency, service=service, capture=capture
    )
    return request.SerializeToString()


def authorize_request(prefix: bytes, idempotency_key: bytes) -> bytes:
    """An encoded AuthorizeRequest: a wallet's prefix and a fresh idempotency key."""
    return prefix + _AUTHORIZE_IDEMPOTENCY_KEY_TAG + varint(len(idempotency_key)) + idempotency_key


def stream_request(request_id: bytes, authorize: bytes) -> bytes:
    """An encoded AuthorizeStreamRequest around an encoded AuthorizeRequest."""
    return length_delimited(_STREAM_REQUEST_ID_TAG, request_id) + length_delimited(_STREAM_REQUEST_TAG, authorize)


def capture_request(authorization_id: str, amount_micros: int, idempotency_key: str) -> bytes:
    """An encoded CaptureRequest (built per call: it needs the authorization id the server returned)."""
    request = spend_pb2.CaptureRequest(
        authorization_id=authorization_id, amount_micros=amount_micros, idempotency_key=idempotency_key
    )
    return request.SerializeToString()
