"""Image hosts are looked up on threads of their own, a bounded number at once: on the loop's default executor, a
DNS server that stopped answering held every thread that image decoding, job files and /metrics run on, so one
caller's URL stalled every request with an image and the readiness probes' /metrics. Those threads are shared
out: one lookup per name, at most `DNS_LOOKUPS_PER_ENTRY` per allowed-hosts entry."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from rlaifv.reward.errors import ImageError
from rlaifv.service.images import DNS_LOOKUPS, DNS_LOOKUPS_PER_ENTRY, ImageLoader, SystemResolver
from rlaifv.service.settings import Settings


class StuckDNS:
    """`socket.getaddrinfo` for "stuck.test" and the names under it that answers only when `answer` is set, as a
    dead DNS server does until glibc gives up; it counts the threads inside it and keeps the names asked. It answers
    "good.test" with 127.0.0.1 at once."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.answer = threading.Event()
        self.lock = threading.Lock()
        self.inside = 0
        self.most_inside = 0
        self.asked: list[str] = []
        self.entered: asyncio.Queue[int] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "good.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]
        if host != "stuck.test" and not str(host).endswith(".stuck.test"):
            return self.real(host, port, *args, **kwargs)
        with self.lock:
            self.asked.append(host)
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        self.loop.call_soon_threadsafe(self.entered.put_nowait, 1)
        try:
            self.answer.wait()
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        finally:
            with self.lock:
                self.inside -= 1


@pytest.fixture
async def stuck_dns(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[StuckDNS]:
    dns = StuckDNS(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    yield dns
    dns.answer.set()


async def test_stuck_lookups_leave_the_default_executor_free(stuck_dns: StuckDNS) -> None:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2))  # as small as any machine's, so the test is exact
    resolver = SystemResolver(lookups=2)
    lookups = [asyncio.create_task(resolver("stuck.test", 80)) for _ in range(4)]
    async with asyncio.timeout(30):  # a guard: before, the default executor's threads waited for the DNS server
        for _ in range(2):
            await stuck_dns.entered.get()
        assert await asyncio.to_thread(sum, (1, 2)) == 3
    assert stuck_dns.inside == 2  # the other two wait for a slot, not in threads

    stuck_dns.answer.set()
    results = await asyncio.gather(*lookups, return_exceptions=True)
    assert all(isinstance(r, socket.gaierror) for r in results), results
    assert stuck_dns.most_inside == 2


async def test_a_lookup_given_up_on_keeps_its_slot_until_its_thread_ends(stuck_dns: StuckDNS) -> None:
    """Fetches that time out stop waiting, but their threads are still in getaddrinfo: counting the callers
    instead of the threads would start a new thread for every retry against the same dead server."""
    resolver = SystemResolver(lookups=2)
    abandoned = [asyncio.create_task(resolver("stuck.test", 80)) for _ in range(2)]
    for _ in range(2):
        await stuck_dns.entered.get()
    for task in abandoned:
        task.cancel()
    await asyncio.gather(*abandoned, return_exceptions=True)

    waiting = asyncio.create_task(resolver("stuck.test", 80))
    await asyncio.sleep(0)
    assert resolver.slots.locked() and stuck_dns.inside == 2 and not waiting.done()

    stuck_dns.answer.set()
    with pytest.raises(socket.gaierror):
        await waiting
    assert stuck_dns.most_inside == 2


async def test_a_real_name_still_resolves() -> None:
    assert "127.0.0.1" in await SystemResolver()("localhost", 80) or "::1" in await SystemResolver()("localhost", 80)


async def test_a_fetch_whose_host_is_not_resolved_in_time_says_so(stuck_dns: StuckDNS) -> None:
    loader = ImageLoader(Settings(allowed_image_hosts=["stuck.test"], image_fetch_timeout_s=0.2))
    try:
        with pytest.raises(ImageError, match=r"image host 'stuck.test' not resolved within 0\.2 s") as info:
            await loader.read("http://stuck.test/a.png", "images[0]")
    finally:
        await loader.aclose()
    assert info.value.param == "images[0]"


NOT_KNOWN = r"could not be resolved \(Name or service not known\)"


async def test_names_under_a_stuck_wildcard_leave_other_hosts_their_lookups(stuck_dns: StuckDNS) -> None:
    """Callers name any host under a wildcard entry: `a0.stuck.test`, `a1.stuck.test`, ..., whose DNS server does
    not answer, took all `DNS_LOOKUPS` threads, and every other allowed host was 'not resolved within' meanwhile."""
    loader = ImageLoader(Settings(allowed_image_hosts=["*.stuck.test", "good.test"], image_fetch_timeout_s=5))
    stuck = [
        asyncio.create_task(loader.read(f"http://a{i}.stuck.test/a.png", f"images[{i}]")) for i in range(DNS_LOOKUPS)
    ]
    try:
        async with asyncio.timeout(30):  # a guard
            for _ in range(DNS_LOOKUPS_PER_ENTRY):
                await stuck_dns.entered.get()
        # looked up at once (before, it waited for a thread until its timeout), then refused for its address
        with pytest.raises(ImageError, match=r"image host 'good.test' resolves to a non-public address \(loopback\)"):
            await loader.read("http://good.test/a.png", "images[9]")
        assert stuck_dns.inside == DNS_LOOKUPS_PER_ENTRY and not any(task.done() for task in stuck)

        stuck_dns.answer.set()
        results = await asyncio.gather(*stuck, return_exceptions=True)
    finally:
        await loader.aclose()
    assert all(isinstance(r, ImageError) and re.search(NOT_KNOWN, str(r)) for r in results), results
    assert stuck_dns.most_inside == DNS_LOOKUPS_PER_ENTRY


async def test_concurrent_fetches_of_one_name_share_its_lookup(stuck_dns: StuckDNS) -> None:
    """Each took a thread of its own: a few requests naming one stuck host took every lookup thread."""
    loader = ImageLoader(Settings(allowed_image_hosts=["stuck.test"], image_fetch_timeout_s=30))
    fetches = [asyncio.create_task(loader.read("http://stuck.test/a.png", f"images[{i}]")) for i in range(3)]
    try:
        async with asyncio.timeout(30):  # a guard
            await stuck_dns.entered.get()
        stuck_dns.answer.set()
        results = await asyncio.gather(*fetches, return_exceptions=True)
    finally:
        await loader.aclose()
    assert all(isinstance(r, ImageError) and re.search(NOT_KNOWN, str(r)) for r in results), results
    assert stuck_dns.asked == ["stuck.test"]


async def test_a_fetch_given_up_on_leaves_the_shared_lookup_to_the_others(stuck_dns: StuckDNS) -> None:
    """A fetch that timed out (here: cancelled) stops waiting; the lookup goes on for the fetches still waiting,
    and one arriving later joins it rather than starting another thread for the same name."""
    loader = ImageLoader(Settings(allowed_image_hosts=["stuck.test"], image_fetch_timeout_s=30))
    first = asyncio.create_task(loader.read("http://stuck.test/a.png", "images[0]"))
    second = asyncio.create_task(loader.read("http://stuck.test/a.png", "images[1]"))
    try:
        async with asyncio.timeout(30):  # a guard
            await stuck_dns.entered.get()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert not second.done()
        second.cancel()  # every fetch has left the lookup: it is in its thread, and goes on
        with pytest.raises(asyncio.CancelledError):
            await second
        later = asyncio.create_task(loader.read("http://stuck.test/b.png", "images[2]"))
        await asyncio.sleep(0)  # one pass of the loop: `later` starts, and joins the lookup in flight
        assert not later.done()

        stuck_dns.answer.set()
        with pytest.raises(ImageError, match=NOT_KNOWN):
            await later
    finally:
        stuck_dns.answer.set()
        await loader.aclose()
    assert stuck_dns.asked == ["stuck.test"]


class HeldResolver:
    """A resolver (as `ImageLoader` takes one) whose every lookup waits for `release`, keeping the names asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.entered: asyncio.Queue[str] = asyncio.Queue()
        self.release = asyncio.Event()

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        self.entered.put_nowait(host)
        await self.release.wait()
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


async def test_a_fetch_over_its_entrys_lookups_waits_within_its_timeout_and_its_lookup_is_dropped() -> None:
    """The entry's lookups stay taken after their fetches timed out (their threads go on); a fetch that finds none
    free fails as a stuck lookup does, and its lookup, never started, does not take a thread later for nobody."""
    resolver = HeldResolver()
    loader = ImageLoader(Settings(allowed_image_hosts=["*.stuck.test"], image_fetch_timeout_s=0.2), resolve=resolver)
    try:
        held = [asyncio.create_task(loader.read(f"http://a{i}.stuck.test/a.png", "images[0]")) for i in range(2)]
        async with asyncio.timeout(30):  # a guard
            for _ in held:
                await resolver.entered.get()
        with pytest.raises(ImageError, match=r"image host 'over.stuck.test' not resolved within 0\.2 s"):
            await loader.read("http://over.stuck.test/a.png", "images[0]")
        for task in held:
            with pytest.raises(ImageError, match="not resolved within"):
                await task

        resolver.release.set()  # the entry's lookups end; the next fetch's lookup is the next to run
        with pytest.raises(ImageError, match=NOT_KNOWN):
            await loader.read("http://next.stuck.test/a.png", "images[0]")
    finally:
        await loader.aclose()
    assert resolver.asked == ["a0.stuck.test", "a1.stuck.test", "next.stuck.test"]


def test_a_url_counts_against_its_most_specific_entry() -> None:
    """Lookups are capped per entry: names under `*.example.com` must not take those of `images.example.com`."""
    from rlaifv.service.urls import allowing_entry

    allowed = ["*.example.com", " Images.example.com ", "*.cdn.example.com", "store.example.com:8080"]
    assert allowing_entry("https://images.example.com/a.png", allowed) == "Images.example.com"
    assert allowing_entry("https://x.cdn.example.com/a.png", allowed) == "*.cdn.example.com"
    assert allowing_entry("https://a1.example.com/a.png", allowed) == "*.example.com"
    assert allowing_entry("http://store.example.com:8080/a.png", allowed) == "store.example.com:8080"
    assert allowing_entry("http://store.example.com:8081/a.png", allowed) is None
    assert allowing_entry("ftp://images.example.com/a.png", allowed) is None
