"""Safe image decoding: size, pixel-count and format checks *before* pixels are decoded.

A 30000x30000 PNG fits in a few kilobytes; decoding it would take gigabytes.
PIL reads the header lazily, so the declared size is checked first and only
then are the pixels loaded (which also surfaces truncated files).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rlaifv.reward.errors import ImageError

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[\w.-]+)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S | re.I
)


class ImageLimits(BaseModel):
    """Limits applied to every decoded image; the service reads them from its settings."""

    model_config = ConfigDict(frozen=True)

    max_bytes: int = Field(10 * 1024 * 1024, gt=0)
    max_pixels: int = Field(4096 * 4096, gt=0)
    # a 1 x 16M image is within the pixel limit and blew up when resized to the model's square (GBs)
    max_aspect: float = Field(20.0, ge=1)
    allowed_formats: frozenset[str] = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})

    def check_size(self, width: int, height: int, param: str) -> None:
        """The declared size against the limits, before any pixel is decoded."""
        if width < 1 or height < 1:
            raise ImageError(f"image is {width}x{height}: it has no pixels", param=param)
        if width * height > self.max_pixels:
            raise ImageError(
                f"image is {width}x{height} = {width * height} pixels, over the limit of {self.max_pixels}",
                param=param,
            )
        if max(width, height) / min(width, height) > self.max_aspect:
            raise ImageError(f"image is {width}x{height}: aspect ratio over {self.max_aspect:g}", param=param)


def decode_base64(text: str, param: str = "image") -> bytes:
    """Bytes of a data URL (`data:image/png;base64,...`) or of bare base64."""
    payload = text.strip()
    if payload[:5].lower() == "data:":  # URL schemes are case-insensitive (RFC 3986)
        match = _DATA_URL.match(payload)
        if match is None:
            raise ImageError("malformed data URL", param=param)
        if not match.group("b64"):
            raise ImageError("only base64 data URLs are supported", param=param)
        payload = match.group("data")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"not valid base64: {exc}", param=param) from None


def decode_image(data: bytes | memoryview, limits: ImageLimits | None = None, param: str = "image") -> Any:
    """Decode image bytes into an RGB PIL image, enforcing `limits`."""
    with _opened(data, limits or ImageLimits(), param) as probe:
        probe.load()
        return to_rgb(probe)


def declared_pixels(data: bytes | memoryview, limits: ImageLimits | None = None, param: str = "image") -> int:
    """Width x height from the header, no pixel decoded; the `ImageError` that `decode_image` would raise for
    what the header shows (bytes, format, size, JPEG scans)."""
    with _opened(data, limits or ImageLimits(), param) as probe:
        return int(probe.width) * int(probe.height)


def check_image(data: bytes | memoryview, limits: ImageLimits | None = None, param: str = "image") -> None:
    """Raise the `ImageError` that `decode_image` would raise for `data`, at a fraction of its cost.

    The same limits apply, checked on the same header. A JPEG is decoded at 1/8 scale: libjpeg still
    entropy-decodes every block (where damaged and truncated files fail) and skips most of the inverse DCT,
    so it fails where the full decode fails, with the same message, in about 2/3 of the time (640x480
    photos). `Image.verify()` would be no check at all: for JPEG it reads nothing past the header.
    """
    with _opened(data, limits or ImageLimits(), param) as probe:
        if probe.format in ("JPEG", "MPO"):
            probe.draft(probe.mode, (max(1, probe.width // 8), max(1, probe.height // 8)))
        probe.load()


@contextlib.contextmanager
def _opened(data: bytes | memoryview, limits: ImageLimits, param: str) -> Iterator[Any]:
    """The image opened lazily, its size and format checked against `limits`; decoding errors inside the
    block become `ImageError`s."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}", param=param)
    if not data:
        raise ImageError("image is empty", param=param)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format or "?"
            # MPO: a JPEG with more images after the photo (phones' Ultra HDR and gain-map photos), read as one
            if fmt not in limits.allowed_formats and not (fmt == "MPO" and "JPEG" in limits.allowed_formats):
                raise ImageError(
                    f"image format {fmt} is not allowed (allowed: {', '.join(sorted(limits.allowed_formats))})",
                    param=param,
                )
            limits.check_size(probe.width, probe.height, param)
            if fmt in ("JPEG", "MPO") and jpeg_scans(data) > MAX_JPEG_SCANS:
                raise ImageError(
                    f"JPEG with over {MAX_JPEG_SCANS} scans: each scan walks the whole image, so its decoding cost"
                    " is unbounded (a progressive JPEG has about 10)",
                    param=param,
                )
            if getattr(probe, "n_frames", 1) > 1:
                probe.seek(0)
            yield probe
    except ImageError:
        raise
    except Image.DecompressionBombError:  # Pillow's own bound (~179M pixels), met before the size is known
        raise ImageError(
            f"image is over the pixel limit of {limits.max_pixels} (its declared size is a decompression bomb)",
            param=param,
        ) from None
    except UnidentifiedImageError:
        raise ImageError("data is not a recognised image", param=param) from None
    except (OSError, SyntaxError, ValueError, struct.error, ZeroDivisionError) as exc:
        raise ImageError(f"image could not be decoded: {exc}", param=param) from None


MAX_JPEG_SCANS = 100
"""libjpeg-turbo's advice for untrusted input (its `-maxscans`): a 4096x4096 progressive JPEG repeating one
~30-byte scan costs ~6 ms of CPU per scan, so 10 MB of them took about half an hour, within every byte and
pixel limit."""

_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # in entropy-coded data: not a stuffed 0xFF, not a restart


def jpeg_scans(data: bytes | memoryview) -> int:
    """The scans (SOS segments) of a JPEG's first image, counted from its markers without decoding; stops
    counting past `MAX_JPEG_SCANS`. Bytes between segments are skipped as libjpeg skips them (counting stopped
    there, and the decoder went on through every scan after them)."""
    data = bytes(data)
    i, scans, end = 2, 0, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:  # bytes between segments: libjpeg skips them ("extraneous bytes before marker")
            i = data.find(b"\xff", i)
            if i < 0:
                break
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xD9:  # end of the first image (an MPO's next images follow)
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length field
            i += 2
            continue
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
        if marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                break
            found = _JPEG_MARKER.search(data, i)
            if found is None:
                break
            i = found.start()
    return scans


def to_rgb(image: Any) -> Any:
    """The image as viewers show it, in RGB with 8 bits a channel: what transformers' `load_image` and vLLM give
    a model for the same file.

    - EXIF orientation applied (phone photos are stored sideways with a rotation tag), as both do.
    - Transparency laid over white, as vLLM does (`convert` alone keeps the colour under transparent pixels,
      often black).
    - 16-bit and 32-bit grey ("I;16", "I") scaled to 8 bits (PIL's `convert` clips them at 255, which turns most
      of a 16-bit PNG white); an "I" image whose values fit 8 bits is taken as 8-bit grey.
    - Metadata dropped: the result is plain pixels, so converting it again changes nothing (the service's
      decoded images went through here twice, and an orientation Pillow reads but `exif_transpose` leaves in
      the XMP turned them twice; a damaged EXIF block copied over failed the second pass).
    """
    rgb = _as_rgb(image)
    rgb.info = {}
    return rgb


def _as_rgb(image: Any) -> Any:
    from PIL import Image

    image = upright(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        import numpy as np

        values = np.asarray(image)  # uint16 or int32, as stored: a 4096 x 4096 image in int64 took 384 MB to scale
        top = int(values.max(initial=0))
        shift = 8 if image.mode.startswith("I;16") else 0 if top <= 0xFF else 8 if top <= 0xFFFF else 24
        scaled = values >> shift
        np.clip(scaled, 0, 255, out=scaled)
        grey = Image.fromarray(scaled.astype(np.uint8))  # 2-D uint8: mode L
        del scaled
        clear = image.info.get("transparency")  # a PNG's tRNS grey value, in the image's own 16 bits
        if isinstance(clear, int):
            opaque = np.where(values == clear, np.uint8(0), np.uint8(255))
            grey.putalpha(Image.fromarray(opaque))  # mode LA
        image = grey
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return image.convert("RGB")


EXIF_ORIENTATION = 0x0112
# What `to_rgb` gives a model for the same bytes changed in version 2 (EXIF orientation, transparency over white)
# and 3 (an orientation left in the XMP applied once, not twice): cached rewards keyed by image bytes carry it.
PREPROCESSING_VERSION = 3


def upright(image: Any) -> Any:
    """`image` turned by its EXIF orientation tag; the image itself (not a copy) without one. A damaged EXIF
    block and an unknown orientation show the image as stored (Pillow tolerates the first in JPEGs only)."""
    from PIL import ImageOps

    try:
        if image.getexif().get(EXIF_ORIENTATION, 1) == 1:
            return image
        return ImageOps.exif_transpose(image)
    except (SyntaxError, ValueError, TypeError, KeyError, struct.error, OSError):
        return image


def load_image(image: Any, limits: ImageLimits | None = None, param: str = "image") -> Any:
    """The in-process API's image argument: a PIL image, bytes, a local path, or a (data URL) base64 string.

    The HTTP service never calls this with paths: it decodes data URLs itself.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        (limits or ImageLimits()).check_size(image.width, image.height, param)
        try:
            return to_rgb(image)
        except (OSError, ValueError, SyntaxError, struct.error) as exc:  # a closed image, a mode PIL cannot convert
            raise ImageError(f"image could not be converted to RGB: {exc}", param=param) from None
    if isinstance(image, bytes | bytearray | memoryview):
        return decode_image(bytes(image), limits, param)
    if isinstance(image, Path):
        return decode_image(_read_file(image, param), limits, param)
    if isinstance(image, str):
        if image[:5].lower() == "data:":
            return decode_image(decode_base64(image, param), limits, param)
        if len(image) < 4096 and _is_file(image):
            return decode_image(_read_file(Path(image), param), limits, param)
        try:
            return decode_image(decode_base64(image, param), limits, param)
        except ImageError:
            _refuse_missing_path(image, param)
            raise
    raise ImageError(f"unsupported image type {type(image).__name__}", param=param)


def _is_file(text: str) -> bool:
    """Whether `text` names a file; base64 text can be a "name" too long for the filesystem (OSError)."""
    try:
        return Path(text).is_file()
    except OSError:
        return False


def _refuse_missing_path(text: str, param: str) -> None:
    """A string that is no image as base64 but reads as a path (one that exists but is no file, a name with an
    image suffix, a folder that exists) is named as such: a mistyped path was "not valid base64"."""
    if len(text) >= 4096:
        return
    path = Path(text)
    try:
        if path.exists():
            raise ImageError(f"image path {text} is not a file", param=param)
        if path.suffix.lower() in IMAGE_SUFFIXES or (path.parent != Path() and path.parent.is_dir()):
            raise ImageError(f"image file {text} does not exist", param=param)
    except OSError:
        return


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".webp", ".gif", ".bmp", ".mpo", ".tif", ".tiff"})


def _read_file(path: Path, param: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read image file {path}: {exc.strerror}", param=param) from None
