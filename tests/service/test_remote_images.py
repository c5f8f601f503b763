"""Remote image URLs: refused by default; from allowed hosts fetched with a size cap and no cross-host redirects."""

from __future__ import annotations

import gzip
import threading
import tracemalloc
import zlib
from http.server import BaseHTTPRequestHandler

import httpx
import pytest

from rlaifv.testing.http_stub import serving
from tests.service.conftest import png_bytes

pytestmark = pytest.mark.integration

IMAGE = png_bytes((24, 24), (0, 0, 250))
BIG = b"\x89PNG" + b"\x00" * 300_000
BOMB = gzip.compress(gzip.compress(b"\x00" * 50_000_000))  # 50 MB in about 1 KB
STOP_TRICKLING = threading.Event()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/trickle.png":  # a host that sends one byte at a time: each read is quick, the whole never
            self.send_response(200)
            self.send_header("Content-Length", str(len(IMAGE)))
            self.end_headers()
            for byte in IMAGE:
                if STOP_TRICKLING.wait(0.05):
                    return
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:
                    return
            return
        routes = {
            "/red.png": (200, {"Content-Type": "image/png"}, IMAGE),
            "/gzipped.png": (200, {"Content-Encoding": "gzip"}, gzip.compress(IMAGE)),
            "/gzip-bomb.png": (200, {"Content-Encoding": "gzip, gzip"}, BOMB),
            "/brotli.png": (200, {"Content-Encoding": "br"}, IMAGE),
            "/big.png": (200, {"Content-Type": "image/png"}, BIG),
            "/missing.png": (404, {}, b"no"),
            "/same-host-redirect": (302, {"Location": "/red.png"}, b""),
            "/other-host-redirect": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
            "/other-port-redirect": (302, {"Location": "http://127.0.0.1:6379/"}, b""),
        }
        status, headers, body = routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def image_host():
    with serving(Handler) as httpd:
        yield f"http://127.0.0.1:{httpd.server_port}"
        STOP_TRICKLING.set()


@pytest.fixture(scope="module")
def remote_server(service_bundle, image_host):
    from tests.service.conftest import LiveServer

    port = image_host.rsplit(":", 1)[1]
    server = LiveServer(
        service_bundle, allowed_image_hosts=f"127.0.0.1:{port},localhost:*,*.example.org", max_image_bytes=200_000
    ).start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("path", "status", "fragment"),
    [
        ("/red.png", 200, None),
        ("/same-host-redirect", 200, None),
        ("/other-host-redirect", 400, "redirects to another host"),
        ("/other-port-redirect", 400, "redirects to another host or port"),
        ("/big.png", 400, "over the limit"),
        ("/missing.png", 400, "HTTP 404"),
        ("/gzipped.png", 200, None),
        ("/gzip-bomb.png", 400, "over the limit"),
        ("/brotli.png", 400, "Content-Encoding 'br'"),
    ],
)
def test_allowed_host(remote_server, image_host, path, status, fragment) -> None:
    body = {"images": [image_host + path], "question": "What is in the image?", "answers": ["a blue square."]}
    r = httpx.post(remote_server.url + "/v1/rewards", json=body, timeout=60)
    assert r.status_code == status, r.text
    if fragment:
        assert fragment in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "images[0]"


def test_remote_image_scores_like_inline(remote_server, image_host) -> None:
    from tests.service.conftest import data_url

    base = {"question": "What is in the image?", "answers": ["a blue square.", "a dog."]}
    remote = httpx.post(
        remote_server.url + "/v1/rewards", json=base | {"images": [image_host + "/red.png"]}, timeout=60
    ).json()
    inline = httpx.post(remote_server.url + "/v1/rewards", json=base | {"images": [data_url(IMAGE)]}, timeout=60).json()
    assert remote["rewards"] == pytest.approx(inline["rewards"], abs=1e-6)


@pytest.mark.parametrize(
    "url", ["http://localhost/red.png", "http://10.0.0.1/x.png", "https://example.org.evil.com/a.png", "http://[::1/x"]
)
def test_host_not_in_list_refused(remote_server, url) -> None:
    r = httpx.post(
        remote_server.url + "/v1/rewards", json={"images": [url], "question": "q", "answers": ["a"]}, timeout=60
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "images[0]"


def test_a_listed_name_resolving_to_a_loopback_address_is_refused(remote_server) -> None:
    """`localhost` stands for any allowed name a caller can point at an internal address (a wildcard over names
    anyone can register, e.g. `*.ngrok.app`): the server fetched from 127.0.0.1 or 169.254.169.254 through it. (The
    list's `127.0.0.1:port` entry allows the other tests' host, on its port only.)"""
    with serving(Handler) as internal:
        body = {"images": [f"http://localhost:{internal.server_port}/red.png"], "question": "q", "answers": ["a"]}
        r = httpx.post(remote_server.url + "/v1/rewards", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "images[0]"
    assert "image host 'localhost' resolves to a non-public address (" in r.json()["error"]["message"]
    assert "loopback" in r.json()["error"]["message"]


def test_host_matching() -> None:
    from rlaifv.service.urls import url_allowed

    assert url_allowed("https://img.example.org/a.png", ["*.example.org"])
    assert url_allowed("https://EXAMPLE.org./a.png", ["example.org"])
    assert not url_allowed("https://example.org.evil.com/a.png", ["*.example.org", "example.org"])
    assert not url_allowed("https://evilexample.org/a.png", ["*.example.org"])


def test_an_entry_without_a_port_allows_the_schemes_default_port_only() -> None:
    """Any port of an allowed host was fetched (an internal service beside the image store; a redirect to another
    port; open and closed ports told apart by the error)."""
    from rlaifv.service.urls import url_allowed

    allowed = ["images.example.org", "store.internal:9000", "*.cdn.example.org:*", "[::1]:8080"]
    assert url_allowed("https://images.example.org/a.png", allowed)
    assert url_allowed("http://images.example.org:80/a.png", allowed)
    assert not url_allowed("https://images.example.org:8443/a.png", allowed)
    assert not url_allowed("http://images.example.org:6379/a.png", allowed)
    assert url_allowed("http://store.internal:9000/a.png", allowed)
    assert not url_allowed("http://store.internal/a.png", allowed)
    assert url_allowed("https://x.cdn.example.org:7000/a.png", allowed)
    assert url_allowed("http://[::1]:8080/a.png", allowed) and not url_allowed("http://[::1]/a.png", allowed)
    assert not url_allowed("ftp://images.example.org/a.png", allowed)


def test_a_port_the_list_does_not_name_is_refused_saying_so(remote_server, image_host) -> None:
    other = image_host.rsplit(":", 1)[0] + ":1"
    body = {"images": [other + "/red.png"], "question": "q", "answers": ["a"]}
    r = httpx.post(remote_server.url + "/v1/rewards", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "images[0]"
    assert "port not allowed for host '127.0.0.1'" in r.json()["error"]["message"]


async def test_a_fetch_is_bounded_as_a_whole_not_per_read(image_host) -> None:
    """httpx's timeout bounds each read: a host trickling bytes held a request ~16 s with a 5 s fetch timeout."""
    from rlaifv.reward.errors import ImageError
    from rlaifv.service.images import ImageLoader
    from rlaifv.service.settings import Settings

    loader = ImageLoader(Settings(allowed_image_hosts="127.0.0.1:*", image_fetch_timeout_s=0.4))
    try:
        with pytest.raises(ImageError, match=r"not fetched within 0\.4 s") as info:
            await loader.read(f"{image_host}/trickle.png", "image")
        assert info.value.param == "image"
    finally:
        await loader.aclose()


def test_a_compressed_body_is_inflated_within_the_byte_cap() -> None:
    """httpx inflated each network chunk whole before the cap was checked: a 590-byte body sent as
    `Content-Encoding: gzip, gzip` took 520 MB of the server's memory to be refused."""
    from rlaifv.reward.errors import ImageError
    from rlaifv.service.images import inflated

    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="over the limit of 200000 bytes"):
            inflated(BOMB, "gzip, gzip", 200_000, "images[0]")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000
    assert inflated(gzip.compress(IMAGE), "gzip", 200_000, "images[0]") == IMAGE
    raw_deflate = zlib.compressobj(wbits=-15)
    assert inflated(raw_deflate.compress(IMAGE) + raw_deflate.flush(), "deflate", 200_000, "images[0]") == IMAGE
    assert inflated(zlib.compress(IMAGE), "Deflate, identity", 200_000, "images[0]") == IMAGE
    with pytest.raises(ImageError, match="not valid gzip"):
        inflated(IMAGE, "gzip", 200_000, "images[0]")


async def test_decoded_pixels_are_counted_from_before_decoding_until_the_request_ends(monkeypatch) -> None:
    """The budget was checked only at the scheduler, after a request's images were all decoded: 24 concurrent
    requests of four 4096x4096 images held 7 GB in decoding, and a request waiting on a remote generator held its
    images uncounted. A request whose next image would take the pixels in hand past RLAIFV_MAX_QUEUED_IMAGE_PIXELS
    is a 429 before that image is decoded; its pixels count until it ends; one request is always let in; an image
    refused anyway (over the pixel limit) is its 400, not a 429."""
    import asyncio
    import base64

    from rlaifv.reward.errors import ImageError
    from rlaifv.service import images as module
    from rlaifv.service.errors import Overloaded
    from rlaifv.service.settings import Settings

    def ref(side: int) -> str:
        return "data:image/png;base64," + base64.b64encode(png_bytes((side, side), (1, 2, 3))).decode()

    entered, go, decode = threading.Event(), threading.Event(), module.decode_image

    def held_decode(*args, **kwargs):
        entered.set()
        go.wait(timeout=30)
        return decode(*args, **kwargs)

    rejected: list[int] = []
    loader = module.ImageLoader(
        Settings(max_queued_image_pixels=30_000, max_image_pixels=100_000), rejected=lambda: rejected.append(1)
    )
    request_done = asyncio.Event()

    async def request() -> int:
        with loader.holding():
            images, _ = await loader.load([(ref(100), "images[0]"), (ref(100), "images[1]")])
            await request_done.wait()  # queued, or waiting on a remote generator: the images are still held
            return len(images)

    monkeypatch.setattr(module, "decode_image", held_decode)
    first = asyncio.create_task(request())
    await asyncio.to_thread(entered.wait, 30)
    assert loader.in_hand == 10_000
    with pytest.raises(Overloaded, match="over the limit of 30,000") as info:
        await loader.load([(ref(200), "images[0]")])  # 10,000 in hand + 40,000
    assert info.value.code == "queue_full" and rejected == [1]
    go.set()
    while loader.in_hand < 20_000:  # both decoded, the request not ended
        await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await loader.load([(ref(110), "images[0]")])  # 20,000 held + 12,100
    with pytest.raises(ImageError, match="over the limit"):
        await loader.load([(ref(400), "images[0]")])  # over the pixel limit: its own 400, busy or not
    request_done.set()
    assert await first == 2 and loader.in_hand == 0
    assert len((await loader.load([(ref(200), "images[0]")]))[0]) == 1  # alone: let in, over the budget or not
    assert loader.in_hand == 0
