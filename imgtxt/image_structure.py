"""Where a PNG or JPEG file is broken: a walk over its chunks or marker segments that names the first damaged one.

Pillow's own errors say only that a file is "truncated" or "not identified" (a PNG whose header chunk fails its CRC is
reported as no image at all); these walks give the caller's error message the chunk or segment and its byte offset.
"""

from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8"
_JPEG_MARKERS = {0xC4: "DHT", 0xCC: "DAC", 0xDA: "SOS", 0xDB: "DQT", 0xDD: "DRI", 0xFE: "COM"}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0..7 carry no length


def png_damage(data: bytes) -> str | None:
    """What is wrong with the chunk structure of PNG bytes, or None when every chunk up to IEND is whole and its CRC
    matches.

    Trailing bytes after IEND are allowed (as libpng allows them); a file without IEND is truncated.
    """
    n, pos, last = len(data), len(PNG_SIGNATURE), "the signature"
    while True:
        if pos == n:
            return f"truncated: it ends at byte {n}, after {last}, without the IEND chunk"
        if pos + 8 > n:
            return f"truncated: it ends at byte {n}, inside the header of the chunk at byte offset {pos}"
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        name = kind.decode("latin-1")
        if not kind.isalpha() or not kind.isascii():
            return f"corrupt: the chunk at byte offset {pos} has an invalid type {kind!r}"
        if length > 0x7FFFFFFF:
            return f"corrupt: chunk {name!r} at byte offset {pos} declares an invalid length {length}"
        end = pos + 12 + length
        if end > n:
            got = max(0, n - pos - 8)
            return (
                f"truncated: chunk {name!r} at byte offset {pos} declares {length} data bytes (+4 CRC), "
                f"but the file ends {got} bytes into them, at byte {n}"
            )
        stored = struct.unpack(">I", data[end - 4 : end])[0]
        computed = zlib.crc32(data[pos + 4 : end - 4])
        if stored != computed:
            return (
                f"corrupt: chunk {name!r} at byte offset {pos} ({length} data bytes) fails its CRC check "
                f"(stored 0x{stored:08x}, computed 0x{computed:08x})"
            )
        if kind == b"IEND":
            return None
        pos, last = end, f"chunk {name!r} at byte offset {pos}"


def _jpeg_marker_name(marker: int) -> str:
    if marker in _JPEG_MARKERS:
        return _JPEG_MARKERS[marker]
    if 0xC0 <= marker <= 0xCF:
        return f"SOF{marker - 0xC0}"
    if 0xE0 <= marker <= 0xEF:
        return f"APP{marker - 0xE0}"
    return f"0xFF{marker:02X}"


def jpeg_damage(data: bytes) -> str | None:
    """What is wrong with the marker structure of JPEG bytes, or None when the segments are whole up to the
    end-of-image marker (EOI).

    Only the framing is checked (segment lengths, the markers between segments, EOI); damage inside the compressed
    scan data is left to the decoder.
    """
    n, pos = len(data), len(JPEG_SIGNATURE)
    while pos < n:
        if data[pos] != 0xFF:
            return f"corrupt: expected a marker (0xFF) at byte offset {pos}, found 0x{data[pos]:02X}"
        while pos + 1 < n and data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos + 1 >= n:
            return f"truncated: it ends at byte {n}, inside the marker at byte offset {pos}"
        marker = data[pos + 1]
        if marker == 0xD9:
            return None
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        name = _jpeg_marker_name(marker)
        if pos + 4 > n:
            return f"truncated: it ends at byte {n}, inside the length of segment {name} at byte offset {pos}"
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if length < 2:
            return f"corrupt: segment {name} at byte offset {pos} declares an invalid length {length}"
        end = pos + 2 + length
        if end > n:
            return (
                f"truncated: segment {name} at byte offset {pos} declares {length} bytes, "
                f"but the file ends {n - pos - 2} bytes into them, at byte {n}"
            )
        if marker != 0xDA:
            pos = end
            continue
        # Entropy-coded scan data runs to the next marker that is neither a stuffed 0xFF00 nor a restart marker.
        scan, pos = end, end
        while True:
            pos = data.find(b"\xff", pos)
            if pos < 0 or pos + 1 >= n:
                return (
                    f"truncated: the compressed scan data starting at byte offset {scan} ends at byte {n} "
                    "without the end-of-image marker (EOI)"
                )
            if data[pos + 1] != 0x00 and not 0xD0 <= data[pos + 1] <= 0xD7 and data[pos + 1] != 0xFF:
                break
            pos += 1 if data[pos + 1] == 0xFF else 2
    return f"truncated: it ends at byte {n} without the end-of-image marker (EOI)"
