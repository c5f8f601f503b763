"""Image references from requests -> decoded RGB images, with the operator's limits.

A reference is a data URL, bare base64, or an http(s) URL. Remote URLs are
refused unless their host is listed in RLAIFV_ALLOWED_IMAGE_HOSTS (no SSRF);
allowed ones are fetched with a timeout and a byte cap, following redirects
only to the same host. Pixel counts are checked from the header before any
pixel is decoded (decompression bombs), by `reward.images.decode_image`; a
compressed HTTP body is inflated within the byte cap (a 590-byte body sent as
`Content-Encoding: gzip, gzip` took 520 MB when inflated whole).
"""

from __future__ import annotations

import asyncio
import zlib
from urllib.parse import urljoin, urlsplit

import httpx

from rlaifv.reward.errors import ImageError
from rlaifv.reward.images import decode_base64, decode_image
from rlaifv.service.settings import Settings

MAX_REDIRECTS = 3
# zlib's window bits: gzip or zlib header detected (32 + 15); raw deflate, which some servers send as "deflate"
_INFLATE_WBITS = {"gzip": 47, "x-gzip": 47, "deflate": 47}


def inflated(body: bytes, encodings: str, limit: int, param: str) -> bytes:
    """`body` decoded by its Content-Encoding layers (last applied first), no layer ever holding more than
    `limit` + 1 bytes, which is all it takes to know the image is over the cap."""
    for encoding in reversed([e.strip().lower() for e in encodings.split(",") if e.strip()]):
        if encoding == "identity":
            continue
        if encoding not in _INFLATE_WBITS:
            raise ImageError(f"image URL answered with Content-Encoding '{encoding}', not supported", param=param)
        try:
            try:
                inflater = zlib.decompressobj(_INFLATE_WBITS[encoding])
                out = inflater.decompress(body, limit + 1)
            except zlib.error:
                if encoding != "deflate":
                    raise
                inflater = zlib.decompressobj(-15)
                out = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise ImageError(f"image URL body is not valid {encoding}: {exc}", param=param) from None
        if len(out) > limit:
            raise ImageError(f"image is over the limit of {limit} bytes", param=param)
        body = out
    return body


def host_allowed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*.") and host.endswith(entry[1:]):
            return True
        if host == entry:
            return True
    return False


class ImageLoader:
    """Turns image references into PIL images; owns the HTTP client for allowed remote hosts."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits = settings.image_limits()
        self._client: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def read(self, ref: str, param: str) -> bytes:
        """The encoded bytes of one reference."""
        text = ref.strip()
        scheme = text.split(":", 1)[0].lower() if ":" in text[:10] else ""
        if scheme in ("http", "https"):
            return await self._fetch(text, param)
        if scheme and scheme != "data":
            raise ImageError(f"unsupported image URL scheme '{scheme}' (use a data URL)", param=param)
        data = decode_base64(text, param)
        if len(data) > self.limits.max_bytes:
            raise ImageError(f"image is {len(data)} bytes, over the limit of {self.limits.max_bytes}", param=param)
        return data

    async def load(self, refs: list[tuple[str, str]]) -> tuple[list, list[bytes]]:
        """Decoded images and their bytes, in order, each decoded before the next is read: the first bad one
        ends the request (and no later URL is fetched for nothing). Decoding runs off the event loop."""
        images, raw = [], []
        for ref, param in refs:
            data = await self.read(ref, param)
            try:
                image = await asyncio.to_thread(decode_image, data, self.limits, param)
            except ImageError:
                raise
            except Exception as exc:  # PIL raises many types on hostile files; none is a server fault
                raise ImageError(f"image could not be decoded ({type(exc).__name__})", param=param) from None
            images.append(image)
            raw.append(data)
        return images, raw

    async def _fetch(self, url: str, param: str) -> bytes:
        allowed = self.settings.allowed_image_hosts
        if not allowed:
            raise ImageError("remote image URLs are not allowed on this server; send a data URL", param=param)
        try:
            origin = urlsplit(url).hostname or ""
        except ValueError:
            raise ImageError("malformed image URL", param=param) from None
        if not host_allowed(origin, allowed):
            raise ImageError(f"image host '{origin}' is not in the allowed hosts", param=param)
        if self._client is None:
            timeout = httpx.Timeout(self.settings.image_fetch_timeout_s)
            self._client = httpx.AsyncClient(
                timeout=timeout,
                follow_redirects=False,
                trust_env=False,
                headers={"Accept-Encoding": "identity"},  # images are compressed already; gzip is still taken
            )
        limit = self.settings.image_fetch_timeout_s
        try:  # httpx's timeout bounds each read: a host sending a byte at a time held the request for ever
            async with asyncio.timeout(limit):
                return await self._follow(self._client, url, origin, param)
        except TimeoutError:
            raise ImageError(f"image URL not fetched within {limit:g} s", param=param) from None

    async def _follow(self, client: httpx.AsyncClient, url: str, origin: str, param: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                async with client.stream("GET", url) as response:
                    if response.is_redirect:
                        target = urljoin(url, response.headers.get("location", ""))
                        if (urlsplit(target).hostname or "") != origin or urlsplit(target).scheme not in (
                            "http",
                            "https",
                        ):
                            raise ImageError("image URL redirects to another host", param=param)
                        url = target
                        continue
                    if response.status_code != 200:
                        raise ImageError(f"image URL answered HTTP {response.status_code}", param=param)
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > self.limits.max_bytes:
                        raise ImageError(
                            f"image is {declared} bytes, over the limit of {self.limits.max_bytes}", param=param
                        )
                    body = bytearray()
                    async for chunk in response.aiter_raw():  # as sent: httpx would inflate a whole chunk at once
                        body += chunk
                        if len(body) > self.limits.max_bytes:
                            raise ImageError(f"image is over the limit of {self.limits.max_bytes} bytes", param=param)
                    encodings = response.headers.get("content-encoding", "")
                    return inflated(bytes(body), encodings, self.limits.max_bytes, param) if encodings else bytes(body)
            except ImageError:
                raise
            except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
                raise ImageError(f"cannot fetch image URL: {type(exc).__name__}", param=param) from None
        raise ImageError("image URL redirects too many times", param=param)
