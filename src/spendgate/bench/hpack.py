"""The little of HPACK (RFC 7541) the benchmark's HTTP/2 client needs, with no dynamic table.

The client (:mod:`spendgate.bench.h2client`) announces ``SETTINGS_HEADER_TABLE_SIZE = 0``, so the server's
encoder may not keep a dynamic table: every header block stands alone. Requests are encoded once per method
with representations that need no table state (static-table indices and literals without indexing);
responses are decoded here only the first time their exact bytes are seen (the client caches the result).
A reference to a dynamic-table entry, or a table size above zero, is a :class:`HpackError`.

The Huffman code (Appendix B) is canonical, so it is given by its code lengths alone and rebuilt at import.
"""

from __future__ import annotations

# RFC 7541 Appendix A: index 1 is the first entry.
STATIC_TABLE: tuple[tuple[str, str], ...] = (
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
)
_STATIC_NAME_INDEX = {name: index for index, (name, _) in reversed(list(enumerate(STATIC_TABLE, 1)))}
_STATIC_FIELD_INDEX = {field: index for index, field in enumerate(STATIC_TABLE, 1)}

# RFC 7541 Appendix B, the code length in bits of each symbol 0..256 (256 is EOS), sixteen to a line.
# fmt: off
_HUFFMAN_CODE_LENGTHS = (
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    30,
)
# fmt: on
_EOS = 256
# Padding after the last symbol is at most seven bits, all ones (a prefix of EOS).
_PADDING_BITS_MAX = 7
# Representations (the high bits of a field's first octet) and their integer prefix sizes.
_INDEXED = 0x80
_INCREMENTAL = 0x40
_SIZE_UPDATE = 0x20
_NEVER_INDEXED = 0x10
_WITHOUT_INDEXING = 0x00
_HUFFMAN_FLAG = 0x80


class HpackError(ValueError):
    """A header block this decoder cannot or may not decode (a COMPRESSION_ERROR in HTTP/2 terms)."""


def _canonical_codes(lengths: tuple[int, ...]) -> dict[tuple[int, int], int]:
    """``(length, code) -> symbol`` of the canonical Huffman code with these code lengths."""
    table: dict[tuple[int, int], int] = {}
    code = 0
    previous = 0
    for symbol in sorted(range(len(lengths)), key=lambda s: (lengths[s], s)):
        code <<= lengths[symbol] - previous
        previous = lengths[symbol]
        table[previous, code] = symbol
        code += 1
    return table


_HUFFMAN_DECODE = _canonical_codes(_HUFFMAN_CODE_LENGTHS)


def huffman_decode(data: bytes) -> bytes:
    """Decode a Huffman-coded string literal."""
    out = bytearray()
    code = 0
    length = 0
    for octet in data:
        for shift in range(7, -1, -1):
            code = (code << 1) | ((octet >> shift) & 1)
            length += 1
            symbol = _HUFFMAN_DECODE.get((length, code))
            if symbol is None:
                continue
            if symbol == _EOS:
                raise HpackError("EOS inside a Huffman-coded string")
            out.append(symbol)
            code = 0
            length = 0
    if length > _PADDING_BITS_MAX or code != (1 << length) - 1:
        raise HpackError("bad padding at the end of a Huffman-coded string")
    return bytes(out)


def encode_integer(value: int, prefix_bits: int, flags: int = 0) -> bytes:
    """An integer with an N-bit prefix (section 5.1), the first octet's high bits set to ``flags``."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_string(text: str) -> bytes:
    data = text.encode("latin-1")
    return encode_integer(len(data), 7) + data


def encode_field(name: str, value: str, *, sensitive: bool = False) -> bytes:
    """One header field in a representation that needs no table state.

    A field the static table holds whole is its index; any other is a literal that is never added to a
    table (``sensitive``: one that intermediaries must never index either, for secrets), naming its name by
    static index where there is one.
    """
    index = _STATIC_FIELD_INDEX.get((name, value))
    if index is not None and not sensitive:
        return encode_integer(index, 7, _INDEXED)
    flags = _NEVER_INDEXED if sensitive else _WITHOUT_INDEXING
    name_index = _STATIC_NAME_INDEX.get(name, 0)
    head = encode_integer(name_index, 4, flags)
    return head + (b"" if name_index else _encode_string(name)) + _encode_string(value)


def _decode_integer(block: bytes, offset: int, prefix_bits: int) -> tuple[int, int]:
    """The integer at ``offset`` and the offset after it."""
    if offset >= len(block):
        raise HpackError("truncated header block")
    limit = (1 << prefix_bits) - 1
    value = block[offset] & limit
    offset += 1
    if value < limit:
        return value, offset
    shift = 0
    while True:
        if offset >= len(block):
            raise HpackError("truncated integer")
        octet = block[offset]
        offset += 1
        value += (octet & 0x7F) << shift
        shift += 7
        if not octet & 0x80:
            return value, offset


def _decode_string(block: bytes, offset: int) -> tuple[str, int]:
    if offset >= len(block):
        raise HpackError("truncated header block")
    huffman = block[offset] & _HUFFMAN_FLAG
    length, offset = _decode_integer(block, offset, 7)
    end = offset + length
    if end > len(block):
        raise HpackError("truncated string literal")
    data = block[offset:end]
    return (huffman_decode(data) if huffman else data).decode("latin-1"), end


def _static(index: int) -> tuple[str, str]:
    if not 1 <= index <= len(STATIC_TABLE):
        raise HpackError(f"index {index} is not in the static table (and the dynamic table is empty)")
    return STATIC_TABLE[index - 1]


def decode_block(block: bytes) -> list[tuple[str, str]]:
    """The fields of a header block encoded without a dynamic table."""
    fields: list[tuple[str, str]] = []
    offset = 0
    while offset < len(block):
        first = block[offset]
        if first & _INDEXED:
            index, offset = _decode_integer(block, offset, 7)
            fields.append(_static(index))
            continue
        if first & _INCREMENTAL:
            # Added to a table of size zero, it evicts everything and is not kept: nothing to store.
            index, offset = _decode_integer(block, offset, 6)
        elif first & _SIZE_UPDATE:
            size, offset = _decode_integer(block, offset, 5)
            if size:
                raise HpackError(f"dynamic table size update to {size}, above the announced 0")
            continue
        else:
            index, offset = _decode_integer(block, offset, 4)
        if index:
            name = _static(index)[0]
        else:
            name, offset = _decode_string(block, offset)
        value, offset = _decode_string(block, offset)
        fields.append((name, value))
    return fields
