"""Image hosts are looked up on threads of their own, a bounded number at once: on the loop's default executor, a
DNS server that stopped answering held every thread that image decoding, job files and /metrics run on, so one
caller's URL stalled every request with an image and the readiness probes' /metrics."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from rlaifv.reward.errors import ImageError
from rlaifv.service.images import SystemResolver
from rlaifv.service.settings import Settings


class StuckDNS:
    """`socket.getaddrinfo` for "stuck.test" that answers only when `answer` is set, as a dead DNS server does
    until glibc gives up; it counts the threads inside it."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.answer = threading.Event()
        self.lock = threading.Lock()
        self.inside = 0
        self.most_inside = 0
        self.entered: asyncio.Queue[int] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def __call__(self, host: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "stuck.test":
            return self.real(host, *args, **kwargs)
        with self.lock:
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
    from rlaifv.service.images import ImageLoader

    loader = ImageLoader(Settings(allowed_image_hosts=["stuck.test"], image_fetch_timeout_s=0.2))
    try:
        with pytest.raises(ImageError, match=r"image host 'stuck.test' not resolved within 0\.2 s") as info:
            await loader.read("http://stuck.test/a.png", "images[0]")
    finally:
        await loader.aclose()
    assert info.value.param == "images[0]"
