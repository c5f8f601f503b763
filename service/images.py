"""Image references from requests -> decoded RGB images, with the operator's limits.

A reference is a data URL, bare base64, or an http(s) URL. Remote URLs are
refused unless their host and port are listed in RLAIFV_ALLOWED_IMAGE_HOSTS (no
SSRF); allowed ones are fetched with a timeout and a byte cap, following
redirects only to the same host on an allowed port. Pixel counts are checked from the header before any
pixel is decoded (decompression bombs), by `reward.images.decode_image`; a
compressed HTTP body is inflated within the byte cap (a 590-byte body sent as
`Content-Encoding: gzip, gzip` took 520 MB when inflated whole).
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import httpx

from rlaifv.reward.errors import ImageError
from rlaifv.reward.images import ImageLimits, declared_pixels, decode_base64, decode_image
from rlaifv.service.errors import Overloaded
from rlaifv.service.settings import Settings

MAX_REDIRECTS = 3
T = TypeVar("T")


def _none() -> None:
    return None


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


DEFAULT_PORTS = {"http": 80, "https": 443}


def _entry(entry: str) -> tuple[str, str | None]:
    """An allowed-hosts entry as (host, port): `host`, `*.domain`, `host:8080`, `host:*`, `[::1]:8080`."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    host, colon, port = entry.rpartition(":")
    if colon and host and ":" not in host and (port.isdigit() or port == "*"):
        return host, port
    return entry, None


def _names(host: str, name: str) -> bool:
    """`name` (an entry's host: exact, or `*.domain` for its subdomains) names `host`."""
    host, name = host.lower().rstrip("."), name.rstrip(".")
    return host == name or (name.startswith("*.") and host.endswith(name[1:]))


def host_allowed(host: str, allowed: list[str], port: int | None = None, scheme: str = "https") -> bool:
    """`host` (and `port`, else the scheme's own) matched by an entry. An entry without a port allows the
    scheme's default port only: any port of an allowed host was fetched, a redirect could move to another, and
    the errors told open ports from closed ones."""
    port = port if port is not None else DEFAULT_PORTS.get(scheme)
    for entry in allowed:
        name, entry_port = _entry(entry)
        if not _names(host, name):
            continue
        if entry_port == "*" or (entry_port is None and port == DEFAULT_PORTS.get(scheme)):
            return True
        if entry_port is not None and entry_port.isdigit() and port == int(entry_port):
            return True
    return False


def url_allowed(url: str, allowed: list[str]) -> bool:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme in DEFAULT_PORTS and host_allowed(parts.hostname or "", allowed, parts.port, scheme)


_HOLD: ContextVar[list[int] | None] = ContextVar("rlaifv_image_pixels_held", default=None)


class ImageLoader:
    """Turns image references into PIL images; owns the HTTP client for allowed remote hosts.

    Decoded pixels are counted against `RLAIFV_MAX_QUEUED_IMAGE_PIXELS` from before each image is decoded until
    the request that holds them ends (`holding`): checked only at the scheduler, after every image of a request
    was decoded, 24 concurrent requests of four 4096x4096 images held 7 GB, and a request waiting on a remote
    generator or an identical request held its images uncounted. Past the budget a request is a 429 before its
    next image is decoded (one request is always let in, as the scheduler does)."""

    def __init__(self, settings: Settings, *, rejected: Callable[[], None] = _none) -> None:
        self.settings = settings
        self.limits = settings.image_limits()
        self.rejected = rejected
        self.in_hand = 0  # pixels of the images being decoded or held by requests not yet ended
        self._client: httpx.AsyncClient | None = None

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """The images `load` decodes inside stay counted until the block ends (the request's whole life); outside
        one they are counted only while `load` runs."""
        held: list[int] = []
        token = _HOLD.set(held)
        try:
            yield
        finally:
            _HOLD.reset(token)
            self.in_hand -= sum(held)

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
        reserved = 0
        held = _HOLD.get()
        try:
            for ref, param in refs:
                data = await self.read(ref, param)
                pixels = await self._off_loop(declared_pixels, data, param)  # an image refused anyway: its 400
                self._admit(pixels, reserved)
                self.in_hand += pixels
                reserved += pixels
                images.append(await self._off_loop(decode_image, data, param))
                raw.append(data)
        except BaseException:
            self.in_hand -= reserved  # nothing decoded is kept
            raise
        if held is not None:
            held.append(reserved)  # released when the request ends
        else:
            self.in_hand -= reserved
        return images, raw

    async def _off_loop(self, function: Callable[[bytes, ImageLimits, str], T], data: bytes, param: str) -> T:
        """`function(data, limits, param)` on a thread; PIL raises many types on hostile files, none a server fault."""
        try:
            return await asyncio.to_thread(function, data, self.limits, param)
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError(f"image could not be decoded ({type(exc).__name__})", param=param) from None

    def _admit(self, pixels: int, reserved: int) -> None:
        limit = self.settings.max_queued_image_pixels
        others = self.in_hand - reserved
        if limit and others and others + reserved + pixels > limit:
            self.rejected()
            raise Overloaded(
                f"server busy: the requests in hand hold {others:,} decoded image pixels and this one"
                f" {reserved + pixels:,} more, over the limit of {limit:,}",
                code="queue_full",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )

    async def _fetch(self, url: str, param: str) -> bytes:
        allowed = self.settings.allowed_image_hosts
        if not allowed:
            raise ImageError("remote image URLs are not allowed on this server; send a data URL", param=param)
        try:
            origin = urlsplit(url).hostname or ""
            allowed_url = url_allowed(url, allowed)
        except ValueError:
            raise ImageError("malformed image URL", param=param) from None
        if not allowed_url:
            if any(_names(origin, _entry(entry)[0]) for entry in allowed):
                raise ImageError(
                    f"image URL port not allowed for host '{origin}' (an entry without a port allows the scheme's"
                    " default port; 'host:port' entries allow others)",
                    param=param,
                )
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
                        if (urlsplit(target).hostname or "") != origin or not url_allowed(
                            target, self.settings.allowed_image_hosts
                        ):
                            raise ImageError("image URL redirects to another host or port", param=param)
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
