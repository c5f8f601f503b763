"""Durable batch jobs on Redis Streams (real redis-server), and the Redis-backed cache and rate limits."""

from __future__ import annotations

import hashlib
import time

import httpx
import pytest
import redis

pytestmark = pytest.mark.integration
QUESTION = "What is in the image?"


@pytest.fixture
def jobs_server(make_server, redis_url):
    return make_server(redis_url=redis_url, jobs_claim_idle_ms=300, rate_limit_per_minute=1000)


def wait_done(client: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_rewards_job_round_trip(jobs_server, in_process_pair, red_png, red_url) -> None:
    answers = [["a red circle.", "a dog."], ["yes", "no"], ["two blue squares."]]
    items = [{"images": [red_url], "question": QUESTION, "answers": a} for a in answers]
    items.append({"images": [red_url], "question": QUESTION, "answers": ["red " * 40]})  # fails at run time
    with httpx.Client(base_url=jobs_server.url, timeout=60) as client:
        r = client.post("/v1/jobs", json={"kind": "rewards", "items": items, "metadata": {"run": "t1"}})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] in ("queued", "running") and job["total"] == 4 and job["metadata"] == {"run": "t1"}
        done = wait_done(client, job["id"])
        assert done["status"] == "succeeded" and done["completed"] == 3 and done["failed"] == 1
        results = client.get(f"/v1/jobs/{job['id']}/results").json()
    assert [item["index"] for item in results["data"]] == [0, 1, 2, 3]
    for a, item in zip(answers, results["data"], strict=False):
        assert item["status"] == "succeeded"
        expected = in_process_pair.score(red_png, QUESTION, a).rewards
        assert item["result"]["rewards"] == pytest.approx(expected, abs=1e-5)
    assert results["data"][3]["status"] == "failed"
    assert results["data"][3]["error"]["param"] == "answers[0]"


def test_best_of_n_job(jobs_server, red_url) -> None:
    items = [{"images": [red_url], "question": QUESTION, "n": 3, "sampling": {"seed": i}} for i in range(3)]
    with httpx.Client(base_url=jobs_server.url, timeout=60) as client:
        job = client.post("/v1/jobs", json={"kind": "best_of_n", "items": items}).json()
        assert wait_done(client, job["id"])["completed"] == 3
        for item in client.get(f"/v1/jobs/{job['id']}/results").json()["data"]:
            rewards = [c["reward"] for c in item["result"]["candidates"]]
            assert item["result"]["best_index"] == max(range(3), key=lambda k: (rewards[k], -k))


def test_dead_worker_items_are_reclaimed(make_server, redis_url, red_url) -> None:
    """A consumer that read items and died (never acked) leaves them pending; a live worker takes them over."""
    import redis

    from rlaifv.service.jobs import GROUP

    stream = "rlaifv:jobs:reclaim-test"
    # a replica that accepts jobs but runs no workers
    front = make_server(redis_url=redis_url, jobs_stream=stream, jobs_workers=0)
    items = [{"images": [red_url], "question": QUESTION, "answers": ["a red circle."]} for _ in range(3)]
    with httpx.Client(base_url=front.url, timeout=60) as client:
        job = client.post("/v1/jobs", json={"kind": "rewards", "items": items}).json()
    r = redis.Redis.from_url(redis_url)
    taken = r.xreadgroup(GROUP, "worker-that-dies", {stream: ">"}, count=10)
    assert len(taken[0][1]) == 3  # the dead worker holds every item
    assert r.xpending(stream, GROUP)["pending"] == 3
    # a replica with a worker: the items are idle for > 300 ms, so it claims and runs them
    worker = make_server(redis_url=redis_url, jobs_stream=stream, jobs_workers=1, jobs_claim_idle_ms=300)
    with httpx.Client(base_url=worker.url, timeout=60) as client:
        done = wait_done(client, job["id"])
        assert done["status"] == "succeeded" and done["completed"] == 3
        assert len(client.get(f"/v1/jobs/{job['id']}/results").json()["data"]) == 3
    assert r.xpending(stream, GROUP)["pending"] == 0


def test_cancel_and_errors(make_server, redis_url, red_url) -> None:
    server = make_server(redis_url=redis_url, jobs_stream="rlaifv:jobs:cancel-test", jobs_workers=0, jobs_max_items=4)
    item = {"images": [red_url], "question": QUESTION, "answers": ["a"]}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        job = client.post("/v1/jobs", json={"kind": "rewards", "items": [item]}).json()
        cancelled = client.delete(f"/v1/jobs/{job['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert client.get(f"/v1/jobs/{job['id']}/results").json()["data"] == []
        missing = client.get("/v1/jobs/job-0000")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "job_id"
        bad = client.post("/v1/jobs", json={"kind": "rewards", "items": [item, {"question": QUESTION, "answers": "x"}]})
        assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("items[1]")
        items = [
            {"custom_id": "a", "body": item | {"answers": []}},
            {"question": QUESTION, "answers": ["x"], "query": 1},
            {"custom_id": "", "body": {"answers": "x"}, "x": 1},
            {"custom_id": "a", "body": item},
        ]
        several = client.post("/v1/jobs", json={"kind": "rewards", "items": items}).json()["error"]
        problems = [(e["param"], e["code"]) for e in several["errors"]]
        assert problems == [
            ("items[0].body.answers", "invalid_value"),
            ("items[1].query", "unknown_field"),  # a field named like a request part is still a field
            ("items[2].custom_id", "invalid_value"),  # the envelope's problems, and then its body's
            ("items[2].x", "unknown_field"),
            ("items[2].body.answers", "invalid_value"),
            ("items[3].custom_id", "invalid_value"),  # "a" twice
        ], several
        assert several["param"] == "items[0].body.answers" and "(and 5 more problems)" in several["message"]
        half = [{"custom_id": "a"}, {"body": item}]  # each key's partner was missing, not the key unknown
        halves = client.post("/v1/jobs", json={"kind": "rewards", "items": half}).json()["error"]
        assert [(e["param"], e["code"]) for e in halves["errors"]] == [
            ("items[0].body", "missing_field"),
            ("items[1].custom_id", "missing_field"),
        ], halves
        too_many = client.post("/v1/jobs", json={"kind": "rewards", "items": [item] * 5})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "items"


def test_idempotency_key_makes_a_retried_submission_return_the_first_job(make_server, redis_url, red_url) -> None:
    import redis

    stream = "rlaifv:jobs:idem-test"
    server = make_server(redis_url=redis_url, jobs_stream=stream, jobs_workers=0)
    item = {"images": [red_url], "question": QUESTION, "answers": ["a red circle."]}
    body = {"kind": "rewards", "items": [item, item]}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "submit-1"})
        again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "submit-1"})
        assert first.status_code == again.status_code == 202
        assert again.json()["id"] == first.json()["id"]
        assert redis.Redis.from_url(redis_url).xlen(stream) == 2  # the items were queued once
        other = client.post("/v1/jobs", json=body | {"items": [item]}, headers={"Idempotency-Key": "submit-1"})
        assert other.status_code == 409 and other.json()["error"]["param"] == "Idempotency-Key"
        fresh = client.post("/v1/jobs", json=body)
        assert fresh.status_code == 202 and fresh.json()["id"] != first.json()["id"]
        bad = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "spaces are not allowed"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Idempotency-Key"  # as sent, not lower-cased


def test_jobs_need_redis(client: httpx.Client) -> None:
    r = client.post("/v1/jobs", json={"kind": "rewards", "items": [{"question": "q", "answers": ["a"]}]})
    assert r.status_code == 501 and r.json()["error"]["code"] == "jobs_not_enabled"  # not retryable, unlike 503


def test_redis_cache_and_rate_limit_and_readiness(make_server, redis_url, red_url) -> None:
    import redis

    redis.Redis.from_url(redis_url).flushdb()  # quota counters of earlier tests share the client address
    a = make_server(redis_url=redis_url, jobs_workers=0, rate_limit_per_minute=3)
    b = make_server(redis_url=redis_url, jobs_workers=0, rate_limit_per_minute=3)
    body = {"images": [red_url], "question": "Is the cache shared?", "answers": ["yes", "no"]}
    first = httpx.post(a.url + "/v1/rewards", json=body, timeout=60).json()
    second = httpx.post(b.url + "/v1/rewards", json=body, timeout=60).json()  # another replica, same Redis
    assert second["cached"] is True and second["rewards"] == first["rewards"]
    assert httpx.get(a.url + "/readyz").json()["checks"] == {"model": "ok", "redis": "ok"}
    # the quota (3/min per client) is shared too: a and b have used 2
    assert httpx.get(a.url + "/v1/models").status_code == 200
    limited = httpx.get(b.url + "/v1/models")
    if limited.status_code == 200:  # the minute window rolled over between requests
        limited = httpx.get(b.url + "/v1/models")
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    assert "for this client address" in limited.json()["error"]["message"]  # no API keys here: by address
    assert int(limited.headers["retry-after"]) >= 1


def test_a_cache_entry_an_older_version_wrote_is_a_miss(make_server, redis_url, red_url) -> None:
    """The reward cache in Redis outlives a rolling upgrade: an entry that no longer parses is recomputed."""
    import redis

    store = redis.Redis.from_url(redis_url)
    server = make_server(redis_url=redis_url, jobs_workers=0)
    body = {"images": [red_url], "question": "Does a stale cache entry hurt?", "answers": ["yes", "no"]}
    first = httpx.post(server.url + "/v1/rewards", json=body, timeout=60).json()
    keys = list(store.scan_iter("rlaifv:cache:*"))
    assert keys
    for key in keys:
        store.set(key, '{"object": "rewards", "written_by": "an older version"}')
    again = httpx.post(server.url + "/v1/rewards", json=body, timeout=60)
    assert again.status_code == 200, again.text
    assert again.json()["cached"] is False and again.json()["rewards"] == first["rewards"]
    assert httpx.post(server.url + "/v1/rewards", json=body, timeout=60).json()["cached"] is True


def test_a_job_is_seen_only_with_the_key_that_submitted_it(make_server, redis_url, red_url) -> None:
    alice, bob = "sk-alice-0123456789abcdef", "sk-bob-0123456789abcdef00"
    server = make_server(redis_url=redis_url, api_keys=[alice, bob], jobs_workers=0, jobs_stream="rlaifv:jobs:owners")
    items = [{"images": [red_url], "question": QUESTION, "answers": ["a red circle."]}]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        as_alice, as_bob = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
        job = client.post("/v1/jobs", json={"kind": "rewards", "items": items}, headers=as_alice).json()
        path = f"/v1/jobs/{job['id']}"
        for method, url in (("GET", path), ("GET", path + "/results"), ("DELETE", path)):
            r = client.request(method, url, headers=as_bob)
            assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", (method, url, r.text)
        assert client.get(path, headers=as_alice).json()["status"] == "queued"  # bob's DELETE did nothing
        assert client.delete(path, headers=as_alice).json()["status"] == "cancelled"
        client.post("/v1/jobs", json={"kind": "rewards", "items": items}, headers=as_alice | {"Idempotency-Key": "k1"})
        owner = hashlib.sha256(alice.encode()).hexdigest()[:16]  # the key's id, as the auth layer names it
        assert redis.Redis.from_url(redis_url).exists(f"rlaifv:job:idem:{owner}:k1")  # the record the id names
        r = client.get(f"/v1/jobs/idem:{owner}:k1", headers=as_alice)  # was a WRONGTYPE 500
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", r.text


def test_metrics_report_the_job_backlog_a_worker_pool_scales_on(make_server, redis_url, red_url) -> None:
    """Items not yet done (queued or in hand) are the job stream's length, read at each scrape; Redis's memory
    and its limit beside it (a full Redis under noeviction refuses every write: what the alerts watch)."""
    server = make_server(redis_url=redis_url, jobs_workers=0, jobs_stream="rlaifv:jobs:backlog")
    redis.Redis.from_url(redis_url).delete("rlaifv:jobs:backlog")
    items = [{"images": [red_url], "question": QUESTION, "answers": ["a red circle."]}] * 3

    def gauge(client: httpx.Client, name: str) -> float:
        lines = client.get("/metrics").text.splitlines()
        (line,) = [line for line in lines if line.startswith(name + " ")]
        return float(line.split()[1])

    def backlog(client: httpx.Client) -> float:
        return gauge(client, "rlaifv_jobs_backlog")

    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert backlog(client) == 0
        client.post("/v1/jobs", json={"kind": "rewards", "items": items})
        client.post("/v1/jobs", json={"kind": "rewards", "items": items[:1]})
        assert backlog(client) == 4
        memory = redis.Redis.from_url(redis_url).info("memory")
        assert gauge(client, "rlaifv_redis_maxmemory_bytes") == memory["maxmemory"]
        assert 0 < gauge(client, "rlaifv_redis_used_memory_bytes") < 100 * memory["used_memory"]
