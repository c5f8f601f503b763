"""Image references from requests -> decoded RGB images, with the operator's limits.

A reference is a data URL, bare base64, or an http(s) URL. Remote URLs are
refused unless their host and port are listed in RLAIFV_ALLOWED_IMAGE_HOSTS (no
SSRF); allowed ones are fetched with a timeout and a byte cap, following
redirects only to the same host on an allowed port. An allowed name is resolved once per fetch, every address it
has must pass `urls.address_refusal` (public, or allowed by the operator), and the connection goes to an address
so checked (`PinnedBackend`): a name pointed at 127.0.0.1 or 169.254.169.254 was fetched, and a check made before
httpx resolved the name again would lose to DNS rebinding. The URL keeps the name, so the Host header, TLS SNI and
certificate checks are the name's. Pixel counts are checked from the header before any
pixel is decoded (decompression bombs), by `reward.images.decode_image`; a
compressed HTTP body is inflated within the byte cap (a 590-byte body sent as
`Content-Encoding: gzip, gzip` took 520 MB when inflated whole).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import socket
import ssl
import typing
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from ipaddress import ip_address
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import anyio
import httpcore
import httpx

from rlaifv.reward.errors import ImageError
from rlaifv.reward.images import ImageLimits, declared_pixels, decode_base64, decode_image
from rlaifv.service.daemon_threads import in_daemon_thread
from rlaifv.service.errors import Overloaded
from rlaifv.service.settings import Settings
from rlaifv.service.urls import (
    DEFAULT_PORTS,
    Address,
    address_kind,
    address_refusal,
    allowing_entry,
    as_address,
    host_listed,
    url_allowed,
)

MAX_REDIRECTS = 3
log = logging.getLogger("rlaifv.service")
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


Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


DNS_LOOKUPS = 8
"""Lookups of image hosts running at once; more wait for one to end (each fetch within its own timeout)."""


class SystemResolver:
    """`host`'s addresses as the operating system resolves them, off the loop on threads of its own.

    `loop.getaddrinfo` runs on the default executor: a DNS server that stopped answering (glibc tries for 10 s and
    more per name) held all its threads, and with them image decoding, job files and /metrics, for every request.
    Here a lookup holds one of `DNS_LOOKUPS` daemon threads until it ends, even after its fetch timed out."""

    def __init__(self, lookups: int = DNS_LOOKUPS) -> None:
        self.slots = asyncio.Semaphore(lookups)

    async def __call__(self, host: str, port: int) -> list[str]:
        infos = await in_daemon_thread(
            socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM, name="rlaifv-dns", slots=self.slots
        )
        return [str(info[4][0]) for info in infos]


DNS_LOOKUPS_PER_ENTRY = 2
"""Lookups running at once for the hosts of one RLAIFV_ALLOWED_IMAGE_HOSTS entry (of `DNS_LOOKUPS` in all)."""


class _Lookup:
    """One name's lookup in flight and the fetches waiting for it."""

    def __init__(self) -> None:
        self.waiters = 0
        self.resolving = False  # past its entry's slot, in the resolver (for `SystemResolver`, maybe in a thread)
        self.task: asyncio.Task[Sequence[str]] | None = None


class HostLookups:
    """`resolve(host, port)` as image fetches share it: one lookup in flight per (host, port), whose result every
    fetch waiting for it takes, and at most `per_entry` lookups at once per allowed-hosts entry.

    Every lookup holding one of `SystemResolver`'s `DNS_LOOKUPS` threads, callers naming `a1.x.example`,
    `a2.x.example`, ... under an entry `*.x.example` whose DNS server does not answer held all of them, and every
    other allowed host was 'not resolved within' the fetch timeout. A lookup is a task of its own: a fetch that
    times out leaves it to the others (and to a retry, which joins it rather than starting another thread). It holds
    its entry's slot until the resolver returns, which for `SystemResolver` is when its thread ends, not when its
    fetches stop waiting. One still waiting for its entry's slot when its last fetch leaves is dropped; one
    already in the resolver is not (it may be in a thread), so an entry has at most `per_entry` of those."""

    def __init__(self, resolve: Resolver, per_entry: int = DNS_LOOKUPS_PER_ENTRY) -> None:
        self.resolve = resolve
        self.per_entry = per_entry
        self._slots: dict[str, asyncio.Semaphore] = {}  # per entry: as many as the operator listed
        self._running: dict[tuple[str, int], _Lookup] = {}

    async def __call__(self, host: str, port: int, entry: str) -> Sequence[str]:
        key = (host, port)
        lookup = self._running.get(key)
        if lookup is None:
            lookup = self._running[key] = _Lookup()
            lookup.task = asyncio.create_task(self._run(lookup, key, entry), name=f"rlaifv-dns {host}:{port}")
            lookup.task.add_done_callback(functools.partial(self._ended, key, lookup))
        assert lookup.task is not None
        lookup.waiters += 1
        try:
            return await asyncio.shield(lookup.task)  # a waiter cancelled (its fetch timed out) leaves the lookup be
        finally:
            lookup.waiters -= 1
            if not lookup.waiters and not lookup.resolving:
                lookup.task.cancel()

    async def _run(self, lookup: _Lookup, key: tuple[str, int], entry: str) -> Sequence[str]:
        slots = self._slots.setdefault(entry, asyncio.Semaphore(self.per_entry))
        async with slots:
            lookup.resolving = True
            return await self.resolve(*key)

    def _ended(self, key: tuple[str, int], lookup: _Lookup, task: asyncio.Task[Sequence[str]]) -> None:
        if self._running.get(key) is lookup:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # retrieved: the fetches that waited for it (if any did) have it

    def drop_unwaited(self) -> None:
        """Cancels the lookups that no fetch waits for (the loader closes): their threads, if any, end on their own."""
        for lookup in list(self._running.values()):
            if not lookup.waiters and lookup.task is not None:
                lookup.task.cancel()


# (host, port) as the connection pool names an origin -> the addresses checked for it by the fetch in hand
_PINS: ContextVar[dict[tuple[str, int], tuple[str, ...]] | None] = ContextVar("rlaifv_image_pins", default=None)

# httpcore's errors, which `PinnedTransport` passes on unmapped (httpx maps them in its own transport only)
HTTPCORE_ERRORS = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    httpcore.ProxyError,
)


@contextlib.contextmanager
def pinned() -> Iterator[dict[tuple[str, int], tuple[str, ...]]]:
    """Pins to fill: connections opened in this block (in this task) go to `pins[(host, port)]`, to nothing else."""
    pins: dict[tuple[str, int], tuple[str, ...]] = {}
    token = _PINS.set(pins)
    try:
        yield pins
    finally:
        _PINS.reset(token)


def interleaved(addresses: Sequence[str]) -> list[str]:
    """`addresses` in the order RFC 8305 (section 4) dials them: IPv6 and IPv4 alternating, the first address's
    family first, each family in the resolver's order (which sorted them by RFC 6724)."""
    first = ip_address(addresses[0]).version
    same = [a for a in addresses if ip_address(a).version == first]
    other = [a for a in addresses if ip_address(a).version != first]
    return [a for pair in itertools.zip_longest(same, other) for a in pair if a is not None]


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's AnyIO backend connecting to the addresses pinned for a host and port, never to the name itself
    (a second resolution could answer differently). A host with no pin is refused: fails closed.

    The pinned addresses are raced as happy eyeballs does (RFC 8305): `interleaved`, the next started `delay_s` after
    the last or as soon as one fails, the first connection kept and the others cancelled or closed, all within the
    connect timeout. Tried one after another, each with the whole timeout (the fetch's), a black-holed first address
    left none to the second. anyio races only the addresses it resolves itself: given an IP it makes one attempt."""

    delay_s = 0.25  # RFC 8305's Connection Attempt Delay, anyio's happy_eyeballs_delay

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = (_PINS.get() or {}).get((host, port))
        if not addresses:
            raise httpcore.ConnectError(f"no checked address for {host}:{port}")
        options = list(socket_options or ())
        try:
            with anyio.fail_after(timeout):
                return await self._race(interleaved(addresses), port, local_address, options)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"no connection to {host}:{port} within {timeout:g} s") from None

    async def _race(
        self,
        addresses: list[str],
        port: int,
        local_address: str | None,
        socket_options: list[httpcore.SOCKET_OPTION],
    ) -> httpcore.AsyncNetworkStream:
        winner: httpcore.AsyncNetworkStream | None = None
        errors: list[tuple[str, Exception]] = []

        async def attempt(address: str) -> None:
            nonlocal winner
            try:
                stream = await self._inner.connect_tcp(address, port, None, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                errors.append((address, exc))
                failed.set()
                return
            if winner is None:
                winner = stream
                attempts.cancel_scope.cancel()
            else:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()

        try:
            async with anyio.create_task_group() as attempts:
                for address in addresses:
                    failed = anyio.Event()  # set by a failing attempt: the next starts without waiting out the delay
                    attempts.start_soon(attempt, address)
                    with anyio.move_on_after(self.delay_s):
                        await failed.wait()
        except BaseException:
            if winner is not None:
                with anyio.CancelScope(shield=True):
                    await winner.aclose()
            raise
        if winner is not None:
            return winner
        if len(errors) == 1:
            raise errors[0][1]
        raise httpcore.ConnectError("; ".join(f"{address}: {exc}" for address, exc in errors)) from errors[0][1]

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("image fetches use TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: typing.AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._stream:
            yield part

    async def aclose(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()


class PinnedTransport(httpx.AsyncBaseTransport):
    """httpx's default transport (an httpcore connection pool, httpx's limits) over `PinnedBackend`: httpx's own
    transport takes no network backend. httpcore's errors come out as they are (`HTTPCORE_ERRORS`)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context or httpx.create_ssl_context(trust_env=False),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=PinnedBackend(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        url = httpcore.URL(
            scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port, target=request.url.raw_path
        )
        response = await self._pool.handle_async_request(
            httpcore.Request(
                method=request.method,
                url=url,
                headers=request.headers.raw,
                content=request.stream,
                extensions=request.extensions,
            )
        )
        assert isinstance(response.stream, typing.AsyncIterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


def _origin(url: str, param: str) -> tuple[str, int, str]:
    """(host, port, scheme) as the connection pool will name the URL's origin: IDNA-encoded, port filled in."""
    try:
        parsed = httpx.URL(url)
        return parsed.raw_host.decode("ascii"), parsed.port or DEFAULT_PORTS[parsed.scheme], parsed.scheme
    except (httpx.InvalidURL, UnicodeError, KeyError):
        raise ImageError("malformed image URL", param=param) from None


_HOLD: ContextVar[list[int] | None] = ContextVar("rlaifv_image_pixels_held", default=None)


class ImageLoader:
    """Turns image references into PIL images; owns the HTTP client for allowed remote hosts.

    Decoded pixels are counted against `RLAIFV_MAX_QUEUED_IMAGE_PIXELS` from before each image is decoded until
    the request that holds them ends (`holding`): checked only at the scheduler, after every image of a request
    was decoded, 24 concurrent requests of four 4096x4096 images held 7 GB, and a request waiting on a remote
    generator or an identical request held its images uncounted. Past the budget a request is a 429 before its
    next image is decoded (one request is always let in, as the scheduler does). `resolve` looks up an allowed host's
    addresses (tests answer as a rebinding DNS server would)."""

    def __init__(
        self, settings: Settings, *, rejected: Callable[[], None] = _none, resolve: Resolver | None = None
    ) -> None:
        self.settings = settings
        self.limits = settings.image_limits()
        self.rejected = rejected
        self._lookups = HostLookups(resolve if resolve is not None else SystemResolver())
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

    def hand_over(self, work: asyncio.Future[Any]) -> None:
        """The images this request holds stay counted until `work` ends instead: work shared with other requests
        (`SharedWork`) goes on with them after this request has left."""
        held = _HOLD.get()
        if held is None or work.done():
            return
        pixels = sum(held)
        held.clear()

        def release(_: object) -> None:
            self.in_hand -= pixels

        work.add_done_callback(release)

    async def aclose(self) -> None:
        self._lookups.drop_unwaited()
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

    async def load(self, refs: list[tuple[str, str]]) -> tuple[list[Any], list[bytes]]:
        """Decoded images and their bytes, in order, each decoded before the next is read: the first bad one
        ends the request (and no later URL is fetched for nothing). Decoding runs off the event loop."""
        images: list[Any] = []
        raw: list[bytes] = []
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
            entry = allowing_entry(url, allowed)
        except ValueError:
            raise ImageError("malformed image URL", param=param) from None
        if entry is None:
            if host_listed(origin, allowed):
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
                transport=PinnedTransport(),
                headers={"Accept-Encoding": "identity"},  # images are compressed already; gzip is still taken
            )
        limit = self.settings.image_fetch_timeout_s
        addresses: tuple[Address, ...] = ()
        try:  # httpx's timeout bounds each read: a host sending a byte at a time held the request for ever
            async with asyncio.timeout(limit):
                addresses = await self._addresses(url, origin, entry, param)
                with pinned() as pins:
                    return await self._follow(self._client, url, origin, addresses, pins, param)
        except TimeoutError:
            if not addresses:
                raise ImageError(f"image host '{origin}' not resolved within {limit:g} s", param=param) from None
            raise ImageError(f"image URL not fetched within {limit:g} s", param=param) from None

    async def _addresses(self, url: str, origin: str, entry: str, param: str) -> tuple[Address, ...]:
        """The URL host's addresses: looked up once for the whole fetch, redirects included, within the lookups
        of `entry` (the allowed-hosts entry the URL matched)."""
        host, port, _ = _origin(url, param)
        literal = as_address(host)
        if literal is not None:
            return (literal,)
        try:
            addresses = tuple(dict.fromkeys(ip_address(a) for a in await self._lookups(host, port, entry)))
        except (OSError, ValueError, UnicodeError) as exc:
            reason = f" ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else ""
            raise ImageError(f"image host '{origin}' could not be resolved{reason}", param=param) from None
        if not addresses:
            raise ImageError(f"image host '{origin}' could not be resolved", param=param)
        return addresses

    def _checked(
        self, url: str, origin: str, addresses: tuple[Address, ...], param: str
    ) -> dict[tuple[str, int], tuple[str, ...]]:
        """{`url`'s origin: `addresses`}, each address checked for the URL's port and scheme: the pin its
        connections use."""
        host, port, scheme = _origin(url, param)
        for address in addresses:
            refusal = address_refusal(
                origin,
                address,
                port,
                scheme,
                self.settings.allowed_image_hosts,
                private_allowed=self.settings.allow_private_image_addresses,
            )
            if refusal and as_address(host) is None:
                # The caller named a host, not this address: where internal names point (split-horizon DNS behind
                # a wildcard entry) is the operator's to read, in the log, not any caller's.
                log.warning("remote image refused: %s", refusal)
                raise ImageError(
                    f"image host '{origin}' resolves to a non-public address ({address_kind(address)}); the server's"
                    " operator can allow it (the server's log names the address and the entry to add)",
                    param=param,
                )
            if refusal:
                raise ImageError(refusal, param=param)
        return {(host, port): tuple(str(a) for a in addresses)}

    async def _follow(
        self,
        client: httpx.AsyncClient,
        url: str,
        origin: str,
        addresses: tuple[Address, ...],
        pins: dict[tuple[str, int], tuple[str, ...]],
        param: str,
    ) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            pins.update(self._checked(url, origin, addresses, param))
            try:
                async with client.stream("GET", url) as response:
                    if response.has_redirect_location:  # a 3xx without one is an answer, not a redirect to itself
                        target = urljoin(url, response.headers["location"])
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
            except (httpx.HTTPError, httpx.InvalidURL, *HTTPCORE_ERRORS, ValueError) as exc:
                raise ImageError(f"cannot fetch image URL: {type(exc).__name__}", param=param) from None
        raise ImageError("image URL redirects too many times", param=param)
