"""Image preprocessing, written once: bytes -> decoded RGB image -> resized -> normalised float32 CHW array.

The trainer's data pipeline and the image service both call these functions, with the settings read from the model
bundle, so training-time and serving-time preprocessing cannot drift.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgtxt.errors import ConfigError, InvalidInput, LimitExceeded
from imgtxt.image_structure import JPEG_SIGNATURE, PNG_SIGNATURE, jpeg_damage, png_damage

RESIZE_RULES = ("shorter_center_crop", "squash")
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
"""Pillow format names of the image files accepted (by the services, and by the trainer's data pipeline)."""
BACKGROUND = (255, 255, 255)
"""What transparent pixels are composited over: white, as a browser or viewer shows them on a page."""
_ACCEPTED = ", ".join(ACCEPTED_FORMATS)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_FILE_OBJECT = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>")
# How each accepted format's files begin (to name the format of bytes too broken for Pillow to open).
_MAGIC = {"JPEG": (b"\xff\xd8\xff",), "PNG": (PNG_SIGNATURE,), "GIF": (b"GIF87a", b"GIF89a")}

# Our own (configurable) pixel limit is checked from the header before any pixel is decoded; Pillow's own guard
# (an error at 2x Image.MAX_IMAGE_PIXELS) stays on as a second line.


@dataclass(frozen=True)
class ImageLimits:
    """Limits applied to untrusted image bytes before and during decoding."""

    max_image_bytes: int = 20 * 1024 * 1024
    """Largest accepted encoded image, in bytes."""
    max_image_pixels: int = 40_000_000
    """Largest accepted decoded size (width x height), checked from the header before decoding."""

    def __post_init__(self) -> None:
        if self.max_image_bytes <= 0 or self.max_image_pixels <= 0:
            raise ConfigError(f"image limits must be positive, got {self}")


@dataclass(frozen=True)
class ImagePreprocessConfig:
    """How an image becomes the tower's input tensor; saved in the bundle manifest and rebuilt from it."""

    image_size: int = 224
    """Side of the square input, in pixels."""
    resize: str = "shorter_center_crop"
    """Resize rule: `shorter_center_crop` (shorter side to image_size, then centre crop) or `squash` (both sides)."""
    interpolation: str = "bicubic"
    """Resampling filter: `bicubic` or `bilinear`."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted from [0, 1] RGB values."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation dividing the centred values."""
    layout: str = "NCHW"
    """Tensor layout of the tower input (only NCHW)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes kept with the config (not used for preprocessing)."""

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ConfigError(f"image_size must be >= 8, got {self.image_size}")
        if self.resize not in RESIZE_RULES:
            raise ConfigError(f"resize must be one of {RESIZE_RULES}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"mean and std need 3 values each (std > 0), got {self.mean}, {self.std}")
        if self.layout != "NCHW":
            raise ConfigError(f"layout must be 'NCHW', got {self.layout!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in the manifest."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImagePreprocessConfig:
        """Rebuilds the config from its manifest form."""
        return cls(**{**d, "mean": tuple(d.get("mean", IMAGENET_MEAN)), "std": tuple(d.get("std", IMAGENET_STD))})


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), draft_size: int | None = None) -> Image.Image:
    """Decodes untrusted image bytes into an upright 8-bit RGB image of the picture they show.

    Accepts JPEG, PNG, WebP and GIF (first frame). EXIF orientation is applied; other modes become RGB as `to_rgb`
    says (16-bit grey scaled to 8 bits, transparency composited over `BACKGROUND`, CMYK converted).

    Args:
        data: Encoded image file bytes.
        limits: Byte and pixel limits, checked before decoding pixels.
        draft_size: When set, JPEG decoding may use DCT scaling down to no less than this size on the shorter side
            (much faster for large photos; both training and serving pass the same value).

    Raises:
        InvalidInput: Empty, truncated, corrupt or non-image bytes, or an unaccepted format (the message says which
            formats are accepted). A truncated or corrupt PNG or JPEG is named with the chunk or segment and its
            byte offset; a PNG is refused when any chunk fails its CRC, even where Pillow would decode it.
        LimitExceeded: Over `max_image_bytes` or `max_image_pixels` (the message names the limit).
    """
    if not data:
        raise InvalidInput(f"image data is empty (0 bytes); send an image file ({_ACCEPTED})")
    if len(data) > limits.max_image_bytes:
        raise LimitExceeded(f"image data is {len(data)} bytes, over the limit max_image_bytes={limits.max_image_bytes}")
    fmt: str | None = None
    if data.startswith(PNG_SIGNATURE):
        # Checked before Pillow, which reads a PNG whose IHDR fails its CRC as "no image" and skips IDAT CRCs.
        damage = png_damage(data)
        if damage:
            raise InvalidInput(f"PNG image data ({len(data)} bytes) is {damage}")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        fmt = img.format
        if fmt not in ACCEPTED_FORMATS:
            raise InvalidInput(f"image format {fmt!r} is not accepted; accepted formats: {_ACCEPTED}")
        width, height = img.size
        if width * height > limits.max_image_pixels:
            raise LimitExceeded(
                f"image is {width}x{height} = {width * height} pixels, over the limit "
                f"max_image_pixels={limits.max_image_pixels}"
            )
        if draft_size and fmt == "JPEG":
            scale = draft_size / min(width, height)
            img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        img.seek(0)  # first frame of animated GIF / WebP
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))
    except (InvalidInput, LimitExceeded):
        raise
    except Image.DecompressionBombError as exc:
        raise LimitExceeded(
            f"image is over the limit max_image_pixels={limits.max_image_pixels} (decompression bomb: {exc})"
        ) from exc
    except UnidentifiedImageError as exc:
        _raise_if_damaged(data, exc)
        raise InvalidInput(
            f"image data ({len(data)} bytes, starting {data[:8]!r}) is not an image file in an accepted format "
            f"({_ACCEPTED})"
        ) from exc
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError...) for bad bytes
        detail = _FILE_OBJECT.sub("", f"{type(exc).__name__}: {exc}")
        _raise_if_damaged(data, exc)
        fmt = fmt or _sniff(data)
        what = f"{fmt} image data" if fmt else "image data"
        raise InvalidInput(
            f"{what} ({len(data)} bytes) could not be decoded: it is truncated or corrupt ({detail}); "
            f"accepted formats: {_ACCEPTED}"
        ) from exc


def _raise_if_damaged(data: bytes, exc: Exception) -> None:
    """Raises InvalidInput naming where a JPEG that Pillow failed on is truncated or corrupt, if its framing says."""
    damage = jpeg_damage(data) if data.startswith(JPEG_SIGNATURE) else None
    if damage:
        raise InvalidInput(f"JPEG image data ({len(data)} bytes) is {damage}") from exc


def _sniff(data: bytes) -> str | None:
    """The accepted format whose signature `data` starts with, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for fmt, heads in _MAGIC.items() if data.startswith(heads)), None)


def to_rgb(img: Image.Image) -> Image.Image:
    """The picture an image of any Pillow mode shows, as 8-bit RGB.

    Pillow's own `convert("RGB")` clips every mode wider than 8 bits at 255 (a 16-bit grey photo comes out almost
    white) and drops transparency, so the wide and transparent modes are converted here:

    - 16-bit grey (`I;16`, `I;16B`, ...) is scaled by its range: value / 257, so 65535 -> 255 exactly.
    - 32-bit integer grey (`I`) is read as 16-bit when every value lies in 0..65535 (what 16-bit PNG and TIFF
      decoders produce); otherwise its actual range, min..max, is stretched to 0..255 (there is no other scale).
    - Float grey (`F`) is read on the smallest of the ranges 0..1, 0..255 and 0..65535 that holds its values (the
      conventions of float image files); outside all of them its actual range is stretched. NaN reads as 0.
    - Transparency (an alpha channel, a transparent palette entry, or a transparent colour in L, RGB or 16-bit
      grey) is composited over `BACKGROUND`, white: the page a browser or viewer shows a transparent picture on,
      and what logos and product shots with transparent backgrounds are made to sit on. A mean colour would
      instead invent a grey backdrop no viewer ever showed.
    - CMYK (JPEG from print workflows) is converted by Pillow's CMYK -> RGB (the JPEG decoder has already undone
      Adobe's inverted CMYK); an embedded ICC profile is not applied.
    """
    mode = img.mode
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        img = _to_8bit_grey(img)
    elif mode == "CMYK":
        return img.convert("RGB")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")  # applies a palette's or a colour's `transparency` as alpha
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image as 8-bit grey (`L`, or `LA` with its transparent colour)."""
    values = np.asarray(img)
    if img.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    else:
        values = values.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode in _SIXTEEN_BIT:
        scale_low, scale_high = 0.0, 65535.0
    elif img.mode == "I":
        scale_low, scale_high = (0.0, 65535.0) if low >= 0 and high <= 65535 else (low, high)
    else:
        ranges = [top for top in (1.0, 255.0, 65535.0) if low >= 0 and high <= top]
        scale_low, scale_high = (0.0, ranges[0]) if ranges else (low, high)
    span = scale_high - scale_low or 1.0
    grey = np.clip(np.rint((values - scale_low) * (255.0 / span)), 0, 255).astype(np.uint8)
    out = Image.fromarray(grey)
    transparent = img.info.get("transparency")
    if isinstance(transparent, int | float) and not isinstance(transparent, bool):
        alpha = np.where(np.asarray(img) == transparent, 0, 255).astype(np.uint8)
        out = Image.merge("LA", (out, Image.fromarray(alpha)))
    return out


def resize_image(img: Image.Image, cfg: ImagePreprocessConfig) -> Image.Image:
    """Applies the evaluation-time resize rule, giving an image_size x image_size image."""
    size, resample = cfg.image_size, INTERPOLATIONS[cfg.interpolation]
    if cfg.resize == "squash":
        return img.resize((size, size), resample)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_resized_crop(
    img: Image.Image,
    cfg: ImagePreprocessConfig,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
) -> Image.Image:
    """Training augmentation: a random crop of random area and aspect, resized to image_size, maybe mirrored.

    Falls back to the evaluation resize when no crop fits after ten tries (as torchvision's RandomResizedCrop does).
    """
    w, h = img.size
    area = w * h
    out: Image.Image | None = None
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (left, top, left + cw, top + ch)
            out = img.resize((cfg.image_size, cfg.image_size), INTERPOLATIONS[cfg.interpolation], box=box)
            break
    if out is None:
        out = resize_image(img, cfg)
    if hflip and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def to_array(img: Image.Image, cfg: ImagePreprocessConfig) -> np.ndarray:
    """Converts a resized RGB image to the normalised float32 (3, H, W) tower input."""
    arr = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
    normalised = (arr - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)


def preprocess_image(data: bytes, cfg: ImagePreprocessConfig, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """The whole evaluation/serving path: untrusted bytes -> (3, H, W) float32 tower input.

    Raises:
        InvalidInput: Undecodable input.
        LimitExceeded: Input over a limit.
    """
    return to_array(resize_image(decode_image(data, limits, draft_size=cfg.image_size), cfg), cfg)
