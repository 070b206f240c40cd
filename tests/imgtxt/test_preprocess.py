"""Image preprocessing: decoding of every accepted format and mode, limits, resize rules, golden tensor values."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgtxt.errors import InvalidInput, LimitExceeded
from imgtxt.preprocess import (
    ImageLimits,
    ImagePreprocessConfig,
    decode_image,
    preprocess_image,
    random_resized_crop,
    resize_image,
    to_array,
    to_rgb,
)


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_constant_colour_gives_exact_normalised_values() -> None:
    cfg = ImagePreprocessConfig(image_size=32)
    data = _encode(Image.new("RGB", (50, 40), (255, 128, 0)), "PNG")
    arr = preprocess_image(data, cfg)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), cfg.mean, cfg.std, strict=True)]
    np.testing.assert_allclose(arr.reshape(3, -1).mean(1), expected, atol=1e-5)
    np.testing.assert_allclose(arr.reshape(3, -1).std(1), 0, atol=1e-5)


def test_shorter_side_centre_crop_keeps_the_middle() -> None:
    # Left third red, middle third green, right third blue: a centre crop of the shorter side sees only green.
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 255, 0), (100, 0, 200, 100))
    img.paste((0, 0, 255), (200, 0, 300, 100))
    cfg = ImagePreprocessConfig(image_size=20, interpolation="bilinear")
    out = np.asarray(resize_image(img, cfg))
    assert out.shape == (20, 20, 3)
    assert (out[:, 2:-2, 1] > 250).all() and (out[:, 2:-2, 0] < 5).all()
    squashed = np.asarray(resize_image(img, ImagePreprocessConfig(image_size=30, resize="squash")))
    assert (squashed[:, 2, 0] > 250).all() and (squashed[:, -3, 2] > 250).all()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_every_accepted_format_decodes_to_rgb(fmt: str) -> None:
    img = decode_image(_encode(Image.new("RGB", (40, 30), (10, 200, 30)), fmt))
    assert img.mode == "RGB" and img.size == (40, 30)
    assert abs(int(np.asarray(img)[15, 20, 1]) - 200) < 12  # lossy formats stay close


def test_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert np.asarray(decode_image(buf.getvalue()))[8, 8, 0] > 200


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    assert decode_image(_encode(img, "JPEG", exif=exif)).size == (20, 60)


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(decode_image(_encode(rgba, "PNG")))[4, 4].tolist() == [255, 255, 255]


ACCEPTED = r"JPEG, PNG, WEBP, GIF"


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", InvalidInput, rf"empty \(0 bytes\); send an image file \({ACCEPTED}\)"),
        (
            b"this is not an image at all",
            InvalidInput,
            rf"image data \(27 bytes, starting b'this is '\) is not an image file in an accepted format \({ACCEPTED}\)",
        ),
        (None, InvalidInput, r"JPEG image data \(200 bytes\) is truncated: segment \w+ at byte offset \d+ declares"),
        (_png_claiming_size(100_000, 100_000), LimitExceeded, "max_image_pixels=40000000"),
        (b"\xff" * 2048, LimitExceeded, "max_image_bytes=1024"),
    ],
)
def test_bad_bytes_raise_clear_errors(data: bytes | None, error: type[Exception], message: str) -> None:
    if data is None:
        data = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:200]
    limits = ImageLimits(max_image_bytes=1024) if len(data) == 2048 else ImageLimits()
    with pytest.raises(error, match=message) as err:
        decode_image(data, limits)
    assert "BytesIO" not in str(err.value) and " at 0x" not in str(err.value)


def _noise(fmt: str, **kw: object) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels), fmt, **kw)


def _png_chunks(data: bytes) -> dict[bytes, tuple[int, int]]:
    """Each chunk type of a PNG -> (byte offset of its chunk, its data length), read independently of the code."""
    out, pos = {}, 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        out.setdefault(kind, (pos, length))
        pos += 12 + length
    return out


def _flip(data: bytes, offset: int) -> bytes:
    broken = bytearray(data)
    broken[offset] ^= 0xFF
    return bytes(broken)


def test_png_with_a_bad_crc_names_the_chunk_and_its_offset() -> None:
    png = _noise("PNG")
    (ihdr_at, ihdr_len), (idat_at, idat_len) = _png_chunks(png)[b"IHDR"], _png_chunks(png)[b"IDAT"]
    # The header's CRC: Pillow alone called this "not an image file in an accepted format".
    with pytest.raises(
        InvalidInput,
        match=rf"^PNG image data \({len(png)} bytes\) is corrupt: chunk 'IHDR' at byte "
        rf"offset {ihdr_at} \(13 data bytes\) fails its CRC check \(stored 0x[0-9a-f]{{8}}, computed",
    ):
        decode_image(_flip(png, ihdr_at + 8 + ihdr_len))
    # A flipped pixel-data byte: Pillow alone decoded a wrong picture without a word.
    with pytest.raises(InvalidInput, match=f"is corrupt: chunk 'IDAT' at byte offset {idat_at} .* fails its CRC check"):
        decode_image(_flip(png, idat_at + 8 + idat_len // 2))
    assert decode_image(png + b"trailing bytes after IEND").size == (32, 24)  # as libpng allows


def test_truncated_png_names_where_it_ends() -> None:
    png = _noise("PNG")
    chunks = _png_chunks(png)
    (idat, idat_len), iend = chunks[b"IDAT"], chunks[b"IEND"][0]
    with pytest.raises(InvalidInput, match="truncated: chunk 'IHDR' at byte offset 8 declares 13 data bytes"):
        decode_image(png[:20])
    cut = idat + 30
    with pytest.raises(
        InvalidInput,
        match=f"truncated: chunk 'IDAT' at byte offset {idat} declares {idat_len} data bytes .* at byte {cut}",
    ):
        decode_image(png[:cut])
    # Only IEND missing: Pillow alone decoded it.
    with pytest.raises(InvalidInput, match=f"after chunk 'IDAT' at byte offset {idat}, without the IEND chunk"):
        decode_image(png[:iend])


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_names_where_it_ends(progressive: bool) -> None:
    jpeg = _noise("JPEG", progressive=progressive)
    scan = jpeg.rindex(b"\xff\xda")  # the last start-of-scan segment (a progressive JPEG has several)
    scan_data = scan + 2 + struct.unpack(">H", jpeg[scan + 2 : scan + 4])[0]
    with pytest.raises(InvalidInput, match=r"^JPEG image data \(3 bytes\) is truncated: it ends at byte 3"):
        decode_image(jpeg[:3])  # Pillow alone: "not an image file in an accepted format"
    with pytest.raises(InvalidInput, match=f"is truncated: segment SOS at byte offset {scan} declares"):
        decode_image(jpeg[: scan + 6])
    cut = len(jpeg) - 2  # no end-of-image marker
    with pytest.raises(InvalidInput, match=f"scan data starting at byte offset {scan_data} ends at byte {cut} without"):
        decode_image(jpeg[:cut])


def test_unaccepted_format_is_rejected() -> None:
    with pytest.raises(InvalidInput, match=f"format 'BMP' is not accepted; accepted formats: {ACCEPTED}$"):
        decode_image(_encode(Image.new("RGB", (4, 4)), "BMP"))


# Every mode is checked against the 8-bit RGB picture it shows, through the whole preprocessing (a 48x40 picture
# resized to 32, so neighbouring pixels mix). Exact conversions must agree to float rounding; composites of
# transparency may differ by one 8-bit level before the resize (Pillow's integer compositing vs the float reference
# below), which bicubic resampling can grow to at most 1.5 levels.
MODES_CFG = ImagePreprocessConfig(image_size=32)
LEVEL = 1 / 255 / min(MODES_CFG.std)
"""One 8-bit level, in normalised tensor units."""
H, W = 40, 48
_y, _x = np.mgrid[0:H, 0:W]
GREY = ((_x * 255 // (W - 1) + 40 * (_y // 8 % 2)) % 256).astype(np.uint8)
"""A horizontal ramp over a few horizontal stripes, every level 0..255 present."""
COLOUR = np.stack([GREY, GREY[::-1, ::-1], (_y * 255 // (H - 1)).astype(np.uint8)], axis=-1)
ALPHA = np.clip((_y * 300 // (H - 1)) - 20, 0, 255).astype(np.uint8)
"""Fully transparent at the top, fully opaque at the bottom, every degree between."""


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return np.rint(rgb * a + 255 * (1 - a)).astype(np.uint8)


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def _with_transparent(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = rgb.copy()
    out[mask] = 255
    return out


def _palette_picture() -> tuple[Image.Image, np.ndarray]:
    """A palette image of COLOUR whose entry 0 is transparent, and the picture it shows."""
    pal = Image.fromarray(COLOUR).quantize(16)
    shown = _with_transparent(np.asarray(pal.convert("RGB")), np.asarray(pal) == 0)
    return pal, shown


def _cases() -> list[tuple[str, bytes | Image.Image, np.ndarray, float]]:
    """(name, encoded file or in-memory image, the 8-bit RGB picture it shows, tolerance in levels)."""
    grey16 = GREY.astype(np.uint16) * 257
    pal, pal_shown = _palette_picture()
    transparent_grey = int(GREY[0, 10])
    gif = _encode(pal, "GIF", transparency=0)
    gif_img = Image.open(io.BytesIO(gif))
    gif_shown = _with_transparent(
        np.asarray(gif_img.convert("RGB")), np.asarray(gif_img) == gif_img.info["transparency"]
    )
    colour_alpha = Image.fromarray(np.dstack([COLOUR, ALPHA]))
    grey_alpha = Image.merge("LA", (Image.fromarray(GREY), Image.fromarray(ALPHA)))
    return [
        # Files in the accepted formats.
        ("I;16 PNG", _encode(Image.fromarray(grey16), "PNG"), _rgb(GREY), 0),
        ("I;16 PNG off the 257 grid", _encode(Image.fromarray(grey16 + 100), "PNG"), _rgb(GREY), 0),
        (
            "I;16 PNG with a transparent value",
            _encode(Image.fromarray(grey16), "PNG", transparency=transparent_grey * 257),
            _with_transparent(_rgb(GREY), transparent_grey == GREY),
            0,
        ),
        (
            "L PNG with a transparent value",
            _encode(Image.fromarray(GREY), "PNG", transparency=transparent_grey),
            _with_transparent(_rgb(GREY), transparent_grey == GREY),
            0,
        ),
        (
            "RGB PNG with a transparent colour",
            _encode(Image.fromarray(COLOUR), "PNG", transparency=tuple(int(v) for v in COLOUR[0, 10])),
            _with_transparent(COLOUR, (COLOUR[0, 10] == COLOUR).all(-1)),
            0,
        ),
        ("LA PNG", _encode(grey_alpha, "PNG"), _over_white(_rgb(GREY), ALPHA), 1.5),
        ("RGBA PNG", _encode(colour_alpha, "PNG"), _over_white(COLOUR, ALPHA), 1.5),
        (
            "RGBA WebP (lossless)",
            _encode(colour_alpha, "WEBP", lossless=True, exact=True),
            _over_white(COLOUR, ALPHA),
            1.5,
        ),
        ("P PNG with a transparent entry", _encode(pal, "PNG", transparency=0), pal_shown, 0),
        ("P GIF with a transparent entry", gif, gif_shown, 0),
        ("CMYK JPEG", _encode(Image.fromarray(COLOUR).convert("CMYK"), "JPEG", quality=100), COLOUR, 2.5),
        # Modes no accepted file decodes to today (TIFF, for one, does): the same shared conversion.
        ("I;16B", Image.fromarray(grey16.astype(">u2")), _rgb(GREY), 0),
        ("I within 0..65535", Image.fromarray(grey16.astype(np.int32)), _rgb(GREY), 0),
        ("I outside 0..65535 (stretched)", Image.fromarray(GREY.astype(np.int32) * 1000 - 70_000), _rgb(GREY), 0),
        ("F within 0..1", Image.fromarray(GREY.astype(np.float32) / 255), _rgb(GREY), 0),
        ("F within 0..255", Image.fromarray(GREY.astype(np.float32)), _rgb(GREY), 0),
        (
            "PA",
            Image.merge("PA", (pal, Image.fromarray(ALPHA))),
            _over_white(np.asarray(pal.convert("RGB")), ALPHA),
            1.5,
        ),
    ]


CASES = _cases()


@pytest.mark.parametrize(("source", "shown", "levels"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_mode_preprocesses_like_the_8bit_rgb_picture_it_shows(
    source: bytes | Image.Image, shown: np.ndarray, levels: float
) -> None:
    expected = preprocess_image(_encode(Image.fromarray(shown), "PNG"), MODES_CFG)
    if isinstance(source, bytes):
        got = preprocess_image(source, MODES_CFG)
    else:
        got = to_array(resize_image(to_rgb(source), MODES_CFG), MODES_CFG)
    np.testing.assert_allclose(got, expected, rtol=0, atol=levels * LEVEL + 1e-5)


def test_random_resized_crop_is_seeded_and_sized() -> None:
    img = Image.effect_noise((80, 60), 50).convert("RGB")
    cfg = ImagePreprocessConfig(image_size=24)
    a = random_resized_crop(img, cfg, np.random.default_rng(3))
    b = random_resized_crop(img, cfg, np.random.default_rng(3))
    c = random_resized_crop(img, cfg, np.random.default_rng(4))
    assert a.size == (24, 24)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))


def test_golden_tensor_of_a_real_photo(flickr8k: Path) -> None:
    """A known Flickr8k photo must keep giving the same tensor: any drift in decoding or resizing shows here."""
    data = (flickr8k / "images" / "1022454332_6af2c1449a.jpg").read_bytes()
    assert hashlib.sha256(data).hexdigest().startswith("5ec6922a91520c42")
    arr = preprocess_image(data, ImagePreprocessConfig())
    assert arr.shape == (3, 224, 224)
    np.testing.assert_allclose(arr.mean(), -0.13504039, atol=1e-5)
    np.testing.assert_allclose(arr.std(), 1.153845, atol=1e-5)
    np.testing.assert_allclose(arr.reshape(3, -1).mean(1), [-0.35816002, -0.14865354, 0.10169251], atol=1e-5)
    np.testing.assert_allclose(arr[:, 100, 100], [0.27956167, 0.4327732, 0.56592613], atol=1e-5)
