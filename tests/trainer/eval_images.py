"""Benchmark images for the eval tests, a few kilobytes at most: good ones, and the bad ones readers must name."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib


def good_png(color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "PNG")
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    """A 64x64 noise JPEG cut at 60%: its header reads, its decode fails ("image file is truncated")."""
    from PIL import Image

    rnd = random.Random(0)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (64, 64), bytes(rnd.randrange(256) for _ in range(64 * 64 * 3))).save(buffer, "JPEG")
    data = buffer.getvalue()
    return data[: len(data) * 6 // 10]


def png_declaring(width: int, height: int) -> bytes:
    """A 1-bit PNG whose header declares `width` x `height` with no pixel data: 30000x30000 is a decompression bomb
    to Pillow (raised by `Image.open`), 5000x5000 is over the sampler's pixel limit."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
