"""Image arguments -> what the server's `images` field takes (a data URL, or an http(s) URL passed through).

Accepted: a path (str or os.PathLike), raw bytes, a binary file object, a PIL image (encoded as PNG, or as JPEG
when it was read from one; Pillow is never imported here, the image encodes itself), a `data:` URL, or an
`http(s)://` URL that the server fetches itself when its operator allowed the host. `file://` URLs are read
like paths.
"""

from __future__ import annotations

import base64
import os
import re
import sys
from collections.abc import Iterable, Mapping
from io import BytesIO
from pathlib import Path
from typing import IO, Any, TypeAlias
from urllib.parse import unquote, urlparse

from ._exceptions import ImageInputError

ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes] | Any"

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


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


def _read_path(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except FileNotFoundError:
        raise ImageInputError(f"image file not found: {os.fspath(path)!r}") from None
    except OSError as exc:
        raise ImageInputError(f"cannot read image file {os.fspath(path)!r}: {exc.strerror or exc}") from None


def encode_image(image: ImageInput) -> str:
    """One image argument -> a data URL (or an http(s) URL, unchanged). Raises `ImageInputError`."""
    if isinstance(image, str):
        scheme = image.split(":", 1)[0].lower() if ":" in image[:12] else ""
        if scheme in ("http", "https", "data"):
            return image
        if scheme == "file":
            return data_url(_read_path(unquote(urlparse(image).path)))
        if not image.strip():
            raise ImageInputError("image is an empty string")
        return data_url(_read_path(image))
    if isinstance(image, os.PathLike):
        return data_url(_read_path(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ImageInputError("image is empty (0 bytes)")
        return data_url(data)
    if _is_pil_image(image):
        buffer = BytesIO()
        pil_image: Any = image
        # A photo read from a JPEG stays a JPEG (as PNG it grows ~6x, past the server's limits); the rest is PNG.
        jpeg = getattr(pil_image, "format", None) == "JPEG" and pil_image.mode in ("RGB", "L", "CMYK")
        kind = "JPEG" if jpeg else "PNG"
        try:
            pil_image.save(buffer, format=kind, **({"quality": 95} if jpeg else {}))
        except (OSError, ValueError) as exc:
            raise ImageInputError(f"cannot encode PIL image as {kind}: {exc}") from None
        return data_url(buffer.getvalue(), f"image/{kind.lower()}")
    if hasattr(image, "read"):
        data = image.read()
        if isinstance(data, (bytes, bytearray)):
            return encode_image(bytes(data))
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


def encode_message_images(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-style `messages` with each `image_url` part's image encoded as `encode_image` does (a path, bytes, a
    PIL image... as its `url`, or as the `image_url` itself); data: and http(s):// URLs pass as they are. The
    caller's messages are not changed."""
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise TypeError("messages= takes a list of messages (dicts with 'role' and 'content')")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
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
                    fields["url"] = _message_image(fields["url"])
                except ImageInputError as exc:
                    raise ImageInputError(f"messages[{i}].content[{j}].image_url.url: {exc}") from None
                part = {**part, "image_url": fields}
            parts.append(part)
        out.append({**message, "content": parts})
    return out


_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]{16,}")


def _message_image(url: Any) -> Any:
    """An image_url's `url`: encoded like `image=` when it is a local image (a path, bytes, a PIL image...); a
    string the server reads as it is (a data: or http(s) URL, bare base64, as OpenAI-style clients send it) goes
    unchanged."""
    if isinstance(url, str):
        text = url.strip()
        scheme = text.split(":", 1)[0].lower() if ":" in text[:12] else ""
        if scheme in ("http", "https", "data"):
            return url
        if not scheme and _BASE64.fullmatch(text) and "." not in text and not _is_file(text):
            return url
    return encode_image(url)


def _is_file(text: str) -> bool:
    """Whether `text` names a file (a name past the OS's limit, as a megabyte of base64 is, names none)."""
    try:
        return len(text) < 4096 and Path(text).expanduser().is_file()
    except OSError:
        return False
