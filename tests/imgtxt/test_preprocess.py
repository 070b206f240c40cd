"""Image preprocessing: decoding of every accepted format, limits, resize rules, golden tensor values."""

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


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", InvalidInput, "empty"),
        (b"this is not an image at all", InvalidInput, "could not be decoded"),
        (None, InvalidInput, "could not be decoded"),  # truncated JPEG, built below
        (_png_claiming_size(100_000, 100_000), LimitExceeded, "max_image_pixels=40000000"),
        (b"\xff" * 2048, LimitExceeded, "max_image_bytes=1024"),
    ],
)
def test_bad_bytes_raise_clear_errors(data: bytes | None, error: type[Exception], message: str) -> None:
    if data is None:
        data = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:200]
    limits = ImageLimits(max_image_bytes=1024) if len(data) == 2048 else ImageLimits()
    with pytest.raises(error, match=message):
        decode_image(data, limits)


def test_unaccepted_format_is_rejected() -> None:
    with pytest.raises(InvalidInput, match="format 'BMP' is not accepted"):
        decode_image(_encode(Image.new("RGB", (4, 4)), "BMP"))


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
