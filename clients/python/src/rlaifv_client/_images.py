"""Image arguments -> what the server's `images` field takes (a data URL, or an http(s) URL passed through).

Accepted: a path (str or os.PathLike), raw bytes, a binary file object, a PIL image (encoded as PNG, or as JPEG
when it was read from one; Pillow is never imported here, the image encodes itself), a `data:` URL, bare base64,
or an `http(s)://` URL that the server fetches itself when its operator allowed the host. `file://` URLs are read
like paths. A path must name a regular file (not a FIFO, device or directory), and a path or file object is read up
to `MAX_IMAGE_FILE_BYTES` (16 MiB, the server's default request body limit), refused past it (`_files`).
"""

from __future__ import annotations

import base64
import os
import re
import sys
from collections.abc import Iterable, Mapping
from io import BytesIO
from pathlib import Path
from typing import IO, Any, Protocol, TypeAlias
from urllib.parse import unquote, urlparse

from . import _constants as C
from ._exceptions import ImageInputError
from ._files import read_object, read_regular_file
from ._files import short as _short


class BinaryReader(Protocol):
    """A binary file object (`open(path, "rb")`, `BytesIO`, an HTTP response...): its `read()` gives the image (read
    in pieces, `read(size)`, up to `MAX_IMAGE_FILE_BYTES`, where it takes a size)."""

    def read(self) -> bytes: ...


class PILImageLike(Protocol):
    """What the SDK needs of a PIL image, typed without importing Pillow (optional, so not a dependency)."""

    @property
    def mode(self) -> str: ...

    def save(self, fp: IO[bytes], format: str | None = None, **params: Any) -> None: ...


class SupportsModelDump(Protocol):
    """A pydantic (v2) model, such as an OpenAI chat completion's `message`, given as a message."""

    def model_dump(self, *, exclude_none: bool = False) -> dict[str, Any]: ...


ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryReader | PILImageLike"
MessageInput: TypeAlias = "Mapping[str, Any] | SupportsModelDump"

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


_TIFF = (b"II*\x00", b"MM\x00*")


def sniff_mime(data: bytes) -> str:
    """The image MIME type from magic bytes; `application/octet-stream` when unknown (the server decides)."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def data_url(data: bytes, mime: str | None = None) -> str:
    """`data:<mime>;base64,<data>`."""
    return f"data:{mime or sniff_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


def _is_pil_image(obj: Any) -> bool:
    pil = sys.modules.get("PIL.Image")  # no Pillow loaded means obj cannot be a PIL image
    return pil is not None and isinstance(obj, pil.Image)


_TOO_BIG = (
    ": a server at its defaults takes no request body over 16 MiB (RLAIFV_MAX_BODY_BYTES), and the image goes in one"
    " base64-encoded, 4/3 of its size; make it smaller, or read it yourself and pass its bytes to a server whose"
    " operator raised its limits"
)


def _read_path(path: str | os.PathLike[str]) -> bytes:
    """The image file's bytes: a regular file of at most `MAX_IMAGE_FILE_BYTES` (`_files.read_regular_file`)."""
    try:
        return read_regular_file(path, C.MAX_IMAGE_FILE_BYTES, "image file", ImageInputError, _TOO_BIG)
    except FileNotFoundError:
        raise ImageInputError(f"image file not found: {_short(os.fspath(path))}") from None
    except OSError as exc:
        raise ImageInputError(f"cannot read image file {_short(os.fspath(path))}: {exc.strerror or exc}") from None


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")
_PASSED_SCHEMES = ("http", "https", "data")


def _scheme(text: str) -> str:
    """The URL scheme `text` starts with, lowercased, or "". A name other than http(s), data or file counts only
    before "//" ("s3://b/k"), so "C:\\cat.png" and a file named "a:b.png" stay paths."""
    match = _SCHEME.match(text)
    if match is None:
        return ""
    scheme = match.group(1).lower()
    return scheme if scheme in (*_PASSED_SCHEMES, "file") or text[match.end() :].startswith("//") else ""


_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_WHITESPACE = re.compile(r"\s+")


def _is_base64(text: str) -> bool:
    """Whether `text` is bare base64, as OpenAI-style clients send an image (the server reads it as it is): whole
    quads of the base64 alphabet, at least 16 characters, padded only at the end, decoding to an image's magic
    bytes (a missing path such as "/data/img/000001" is in the alphabet too), and not the name of a file."""
    payload = _WHITESPACE.sub("", text)
    whole = len(payload) >= 16 and len(payload) % 4 == 0
    if not whole or _BASE64.fullmatch(payload) is None:
        return False
    head = base64.b64decode(payload[:16])
    return (sniff_mime(head) != "application/octet-stream" or head[:4] in _TIFF) and not _is_file(text.strip())


def _is_file(text: str) -> bool:
    """Whether `text` names a file (a name past the OS's limit, as a megabyte of base64 is, names none)."""
    try:
        return len(text) < 4096 and Path(text).expanduser().is_file()
    except OSError:
        return False


_PNG_MODES = frozenset({"1", "L", "LA", "I;16", "I;16B", "P", "RGB", "RGBA"})


def _png_storable(image: Any) -> Any:
    """`image` in a mode PNG stores, as the server would read its pixels: CMYK, YCbCr, LAB, HSV... as RGB,
    premultiplied alpha as plain alpha, float as 8-bit grey (clipped to 0-255), 32-bit integers as 16-bit grey
    (as 8-bit grey of their top byte when past 65535, the server's scaling of such images)."""
    mode = image.mode
    if mode in _PNG_MODES:
        return image
    if mode in ("RGBa", "PA"):
        return image.convert("RGBA")
    if mode == "La":
        return image.convert("LA")
    if mode == "F":
        return image.convert("L")
    if mode == "I" or mode.startswith("I;"):
        image = image if mode == "I" else image.convert("I")
        if image.getextrema()[1] <= 0xFFFF:
            return image.convert("I;16")
        return image.point(lambda value: value * (1 / 2**24)).convert("L")
    return image.convert("RGB")


def _encode_pil(image: Any) -> str:
    # A photo read from a JPEG stays a JPEG (as PNG it grows ~6x, past the server's limits); the rest is PNG.
    jpeg = getattr(image, "format", None) == "JPEG" and image.mode in ("RGB", "L", "CMYK")
    kind = "JPEG" if jpeg else "PNG"
    buffer = BytesIO()
    try:
        (image if jpeg else _png_storable(image)).save(buffer, format=kind, **({"quality": 95} if jpeg else {}))
    except (OSError, ValueError) as exc:
        raise ImageInputError(f"cannot encode PIL image (mode {image.mode}) as {kind}: {exc}") from None
    return data_url(buffer.getvalue(), f"image/{kind.lower()}")


def encode_image(image: ImageInput) -> str:
    """One image argument -> a data URL, or a string the server reads as it is (a data: or http(s) URL, bare
    base64) unchanged. Raises `ImageInputError`."""
    if isinstance(image, str):
        text = image.strip()
        scheme = _scheme(text)
        if scheme in _PASSED_SCHEMES:
            return image
        if scheme == "file":
            return data_url(_read_path(unquote(urlparse(text).path)))
        if scheme:
            raise ImageInputError(
                f"unsupported image URL scheme {_short(scheme)}: give a path, bytes, or a data:/http(s):// URL"
            )
        if not text:
            raise ImageInputError("image is an empty string")
        if _is_base64(text):
            return image
        return data_url(_read_path(image))
    if isinstance(image, os.PathLike):
        return data_url(_read_path(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ImageInputError("image is empty (0 bytes)")
        return data_url(data)
    if _is_pil_image(image):
        return _encode_pil(image)
    if hasattr(image, "read"):
        read = read_object(image, C.MAX_IMAGE_FILE_BYTES, "the image file object", ImageInputError, _TOO_BIG)
        if isinstance(read, bytes):
            return encode_image(read)
        raise ImageInputError("file objects must be opened in binary mode ('rb')")
    raise ImageInputError(
        f"unsupported image type {type(image).__name__}: give a path, bytes, a binary file, a PIL image, "
        "or a data:/http(s):// URL string"
    )


def encode_images(image: ImageInput | None, images: Iterable[ImageInput] | None) -> list[str]:
    """`image=` and/or `images=` -> the request's `images` list, in order (a lone path or bytes given as `images`
    is refused by name, not read as a sequence of characters)."""
    out: list[str] = []
    if image is not None:
        out.append(encode_image(image))
    if images is not None:
        if isinstance(images, (str, bytes, os.PathLike)) or not hasattr(images, "__iter__"):
            raise ImageInputError("images= takes a list; use image= for a single image")
        out.extend(encode_image(item) for item in images)
    return out


def encode_message_images(messages: Iterable[MessageInput]) -> list[dict[str, Any]]:
    """OpenAI-style `messages` with each `image_url` part's image encoded as `encode_image` does (a path, bytes, a
    PIL image... as its `url`, or as the `image_url` itself); data: and http(s):// URLs and bare base64 pass as they
    are. A message may be a pydantic model (an OpenAI reply's `message`), sent as its fields that are not None.
    The caller's messages are not changed."""
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise TypeError("messages= takes a list of messages (dicts with 'role' and 'content')")
    out: list[dict[str, Any]] = []
    for i, given in enumerate(messages):
        dump = None if isinstance(given, Mapping) else getattr(given, "model_dump", None)
        message = dump(exclude_none=True) if callable(dump) else given
        if not isinstance(message, Mapping):
            raise TypeError(
                f"messages[{i}] must be a dict with 'role' and 'content' (or a pydantic model such as an OpenAI "
                f"reply's message), got {type(given).__name__}"
            )
        content = message.get("content")
        if not isinstance(content, list):
            out.append(dict(message))
            continue
        parts: list[Any] = []
        for j, part in enumerate(content):
            if isinstance(part, Mapping) and part.get("type") == "image_url" and "image_url" in part:
                image = part["image_url"]
                fields = dict(image) if isinstance(image, Mapping) else {"url": image}
                if "url" not in fields:
                    raise ImageInputError(f"messages[{i}].content[{j}].image_url has no 'url'")
                try:
                    fields["url"] = encode_image(fields["url"])
                except ImageInputError as exc:
                    raise ImageInputError(f"messages[{i}].content[{j}].image_url.url: {exc}") from None
                part = {**part, "image_url": fields}
            parts.append(part)
        out.append({**message, "content": parts})
    return out
