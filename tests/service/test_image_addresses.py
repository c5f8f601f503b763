"""Remote images are fetched only from addresses that were checked: an allowed name resolving to a loopback,
private, link-local or cloud metadata address is refused unless the operator allowed that address (an IP or CIDR
entry, or RLAIFV_ALLOW_PRIVATE_IMAGE_ADDRESSES for the private ranges), and the connection goes to the address
checked, so a second DNS answer (rebinding) cannot swap it. An entry like `*.example.com` let a caller point a
subdomain at 169.254.169.254 or 127.0.0.1 and the server fetched it. A name's checked addresses are raced as happy
eyeballs does (RFC 8305): tried one after another, each with the fetch's whole time limit, they left no time after
a black-holed first address for the second."""

from __future__ import annotations

import asyncio
import logging
import re
import select
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path

import anyio
import httpcore
import httpx
import pytest

from rlaifv.reward.errors import ImageError
from rlaifv.service.images import ImageLoader, PinnedBackend, PinnedTransport, interleaved, pinned
from rlaifv.service.settings import Settings
from rlaifv.service.urls import address_kind, address_refusal, url_allowed
from tests.service.conftest import png_bytes

PUBLIC_IMAGE = png_bytes((24, 24), (0, 0, 250))  # served by the address the checks allowed
INTERNAL = png_bytes((24, 24), (250, 0, 0))  # served by the internal address a rebinding answer points at


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Host", "")))
        status, headers, body = self.server.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class Server(ThreadingHTTPServer):
    def __init__(
        self,
        address: tuple[str, int],
        routes: dict,
        family: int = socket.AF_INET,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address_family = family
        super().__init__(address, Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.routes, self.seen = routes, []
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class Resolver:
    """A DNS server the test controls: successive answers per name (the last one repeats), every question kept."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers, self.asked = answers, []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        answers = self.answers.get(host)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers[min(self.asked.count(host), len(answers)) - 1]


@pytest.fixture(scope="module")
def hosts() -> Iterator[dict[str, Server]]:
    """'checked' on 127.0.0.2 and 'internal' on 127.0.0.1, both on the same port (so only the address tells them
    apart), and 'other_port' on 127.0.0.2 on another port."""
    for _ in range(20):
        try:
            checked = Server(("127.0.0.2", 0), {"/a.png": (200, {}, PUBLIC_IMAGE)})
        except OSError:
            pytest.skip("needs 127.0.0.2 (Linux routes 127.0.0.0/8 to the loopback)")
        try:
            internal = Server(("127.0.0.1", checked.port), {"/a.png": (200, {}, INTERNAL)})
            break
        except OSError:
            checked.stop()
    else:
        pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2")
    other_port = Server(("127.0.0.2", 0), {"/a.png": (200, {}, PUBLIC_IMAGE)})
    checked.routes |= {
        "/same-host-redirect": (302, {"Location": "/a.png"}, b""),
        "/other-port-redirect": (302, {"Location": f"http://img.test:{other_port.port}/a.png"}, b""),
        "/other-name-redirect": (302, {"Location": f"http://internal.test:{checked.port}/a.png"}, b""),
        "/redirect-to-nowhere": (302, {}, b""),
    }
    servers = {"checked": checked, "internal": internal, "other_port": other_port}
    yield servers
    for server in servers.values():
        server.stop()


async def fetch(url: str, resolver: Resolver, allowed: str, **settings) -> bytes:
    loader = ImageLoader(Settings(allowed_image_hosts=allowed.split(","), **settings), resolve=resolver)
    try:
        return await loader.read(url, "images[0]")
    finally:
        await loader.aclose()


async def refused(url: str, resolver: Resolver, allowed: str, **settings) -> str:
    """The fetch's refusal as the operator reads it in the log (the caller is not shown the address)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("rlaifv.service")
    logger.addHandler(handler)
    try:
        with pytest.raises(ImageError, match="resolves to a non-public address") as info:
            await fetch(url, resolver, allowed, **settings)
    finally:
        logger.removeHandler(handler)
    assert not any(ch.isdigit() for ch in str(info.value).split("(")[1].split(")")[0]), info.value  # kind only
    return "\n".join(r.getMessage() for r in records)


@pytest.mark.integration
async def test_a_listed_name_resolving_to_loopback_is_refused_by_default(hosts, caplog) -> None:
    """The caller is told what kind of address the name has, never the address (split-horizon DNS behind a wildcard
    entry would show internal addresses to any caller); the log tells the operator the address and the entry."""
    port, seen = hosts["internal"].port, len(hosts["internal"].seen)
    resolver = Resolver({"img.test": [["127.0.0.1"]]})
    for allowed in (f"img.test:{port}", "*.test:*"):
        caplog.clear()
        with pytest.raises(ImageError, match=r"image host 'img.test' resolves to a non-public address") as info:
            await fetch(f"http://img.test:{port}/a.png", resolver, allowed)
        assert info.value.param == "images[0]"
        assert "address (loopback); the server's operator can allow it" in str(info.value)
        assert "127.0.0.1" not in str(info.value)
        logged = [r.getMessage() for r in caplog.records if r.name == "rlaifv.service"]
        assert any(
            f"(127.0.0.1, loopback); the server's operator can allow it with an entry '127.0.0.1:{port}'" in m
            and "RLAIFV_ALLOW_PRIVATE_IMAGE_ADDRESSES" not in m  # the setting would not open loopback
            for m in logged
        ), logged
    assert len(hosts["internal"].seen) == seen


@pytest.mark.integration
@pytest.mark.parametrize("entry", ["127.0.0.1:{port}", "127.0.0.1:*", "127.0.0.0/8:{port}"])
async def test_an_ip_or_cidr_entry_covering_the_address_and_port_allows_it(hosts, entry) -> None:
    port = hosts["internal"].port
    resolver = Resolver({"img.test": [["127.0.0.1"]]})
    allowed = f"img.test:{port}," + entry.format(port=port)
    assert await fetch(f"http://img.test:{port}/a.png", resolver, allowed) == INTERNAL


@pytest.mark.integration
async def test_an_address_entry_allows_its_own_port_only(hosts, caplog) -> None:
    port = hosts["internal"].port
    with pytest.raises(ImageError, match="non-public address"):
        await fetch(f"http://img.test:{port}/a.png", Resolver({"img.test": [["127.0.0.1"]]}), "*.test:*,127.0.0.1")
    assert f"an entry '127.0.0.1:{port}'" in caplog.text


@pytest.mark.integration
async def test_ip_literal_urls_work_as_before_without_resolving(hosts) -> None:
    port, resolver = hosts["internal"].port, Resolver({})
    assert await fetch(f"http://127.0.0.1:{port}/a.png", resolver, f"127.0.0.1:{port}") == INTERNAL
    assert resolver.asked == []
    with pytest.raises(ImageError, match="not in the allowed hosts"):  # a name entry never names an IP literal
        await fetch("http://10.0.0.1/a.png", resolver, "*.0.1")


@pytest.mark.integration
async def test_a_rebinding_answer_cannot_swap_the_checked_address(hosts) -> None:
    """The name is resolved once per fetch and every connection (two here: a redirect on a closing HTTP/1.0 server)
    goes to the address checked, never to a second answer (127.0.0.1, on the same port)."""
    port, seen = hosts["checked"].port, len(hosts["internal"].seen)
    resolver = Resolver({"img.test": [["127.0.0.2"], ["127.0.0.1"]]})
    allowed = f"img.test:{port},127.0.0.2:*"
    assert await fetch(f"http://img.test:{port}/same-host-redirect", resolver, allowed) == PUBLIC_IMAGE
    assert resolver.asked == ["img.test"]
    assert hosts["checked"].seen[-2:] == [("/same-host-redirect", f"img.test:{port}"), ("/a.png", f"img.test:{port}")]
    with pytest.raises(ImageError, match=r"resolves to a non-public address \(loopback\)"):
        await fetch(f"http://img.test:{port}/a.png", resolver, allowed)  # the next fetch checks its own answer
    assert len(hosts["internal"].seen) == seen


@pytest.mark.integration
async def test_redirects_are_checked_like_the_first_url(hosts) -> None:
    port, other = hosts["checked"].port, hosts["other_port"].port
    resolver = Resolver({"img.test": [["127.0.0.2"]], "internal.test": [["127.0.0.1"]]})
    with pytest.raises(ImageError, match="redirects to another host"):
        await fetch(f"http://img.test:{port}/other-name-redirect", resolver, f"*.test:*,127.0.0.2:{port}")
    seen = len(hosts["other_port"].seen)
    logged = await refused(f"http://img.test:{port}/other-port-redirect", resolver, f"*.test:*,127.0.0.2:{port}")
    assert re.search(rf"\(127\.0\.0\.2, loopback\).*an entry '127\.0\.0\.2:{other}'", logged), logged
    assert len(hosts["other_port"].seen) == seen
    allowed = "*.test:*,127.0.0.2:*"
    assert await fetch(f"http://img.test:{port}/other-port-redirect", resolver, allowed) == PUBLIC_IMAGE
    assert resolver.asked.count("img.test") == 3  # once per fetch


@pytest.mark.integration
async def test_a_3xx_without_a_location_is_its_own_answer_fetched_once(hosts) -> None:
    """httpx calls every 3xx a redirect: one without a Location was fetched again as a redirect to itself until
    the redirect limit, and the error blamed too many redirects."""
    port, seen = hosts["checked"].port, len(hosts["checked"].seen)
    resolver = Resolver({"img.test": [["127.0.0.2"]]})
    with pytest.raises(ImageError, match="image URL answered HTTP 302"):
        await fetch(f"http://img.test:{port}/redirect-to-nowhere", resolver, f"img.test:{port},127.0.0.2:*")
    assert len(hosts["checked"].seen) == seen + 1


async def test_the_private_address_setting_opens_private_ranges_only(monkeypatch) -> None:
    """With RLAIFV_ALLOW_PRIVATE_IMAGE_ADDRESSES a name may resolve to 10.1.2.3 (an in-cluster store), and the
    connection goes there; loopback and metadata addresses stay refused."""
    dialed: list[tuple[str, int]] = []

    async def connect_tcp(self, host: str, port: int, *args, **kwargs):
        dialed.append((host, port))
        raise httpcore.ConnectError("test: no network")

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", connect_tcp)
    resolver = Resolver({"store.test": [["10.1.2.3"]], "meta.test": [["169.254.169.254"]], "lo.test": [["::1"]]})
    logged = await refused("http://store.test/a.png", resolver, "*.test")
    assert re.search(r"\(10\.1\.2\.3, private\).*RLAIFV_ALLOW_PRIVATE_IMAGE_ADDRESSES=true", logged), logged
    assert dialed == []
    with pytest.raises(ImageError, match="cannot fetch image URL: ConnectError"):
        await fetch("http://store.test/a.png", resolver, "*.test", allow_private_image_addresses=True)
    assert dialed == [("10.1.2.3", 80)]
    for url, fragment in [("http://meta.test/", "169.254.169.254, cloud metadata"), ("http://lo.test/", "::1, loop")]:
        assert fragment in await refused(url, resolver, "*.test", allow_private_image_addresses=True)
    assert dialed == [("10.1.2.3", 80)]


async def test_one_non_public_answer_among_public_ones_refuses_the_host(monkeypatch) -> None:
    async def connect_tcp(self, host: str, port: int, *args, **kwargs):
        raise AssertionError(f"dialled {host}:{port}")

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", connect_tcp)
    resolver = Resolver({"img.test": [["93.184.215.14", "2606:2800:21f:cb07::1", "::ffff:169.254.169.254"]]})
    logged = await refused("https://img.test/a.png", resolver, "img.test")
    assert re.search(r"non-public address \(::ffff:\S+, cloud metadata\)", logged), logged  # 3.13: dotted


async def test_a_name_that_does_not_resolve_is_a_400_saying_so() -> None:
    with pytest.raises(
        ImageError, match=r"image host 'nowhere\.test' could not be resolved \(Name or service not known\)"
    ) as info:
        await fetch("http://nowhere.test/a.png", Resolver({}), "*.test")
    assert info.value.param == "images[0]"


@pytest.mark.integration
async def test_ipv6_literals_and_names(hosts) -> None:
    try:
        server = Server(("::1", 0), {"/a.png": (200, {}, PUBLIC_IMAGE)}, family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        port = server.port
        resolver = Resolver({"v6.test": [["::1"]]})
        assert await fetch(f"http://[::1]:{port}/a.png", resolver, f"[::1]:{port}") == PUBLIC_IMAGE
        logged = await refused(f"http://v6.test:{port}/a.png", resolver, f"v6.test:{port}")
        assert re.search(rf"\(::1, loopback\).*an entry '\[::1\]:{port}'", logged), logged
        assert await fetch(f"http://v6.test:{port}/a.png", resolver, f"v6.test:{port},[::1/128]:*") == PUBLIC_IMAGE
        assert server.seen[-1] == ("/a.png", f"v6.test:{port}")
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("10.0.0.5", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),
        ("100.64.0.1", "shared (CGNAT)"),
        ("169.254.169.254", "cloud metadata"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("192.0.0.8", "reserved"),
        ("198.18.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("2001:db8::1", "reserved"),
        ("::7f00:1", "reserved"),  # IPv4-compatible, deprecated
        ("4000::1", "reserved"),  # outside 2000::/3, the only global unicast block
    ],
)
def test_address_kinds(address, kind) -> None:
    """Python 3.11's `is_global` calls 224.0.0.1, ff02::1, 192.0.0.8 and ::ffff:127.0.0.1's relatives global."""
    assert address_kind(ip_address(address)) == kind


@pytest.mark.parametrize(
    ("address", "opened"),
    [
        ("10.0.0.5", True),
        ("100.64.0.1", True),
        ("fd12::1", True),
        ("127.0.0.1", False),
        ("169.254.169.254", False),
        ("169.254.1.1", False),
        ("fd00:ec2::254", False),
        ("100.100.100.200", False),
        ("0.0.0.0", False),
    ],
)
def test_the_private_setting_opens_private_and_cgnat_ranges_only(address, opened) -> None:
    refusal = address_refusal("img.test", ip_address(address), 443, "https", ["img.test"], private_allowed=True)
    assert (refusal is None) is opened
    assert address_refusal("img.test", ip_address(address), 443, "https", ["img.test"]) is not None
    cidr = f"[{address}/64]:443" if ":" in address else f"{address}/24"
    assert address_refusal("img.test", ip_address(address), 443, "https", ["img.test", cidr]) is None


def test_an_ipv4_entry_covers_the_ipv6_forms_that_reach_its_address() -> None:
    for form in ("::ffff:10.0.0.5", "64:ff9b::a00:5"):
        assert address_refusal("img.test", ip_address(form), 443, "https", ["img.test"]) is not None
        assert address_refusal("img.test", ip_address(form), 443, "https", ["img.test", "10.0.0.0/8"]) is None


def test_ip_and_cidr_entries_name_ip_literal_urls() -> None:
    allowed = ["10.0.0.0/8:9000", "[fd00::/8]:*", "192.168.1.7", "*.0.1"]
    assert url_allowed("http://10.1.2.3:9000/a.png", allowed)
    assert not url_allowed("http://10.1.2.3:9001/a.png", allowed)
    assert not url_allowed("http://11.0.0.1:9000/a.png", allowed)
    assert url_allowed("http://[fd12::1]:1234/a.png", allowed)
    assert url_allowed("https://192.168.1.7/a.png", allowed) and not url_allowed("https://192.168.1.8/a.png", allowed)
    assert not url_allowed("http://10.0.0.1:9001/a.png", allowed)  # '*.0.1' is a name entry: no IP literal matches it


async def test_a_connection_without_a_checked_address_is_refused() -> None:
    """The backend fails closed: a host and port no fetch pinned (or pinned on another port) is never dialled."""
    backend = PinnedBackend()
    with pytest.raises(httpcore.ConnectError, match=r"no checked address for img\.test:80"):
        await backend.connect_tcp("img.test", 80)
    with pinned() as pins, pytest.raises(httpcore.ConnectError, match="no checked address"):
        pins[("img.test", 8080)] = ("127.0.0.1",)
        await backend.connect_tcp("img.test", 80)


class FakeStream(httpcore.AsyncNetworkStream):
    def __init__(self, address: str) -> None:
        self.address, self.closed = address, False

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True


class Dialer:
    """httpcore's AnyIO backend as the pinned backend dials it, faked per address: "refuse" fails at once, "hang"
    never answers (SYNs dropped), a number connects after that many seconds, an event connects when it is set (even
    if the attempt was cancelled meanwhile: both answered at once), a function is called and connects at once; a
    connect timeout given is kept, as the real backend does. Every dial (loop time, address, port), every stream and
    every cancelled attempt is kept."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, plan: dict[str, str | float | anyio.Event | Callable[[], None]]
    ) -> None:
        self.plan = plan
        self.dialled: list[tuple[float, str, int]] = []
        self.streams: list[FakeStream] = []
        self.cancelled: list[str] = []
        self.start = asyncio.get_running_loop().time()
        monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", self.connect_tcp)

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, *args, **kwargs) -> FakeStream:
        self.dialled.append((self.now(), host, port))
        how = self.plan[host]
        try:
            with anyio.fail_after(timeout):
                if how == "refuse":
                    raise httpcore.ConnectError("[Errno 111] Connection refused")
                if how == "hang":
                    await anyio.sleep_forever()
                if isinstance(how, anyio.Event):
                    with anyio.CancelScope(shield=True), anyio.move_on_after(60):  # a guard: set in time, or a hang
                        await how.wait()
                elif isinstance(how, float):
                    await anyio.sleep(how)
                elif callable(how):
                    how()
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(host)
            raise
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"timed out after {timeout} s") from None
        self.streams.append(FakeStream(host))
        return self.streams[-1]

    def now(self) -> float:
        return round(asyncio.get_running_loop().time() - self.start, 6)


async def connect(addresses: Sequence[str], timeout: float = 5.0) -> httpcore.AsyncNetworkStream:
    with pinned() as pins:
        pins[("img.test", 443)] = tuple(addresses)
        return await PinnedBackend().connect_tcp("img.test", 443, timeout=timeout)


def test_addresses_are_tried_with_the_families_interleaved_the_first_ones_first() -> None:
    assert interleaved(["2001:db8::1", "2001:db8::2", "2001:db8::3", "192.0.2.1", "192.0.2.2"]) == [
        *("2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2", "2001:db8::3"),
    ]
    assert interleaved(["192.0.2.1", "192.0.2.2", "::ffff:192.0.2.3", "2001:db8::1"]) == [
        *("192.0.2.1", "::ffff:192.0.2.3", "192.0.2.2", "2001:db8::1"),
    ]
    assert interleaved(["192.0.2.2", "192.0.2.1"]) == ["192.0.2.2", "192.0.2.1"]


@pytest.mark.looptime
async def test_the_next_address_is_dialled_250_ms_after_the_last_and_the_first_connection_is_kept(
    monkeypatch,
) -> None:
    """A black-holed address holds no other up: each one after it is dialled 250 ms after the one before, in the
    interleaved order, and the first to connect is kept; the attempts still running are cancelled, and only the
    pinned addresses are dialled (the fifth never: a connection came first)."""
    pinned_ = ["2001:db8::1", "2001:db8::2", "2001:db8::3", "192.0.2.1", "192.0.2.2"]
    dialer = Dialer(monkeypatch, dict.fromkeys(pinned_[:4], "hang") | {"192.0.2.2": 0.1})
    stream = await connect(pinned_)
    assert isinstance(stream, FakeStream) and stream.address == "192.0.2.2" and not stream.closed
    assert dialer.dialled == [
        *((0.0, "2001:db8::1", 443), (0.25, "192.0.2.1", 443), (0.5, "2001:db8::2", 443), (0.75, "192.0.2.2", 443)),
    ]
    assert dialer.now() == 0.85
    assert sorted(dialer.cancelled) == ["192.0.2.1", "2001:db8::1", "2001:db8::2"]


@pytest.mark.looptime
async def test_a_refused_address_moves_on_at_once(monkeypatch) -> None:
    dialer = Dialer(monkeypatch, {"192.0.2.1": "refuse", "192.0.2.2": "refuse", "192.0.2.3": 0.0})
    stream = await connect(["192.0.2.1", "192.0.2.2", "192.0.2.3"])
    assert isinstance(stream, FakeStream) and stream.address == "192.0.2.3"
    assert dialer.dialled == [(0.0, "192.0.2.1", 443), (0.0, "192.0.2.2", 443), (0.0, "192.0.2.3", 443)]
    dialer.plan["192.0.2.3"] = "refuse"
    with pytest.raises(httpcore.ConnectError, match=r"192\.0\.2\.1: .*refused; 192\.0\.2\.2: .*; 192\.0\.2\.3: "):
        await connect(["192.0.2.1", "192.0.2.2", "192.0.2.3"])
    assert dialer.now() == 0.0


@pytest.mark.looptime
async def test_a_loser_that_connected_too_is_closed(monkeypatch) -> None:
    """Both connect at the same moment (dialling the second completes the first): one is kept, the other closed."""
    both = anyio.Event()
    dialer = Dialer(monkeypatch, {"192.0.2.1": both, "192.0.2.2": both.set})
    stream = await connect(["192.0.2.1", "192.0.2.2"])
    assert [s.address for s in dialer.streams] == ["192.0.2.2", "192.0.2.1"]
    assert stream is dialer.streams[0] and not stream.closed and dialer.streams[1].closed


@pytest.mark.looptime
async def test_the_race_ends_within_the_connect_timeout(monkeypatch) -> None:
    dialer = Dialer(
        monkeypatch, dict.fromkeys(["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4", "192.0.2.5"], "hang")
    )
    with pytest.raises(httpcore.ConnectTimeout, match=r"no connection to img\.test:443 within 0\.6 s"):
        await connect(["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4", "192.0.2.5"], timeout=0.6)
    assert dialer.now() == 0.6
    assert [a for _, a, _ in dialer.dialled] == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    assert sorted(dialer.cancelled) == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]


@pytest.fixture
def black_hole(hosts) -> Iterator[None]:
    """127.0.0.3 on the 'checked' server's port dropping every SYN: a listener that never accepts, its queue full."""
    listener = socket.socket()
    filler = socket.socket()
    try:
        try:
            listener.bind(("127.0.0.3", hosts["checked"].port))
        except OSError:
            pytest.skip("127.0.0.3 not usable on the test port")
        listener.listen(0)
        filler.connect(("127.0.0.3", hosts["checked"].port))  # the one connection the queue holds
        assert select.select([listener], [], [], 10)[0], "the filler connection never reached the queue"
        yield
    finally:
        filler.close()
        listener.close()


@pytest.mark.integration
async def test_a_black_holed_first_address_leaves_time_for_the_second(hosts, black_hole) -> None:
    """The reviewer's case: the name's first address drops SYNs, the second serves; tried one after another, the
    first took the whole 5 s limit and the fetch failed."""
    port, loop = hosts["checked"].port, asyncio.get_running_loop()
    resolver = Resolver({"img.test": [["127.0.0.3", "127.0.0.2"]]})
    start = loop.time()
    assert await fetch(f"http://img.test:{port}/a.png", resolver, f"img.test:{port},127.0.0.0/8:{port}") == (
        PUBLIC_IMAGE
    )
    assert loop.time() - start < 2.5  # 250 ms in all, the limit being 5 s


@pytest.fixture(scope="module")
def tls_host(tmp_path_factory) -> Iterator[tuple[Server, ssl.SSLContext, list[str]]]:
    """An HTTPS server on 127.0.0.1 whose certificate names img.test only; a client context trusting it; the SNI
    names it was sent."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    folder: Path = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=img.test"),
            *("-addext", "subjectAltName=DNS:img.test", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    sni: list[str] = []
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server_context.sni_callback = lambda sock, name, ctx: sni.append(name)
    server = Server(("127.0.0.1", 0), {"/a.png": (200, {}, PUBLIC_IMAGE)}, tls=server_context)
    yield server, ssl.create_default_context(cafile=str(cert)), sni
    server.stop()


@pytest.mark.integration
async def test_tls_and_the_host_header_stay_on_the_name_while_the_connection_is_pinned(tls_host) -> None:
    server, client_context, sni = tls_host
    port = server.port
    async with httpx.AsyncClient(transport=PinnedTransport(ssl_context=client_context)) as client:
        with pinned() as pins:
            pins |= {("img.test", port): ("127.0.0.1",), ("other.test", port): ("127.0.0.1",)}
            response = await client.get(f"https://img.test:{port}/a.png")
            assert response.status_code == 200 and response.content == PUBLIC_IMAGE
            assert sni[-1] == "img.test" and server.seen[-1] == ("/a.png", f"img.test:{port}")
            with pytest.raises(httpcore.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|Hostname mismatch"):
                await client.get(f"https://other.test:{port}/a.png")  # the certificate is checked against the name
