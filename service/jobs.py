"""Durable batch jobs on Redis Streams with a consumer group.

    rlaifv:job:{id}            hash: kind, status, total, completed, failed, created, updated, metadata
    rlaifv:job:{id}:items      hash: index -> {"custom_id"?, "body"} (JSON), each deleted with its result
    rlaifv:job:{id}:results    hash: index -> {"custom_id"?, "status", "result" | "error"} (JSON)
    rlaifv:job:owner:{owner}   sorted set: the owner's job ids, score = creation time in ms (GET /v1/jobs)
    {RLAIFV_JOBS_STREAM}       stream: one entry {job, index} per item; group "rlaifv-workers"

Workers run inside service replicas (RLAIFV_JOBS_WORKERS) and in standalone `rlaifv worker` processes.
Processing is at-least-once, results exactly-once:

- a worker reads entries with XREADGROUP and runs each through the same serving code as the HTTP routes
  (so items of many jobs share micro-batches);
- the result is stored with HSETNX in a Lua script that also bumps `completed`/`failed` and finishes the
  job, so the counts change only together with a newly stored result and equal the results stored;
- only then is the entry XACKed (and XDELed, so the stream stays small). A worker that dies leaves its
  entries pending; after RLAIFV_JOBS_CLAIM_IDLE_MS another worker takes them over (XPENDING + XCLAIM), and an
  item run twice is stored once. An item delivered RLAIFV_JOBS_MAX_DELIVERIES times (XPENDING's count, which
  XCLAIM raises) by workers that died running it fails instead of killing the next one.

While Redis is unreachable, the store raises `StoreUnavailable` (503 with Retry-After at the HTTP edge) and
workers back off up to RLAIFV_JOBS_BACKOFF_MAX_S, then resume by themselves: first the entries they held, taken
up as the deliveries they were (an outage ended them, not the item: it must not count towards the bound; up to
RLAIFV_JOBS_MAX_DELIVERIES outages of an item go uncounted so).

A full Redis (`maxmemory` under `noeviction`: writes refused with OOM) is no outage: a worker whose result is
refused keeps it and its entries (their claims renewed: XCLAIM is allowed then) and writes it once Redis takes
writes again, so the item neither runs again nor counts a delivery. New jobs are refused (503 `jobs_store_full`)
while used_memory is past RLAIFV_JOBS_ADMIT_MEMORY_FRACTION of maxmemory, and each item's body is deleted as its
result is stored: the room left goes to the results of the jobs accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, KeysView
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from redis.exceptions import NoPermissionError, OutOfMemoryError, ReadOnlyError, ResponseError

from rlaifv.reward.errors import InvalidInputError
from rlaifv.service.errors import (
    BadRequest,
    Conflict,
    Overloaded,
    QueuedTooLong,
    ServiceError,
    StoreUnavailable,
    SubmissionPending,
    error_body,
    invalid_input_code,
)
from rlaifv.service.json_body import MAX_JSON_MARKS, TooManyValues, json_marks, over_marks
from rlaifv.service.protocol import BestOfNRequest, Job, JobItem, JobRequest, RewardsRequest
from rlaifv.service.redis_conn import FULL_HINT, REDIS_DOWN, memory_use, over_fraction
from rlaifv.service.redis_replies import (
    as_bool,
    as_bytes,
    as_bytes_list,
    as_hash,
    as_int,
    as_list,
    as_optional_bytes,
    as_pairs,
    as_sized_list,
    pending,
    read_group_entries,
    stream_entries,
)
from rlaifv.service.validation_errors import FieldProblem, Problems, field_problems

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.typing import EncodableT, StreamIdT

    from rlaifv.service.metrics import Metrics
    from rlaifv.service.serving import Serving
    from rlaifv.service.settings import Settings

log = logging.getLogger("rlaifv.jobs")
GROUP = "rlaifv-workers"
PREFIX = "rlaifv:job:"
JOB_ID = re.compile(r"job-[0-9a-f]{32}")
ANONYMOUS = "-"  # the owner of jobs submitted without API keys configured
# Each owner's jobs, newest first (GET /v1/jobs): a sorted set of job ids scored by creation time in ms on Redis's
# clock (TIME in the scripts: the replicas' clocks never enter). "owner:" is neither a job id (JOB_ID) nor an
# Idempotency-Key's "idem:" record, so no key of the prefix is named twice.
OWNERS = PREFIX + "owner:"
# Entries are of jobs expired for sure once older than the TTL and this: the score is read in the MULTI that sets
# the job hash's TTL, on the same clock (EXPIRE counts whole seconds from a moment a little before).
INDEX_GRACE_MS = 1_000
REQUEST_MODELS: dict[str, type[BestOfNRequest | RewardsRequest]] = {
    "best_of_n": BestOfNRequest,
    "rewards": RewardsRequest,
}
ENQUEUE_CHUNK = 1000
# An item is stored as JSON and hashed with pydantic for its Idempotency-Key: past ~255 levels pydantic refuses,
# past ~1000 json does (its limit moves with the recursion limit the process has). Requests nest ~10 levels.
MAX_ITEM_DEPTH = 128

# Returns 1 when this result was stored, 0 when the item had one (a rerun), -1 when the job is gone (expired, or
# lost with a Redis restarted without persistence): then nothing is written, so no half job hash outlives it;
# -2 when the job was cancelled while the item ran: its results and counts stay as the cancel left them.
# Results expire with their job (in milliseconds: TTL's whole seconds read 0 in a job's last half second, and a
# result stored then never expired). An item's body goes with its result: nothing reads it once the result is there
# (a rerun checks for the result first: `JobWorkers._process`), and with images it can be most of a job's memory; the
# whole items hash also goes once every item has a result (bodies a version before this one kept). A body at least
# as large as its result goes first: Redis refuses a script for memory only at its first growing write, so at
# maxmemory a result that replaces a larger body is taken (the job moves on and memory falls), one that would grow
# memory waits (`JobWorkers._record`).
RECORD = """
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
if not total then return -1 end
if redis.call('HGET', KEYS[1], 'status') == 'cancelled' then return -2 end
if redis.call('HSTRLEN', KEYS[3], ARGV[1]) >= #ARGV[2] then redis.call('HDEL', KEYS[3], ARGV[1]) end
local stored = redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[1])
if stored == 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
redis.call('HSET', KEYS[1], 'updated', ARGV[4])
local completed = tonumber(redis.call('HGET', KEYS[1], 'completed'))
local done = completed + tonumber(redis.call('HGET', KEYS[1], 'failed'))
if done >= total then
  if redis.call('HGET', KEYS[1], 'status') ~= 'cancelled' then
    redis.call('HSET', KEYS[1], 'status', completed == 0 and 'failed' or 'succeeded')
  end
  redis.call('DEL', KEYS[3])
end
return stored
"""
# One step, so a result stored meanwhile cannot be overwritten by 'cancelled' (a read, then a write, could).
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or not redis.call('HGET', KEYS[1], 'total') then return false end
if status == 'queued' or status == 'running' then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'updated', ARGV[1])
end
return status
"""
MARK_RUNNING = (
    "if redis.call('HGET', KEYS[1], 'status') == 'queued' then redis.call('HSET', KEYS[1], 'status', 'running') end"
)
# An Idempotency-Key is claimed for this long while its job is written (renewed per chunk), then for the jobs' TTL
# in the same MULTI that creates the job: a submission that dies half-way frees its key instead of poisoning it.
CLAIM_PENDING_S = 30
KEEP_CLAIM = """
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
"""
# An entry done with: acknowledged, deleted and its outage record dropped in one step. A script, not a MULTI: a full
# Redis refuses every command queued in a MULTI, but none of these (they free memory).
ACK = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
"""
# The items of a submission whose job was not created (KEYS[1] the job hash, KEYS[2] its items): dropped at once,
# not left to their short TTL.
DROP_ITEMS = "if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) end"
# How often `JobStore.create` reads Redis's memory (INFO memory) for its admission check; in between it counts the
# bytes it admitted on the last reading.
MEMORY_READ_S = 2.0
RELEASE_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('EXISTS', KEYS[2]) == 0 then redis.call('DEL', KEYS[1]) end
"""
# Consumers of the group (KEYS[1] the stream, ARGV[1] the group) that hold no entry and were not heard from for
# ARGV[2] ms leave it; checked and deleted in one script, as deleting a consumer drops the entries it holds.
FORGET_CONSUMERS = """
local removed = 0
for _, info in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local c = {}
  for i = 1, #info, 2 do c[info[i]] = info[i + 1] end
  if c['pending'] == 0 and c['idle'] >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c['name'])
    removed = removed + 1
  end
end
return removed
"""
# Per stream entry, how often a Redis outage went uncounted (hash field `uncounted`: `RESUME`'s takings up and
# deliveries given back, by any worker) and which interrupted deliveries (fields `{consumer}@{deliveries}`) got theirs
# back. Created by `RESUME`, expiring after the jobs' TTL (the entry's job, created before it, is gone by then: its
# item no longer runs), deleted with the entry's XACK. "outages:" is no job id either.
OUTAGES = PREFIX + "outages:"
# A consumer back from a Redis outage (KEYS[1] the stream; ARGV[1] the group, ARGV[2] the consumer, ARGV[3] how many
# of its entries to read, ARGV[4] the key prefix of the entries' outage records (`OUTAGES`), ARGV[5] how many outages
# of one entry may go uncounted, ARGV[6] the records' lifetime in ms, ARGV[7] how many entry ids follow that it leaves
# alone, those ids, then pairs of (entry id, deliveries) of the batch the outage interrupted). The outage ended its
# deliveries, not the items: it takes up again the entries it still holds, each still on its delivery (XCLAIM with
# RETRYCOUNT as it was: no new one counted), and an entry of that batch another worker took meanwhile gets back the
# delivery the taking counted (holder and idle time kept), unless more takings followed. A delivery is given back
# once ever (its `{consumer}@{deliveries}` field): asked again after its reply was lost to another outage, with another
# taking in between, `p[4] == times + 1` cannot tell that taking from the one undone, and a worker death went
# uncounted. Each taking up or giving back spends one of the entry's uncounted outages; once ARGV[5] are spent, the
# entry is neither taken up nor given a delivery back: its outages count (a reclaim takes it, counting one).
# Returns the entries taken up ({id, fields, deliveries}) and the ids left alone that it still holds.
RESUME = """
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local prefix, bound, lifetime = ARGV[4], tonumber(ARGV[5]), ARGV[6]
local leave, n = {}, tonumber(ARGV[7])
for i = 8, 7 + n do leave[ARGV[i]] = true end
local function uncounted(id, delivery)
  local key = prefix .. id
  if tonumber(redis.call('HGET', key, 'uncounted') or 0) >= bound then return false end
  if delivery and redis.call('HSETNX', key, delivery, 1) == 0 then return false end
  redis.call('HINCRBY', key, 'uncounted', 1)
  if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, lifetime) end
  return true
end
for i = 8 + n, #ARGV, 2 do
  local p = redis.call('XPENDING', stream, group, ARGV[i], ARGV[i], 1)[1]
  local times = tonumber(ARGV[i + 1])
  if p and p[2] ~= consumer and p[4] == times + 1 and uncounted(p[1], consumer .. '@' .. times) then
    redis.call('XCLAIM', stream, group, p[2], 0, p[1], 'IDLE', p[3], 'RETRYCOUNT', times, 'JUSTID')
  end
end
local taken, left = {}, {}
for _, p in ipairs(redis.call('XPENDING', stream, group, '-', '+', tonumber(ARGV[3]), consumer)) do
  if leave[p[1]] or not uncounted(p[1]) then
    left[#left + 1] = p[1]
  else
    local e = redis.call('XCLAIM', stream, group, consumer, 0, p[1], 'RETRYCOUNT', p[4])[1]
    if e then taken[#taken + 1] = {e[1], e[2], p[4]} end
  end
end
return {taken, left}
"""
# Redis's clock in ms, in a script (TIME: whole seconds and microseconds).
_NOW_MS = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
# A job into its owner's index (ARGV[1]; ARGV[2]: the entries' lifetime in ms), and out with the entries of jobs
# expired for sure, in the MULTI that creates the job.
INDEX_ADD = (
    _NOW_MS
    + """redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[2])))
"""
)
# The same trim alone, when a list is read; a reader without write access (a read-only ACL user) skips it.
INDEX_TRIM = _NOW_MS + "return redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[1])))\n"
# One page of an owner's index after the job ARGV[1] ('' for the first page): its rank and the range after it read
# in one step, so a job created meanwhile (it goes on top) shifts no page. It only reads: entries of jobs expired
# for sure (older than ARGV[3] ms) end the page as the end of the index would. false: ARGV[1] is not in it.
PAGE = (
    _NOW_MS
    + """local start = 0
if ARGV[1] ~= '' then
  local rank = redis.call('ZREVRANK', KEYS[1], ARGV[1])
  if not rank then return false end
  start = rank + 1
end
local cutoff = now - tonumber(ARGV[3])
local found = redis.call('ZREVRANGE', KEYS[1], start, start + tonumber(ARGV[2]) - 1, 'WITHSCORES')
local ids = {}
for i = 1, #found, 2 do
  if tonumber(found[i + 1]) < cutoff then break end
  ids[#ids + 1] = found[i]
end
return ids
"""
)
PAGE_READ_MAX = 256  # ids read per round trip while skipping entries whose jobs are gone
Entry = tuple[bytes, dict[bytes, bytes], int]  # a stream entry as a worker holds it: id, fields, deliveries


@contextlib.contextmanager
def redis_guard(retry_after_s: int) -> Iterator[None]:
    """Turn "Redis is down" into the typed `StoreUnavailable` that the HTTP edge answers with 503."""
    try:
        yield
    except OutOfMemoryError:
        raise StoreUnavailable(
            f"the job store (Redis) is full: it refuses writes (maxmemory reached); {FULL_HINT}",
            code="jobs_store_full",
            headers={"Retry-After": str(retry_after_s)},
        ) from None
    except REDIS_DOWN as exc:
        raise StoreUnavailable(
            f"the job store (Redis) is unavailable: {type(exc).__name__}",
            headers={"Retry-After": str(retry_after_s)},
        ) from None


def _canonical(request: JobRequest) -> str:
    """The body an Idempotency-Key is bound to, with object keys sorted: a client that re-serialises a map on
    its retry sends the same body in another key order (it got 409)."""
    return json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def _legacy_digest(request: JobRequest) -> str | None:
    """The body's hash as versions before `_canonical` stored it: a retry that reaches an upgraded replica during
    a rolling upgrade (its first try created the job on an old one) must find that job, not a 409."""
    try:
        return hashlib.sha256(request.model_dump_json().encode()).hexdigest()
    except ValueError:  # nested past pydantic's bound: that version could not have stored it
        return None


def is_envelope(item: dict[str, Any]) -> bool:
    """An item is either a bare request body or a `{"custom_id", "body"}` envelope; one with either key is an
    envelope (no request has fields of those names), so one missing the other is named as missing, not its
    own key as unknown."""
    return "body" in item or "custom_id" in item


def parse_jsonl(lines: Iterable[bytes], limit: int | None = None) -> list[dict[str, Any]]:
    """Items of an uploaded JSONL file: one JSON object per line, blank lines skipped; past `limit` items a 400
    before the rest is parsed (5.5M `{}` lines took 800 MB and 7 s to be refused)."""
    items: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if limit is not None and len(items) >= limit:
            raise BadRequest(f"at most {limit} items per job, got more", param="items")
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")  # Windows tools write a BOM
        except UnicodeDecodeError as exc:  # json.loads(bytes) would guess UTF-16/32 from the first bytes
            raise BadRequest(
                f"line {number} is not UTF-8 (byte {exc.start + 1})", param=f"items[{len(items)}]"
            ) from None
        try:
            item = json.loads(text)
        except ValueError as exc:
            raise BadRequest(f"line {number} is not valid JSON: {exc}", param=f"items[{len(items)}]") from None
        except RecursionError:
            raise BadRequest(f"line {number} is JSON nested too deeply", param=f"items[{len(items)}]") from None
        if not isinstance(item, dict):
            raise BadRequest(f"line {number} is not a JSON object", param=f"items[{len(items)}]")
        items.append(item)
    if not items:
        raise BadRequest("the upload holds no items", param="items", code="missing_field")
    return items


class JobStore:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.stream = settings.jobs_stream
        self.outages = f"{OUTAGES}{self.stream}:"  # + an entry id: the entry's outage record (`RESUME`)
        self.ttl_s = settings.jobs_ttl_s
        self.max_items = settings.jobs_max_items
        self.page_size = settings.jobs_page_size
        self.retry_after_s = settings.redis_retry_after_s
        self.admit_fraction = settings.jobs_admit_memory_fraction
        self.clock = time.monotonic
        # (used_memory, maxmemory) as last read plus the bytes admitted since, and when it was read (`_admit`)
        self._memory: tuple[int, int] | None = None
        self._memory_read = float("-inf")
        self._admitting = asyncio.Lock()

    def guard(self) -> contextlib.AbstractContextManager[None]:
        return redis_guard(self.retry_after_s)

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def validate(self, request: JobRequest) -> list[str]:
        """Every item checked against its endpoint's request schema now, so a typo fails the submission rather
        than thousands of results: a 400 naming the first bad field (`items[3].n`) and, in `error.errors`, every
        problem of every item (up to a bound), so one fix-up covers the whole file. Returns the items as stored
        (JSON texts): an item nested too deeply to write back as JSON is a problem of its own, not a 500."""
        if len(request.items) > self.max_items:
            raise BadRequest(f"at most {self.max_items} items per job, got {len(request.items)}", param="items")
        model = REQUEST_MODELS[request.kind]
        out: list[str] = []
        problems = Problems([])
        seen: set[str] = set()
        for i, item in enumerate(request.items):
            where = f"items[{i}]"
            envelope = is_envelope(item)
            custom_id: Any = item.get("custom_id") if envelope else None
            body: Any = item.get("body") if envelope else item
            try:  # the item as stored, written once: its size is counted on it
                stored: str | None = json.dumps({"custom_id": custom_id, "body": body} if envelope else {"body": body})
            except (RecursionError, ValueError):
                stored = None  # too deep to write: the depth check below names it
            if stored is not None and (marks := json_marks(stored)) > MAX_JSON_MARKS:
                # bounded as a request is: its run checks it on the event loop
                problems += Problems(
                    [FieldProblem(message=over_marks(marks, where), param=where, code=TooManyValues.code)]
                )
                continue
            if envelope:  # the envelope and its body both checked: one round trip shows every problem
                try:
                    JobItem.model_validate(item)
                except ValidationError as exc:
                    problems += _problems(problems, exc, item, where)
            where_body = f"{where}.body" if envelope else where
            if isinstance(body, dict):
                try:
                    model.model_validate(body)
                except ValidationError as exc:
                    problems += _problems(problems, exc, body, where_body)
            if isinstance(custom_id, str):
                if custom_id in seen:
                    message = f"{where}.custom_id: {custom_id[:64]!r} is used twice"
                    twice = FieldProblem(message=message, param=f"{where}.custom_id", code="invalid_value")
                    problems += Problems([twice])
                seen.add(custom_id)
            depth = _depth(item)
            if stored is None or depth > MAX_ITEM_DEPTH:
                problems += Problems([_too_deep(where, depth)])
                continue
            out.append(stored)
        if problems.listed:
            raise BadRequest.listing(problems)
        return out

    async def create(self, request: JobRequest, *, idempotency_key: str | None = None, owner: str | None = None) -> Job:
        """Queue a job. With an `idempotency_key`, a repeat of the same request (a client retrying after a
        timeout) gets the job the first one created instead of a duplicate, for as long as jobs live."""
        items = await asyncio.to_thread(self.validate, request)  # item by item: other requests go on meanwhile
        with self.guard():
            await self.ensure_group()
            job_id = f"job-{uuid.uuid4().hex}"
            claim: tuple[str, str] | None = None
            if idempotency_key is not None:
                key = f"{PREFIX}idem:{owner or '-'}:{idempotency_key}"
                try:
                    digest = hashlib.sha256(_canonical(request).encode()).hexdigest()
                except (RecursionError, ValueError):  # not with items within MAX_ITEM_DEPTH: a last guard
                    raise BadRequest.listing(Problems([_too_deep("items", 0)])) from None
                for _ in range(3):  # a claim that expires between SET NX and GET is claimed again
                    if await self.redis.set(key, f"{job_id} {digest}", nx=True, ex=CLAIM_PENDING_S):
                        claim = (key, f"{job_id} {digest}")
                        break
                    raw = as_optional_bytes(await self.redis.get(key))
                    if raw is not None:
                        digests = {d for d in (digest, _legacy_digest(request)) if d is not None}
                        return await self._replay(key, raw.decode(), digests, owner)
                else:
                    raise SubmissionPending(
                        "this Idempotency-Key is being claimed by another request; retry",
                        param="Idempotency-Key",
                        headers={"Retry-After": "1"},
                    )
            try:
                await self._admit(sum(map(len, items)))
                await self._enqueue(job_id, request, items, claim, owner)
            except BaseException as exc:
                # Freed only while it is still ours and its job was not created: a lost EXEC reply (the job
                # exists) must keep the key, or the client's retry would create the job twice.
                if claim is not None:
                    with contextlib.suppress(*REDIS_DOWN):
                        await self.redis.eval(RELEASE_CLAIM, 2, claim[0], PREFIX + job_id, claim[1])
                if isinstance(exc, ResponseError):  # refused (a full Redis): no job, so its items go now
                    with contextlib.suppress(*_DOWN_OR_REFUSED):
                        await self.redis.eval(DROP_ITEMS, 2, PREFIX + job_id, PREFIX + job_id + ":items")
                raise
            job = await self._get(job_id, owner)
            if job is None:  # expired at once: a TTL shorter than a round trip
                raise StoreUnavailable("the job expired as it was created", headers={"Retry-After": "1"})
            return job

    async def _admit(self, size: int) -> None:
        """Refuse a new job (503 `jobs_store_full`) while Redis's used_memory is past RLAIFV_JOBS_ADMIT_MEMORY_FRACTION
        of its maxmemory: under `noeviction` a full Redis refuses every write, the results of the jobs already
        accepted included, and every job stalls. INFO memory is read at most every `MEMORY_READ_S`; in between, the
        bytes of the items admitted are added to the last reading, so a burst cannot pass on one old reading (one
        check at a time: submissions arriving during a reading's round trip each read again and dropped the bytes
        the others had admitted). No maxmemory, or INFO refused (an ACL user): no check."""
        async with self._admitting:
            now = self.clock()
            if now - self._memory_read >= MEMORY_READ_S:
                self._memory_read = now  # a failed reading too: the submissions queued behind it do not each wait one
                self._memory = None
                try:
                    self._memory = memory_use(await self.redis.info("memory"))
                except ResponseError as exc:  # refused to an ACL user
                    log.debug("Redis memory not read for the admission of jobs: %s", exc)
            self._check_room(size)

    def _check_room(self, size: int) -> None:
        if self._memory is None:
            return
        used, maxmemory = self._memory
        if over_fraction(used + size, maxmemory, self.admit_fraction):
            percent = 100 * used / maxmemory
            raise StoreUnavailable(
                f"the job store (Redis) is full: used_memory is {percent:.0f}% of its maxmemory, past"
                f" RLAIFV_JOBS_ADMIT_MEMORY_FRACTION ({self.admit_fraction:g}) with this job; new jobs are refused"
                f" until the jobs accepted make room ({FULL_HINT})",
                code="jobs_store_full",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self._memory = (used + size, maxmemory)

    async def _replay(self, key: str, claimed: str, digests: set[str], owner: str | None) -> Job:
        """The job an earlier request with the same Idempotency-Key created (it may still be being written).

        Its job not there yet: the first request is still writing it, or died doing so (its claim then expires
        within `CLAIM_PENDING_S`): a 503 to retry after, never a 409 that would refuse the key for the TTL."""
        first_id, first_digest = claimed.split()
        if first_digest not in digests:
            raise Conflict("this Idempotency-Key was used for a different request body", param="Idempotency-Key")
        for _ in range(100):
            job = await self._get(first_id, owner)
            if job is not None:
                return job
            await asyncio.sleep(0.02)
        wait = max(1, int(await self.redis.ttl(key)))
        raise SubmissionPending(
            "the request that first used this Idempotency-Key has not created its job (still writing it, or it"
            f" failed); retry after {wait} s",
            param="Idempotency-Key",
            headers={"Retry-After": str(wait)},
        )

    async def _enqueue(
        self,
        job_id: str,
        request: JobRequest,
        items: list[str],
        claim: tuple[str, str] | None = None,
        owner: str | None = None,
    ) -> None:
        """Items first, then the job hash, every stream entry and the Idempotency-Key's claim for the jobs' TTL in
        one MULTI: a worker never sees an entry without its item, and a submission cut short leaves no job and a
        claim that expires in `CLAIM_PENDING_S`. The items, too, live `CLAIM_PENDING_S` (renewed per chunk) until
        that MULTI gives them the jobs' TTL: a submission refused or killed half-way left its images for the TTL
        (7 days). The owner's index (`GET /v1/jobs`) gets the job in that MULTI too, so a job listed exists and a
        job created is listed."""
        key = PREFIX + job_id
        for start in range(0, len(items), ENQUEUE_CHUNK):
            chunk = items[start : start + ENQUEUE_CHUNK]
            mapping: dict[EncodableT, EncodableT] = {str(start + i): text for i, text in enumerate(chunk)}
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(key + ":items", mapping=mapping)
            pipe.expire(key + ":items", CLAIM_PENDING_S)
            if claim is not None:
                pipe.expire(claim[0], CLAIM_PENDING_S)
            await pipe.execute()
        now = int(time.time())
        meta: dict[EncodableT, EncodableT] = {
            "kind": request.kind,
            "status": "queued",
            "total": len(items),
            "completed": 0,
            "failed": 0,
            "created": now,
            "updated": now,
            "metadata": json.dumps(request.metadata),
            "owner": owner or ANONYMOUS,
        }
        index = OWNERS + (owner or ANONYMOUS)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=meta)
        pipe.expire(key, self.ttl_s)
        pipe.expire(key + ":items", self.ttl_s)
        pipe.eval(INDEX_ADD, 1, index, job_id, self.index_window_ms)
        pipe.expire(index, self.ttl_s + INDEX_GRACE_MS // 1000)  # outlives the newest job: the index goes with it
        for i in range(len(items)):
            pipe.xadd(self.stream, {"job": job_id, "index": str(i)})
        if claim is not None:  # ours still, or lapsed: then nobody's (a lapsed claim taken by another stays theirs)
            pipe.eval(KEEP_CLAIM, 1, claim[0], claim[1], self.ttl_s)
        await pipe.execute()

    async def get(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job, or None when there is none of this id, or it is another API key's (never told apart)."""
        with self.guard():
            return await self._get(job_id, owner)

    @property
    def index_window_ms(self) -> int:
        """Index entries older than this (on Redis's clock) are of jobs expired for sure."""
        return self.ttl_s * 1000 + INDEX_GRACE_MS

    async def list_jobs(
        self, owner: str | None = None, *, limit: int = 20, after: str | None = None
    ) -> tuple[list[Job], bool]:
        """The owner's jobs, newest first: up to `limit` of them after the job `after` (None: from the newest), and
        whether more follow. Jobs created in the same millisecond come in a fixed order (by id, descending).

        Reads the owner's index (a sorted set) by rank, never the keyspace. An entry whose job is gone (expired, or
        lost by a Redis that restarted without its data) is skipped and removed. `after` must be one of the owner's
        jobs (`BadRequest` naming it otherwise: unknown, another key's); one that expired while the caller paged
        (the last of a page is the oldest: the likeliest to) still marks the place, then leaves the index."""
        index = OWNERS + (owner or ANONYMOUS)
        with self.guard():
            gone = False
            if after is not None:
                if JOB_ID.fullmatch(after) is None:
                    raise _bad_after(after)
                gone = await self._get(after, owner) is None
                if gone and await self.redis.zscore(index, after) is None:
                    raise _bad_after(after)  # never the owner's (or from before the index): nothing marks a place
            await self._best_effort(self.redis.eval(INDEX_TRIM, 1, index, self.index_window_ms))
            for _ in range(3):
                try:
                    page = await self._page(index, owner, limit + 1, after)
                except _AnchorGone:
                    continue
                if gone:
                    await self._forget(index, [after or ""])
                if page is None:
                    if gone:  # trimmed meanwhile as expired for sure: so is everything older
                        return [], False
                    raise _bad_after(after or "")  # a job of the owner's from before the index, or it left it
                return page[:limit], len(page) > limit
            raise StoreUnavailable("the job list kept changing while it was read; retry", headers={"Retry-After": "1"})

    async def _page(self, index: str, owner: str | None, want: int, after: str | None) -> list[Job] | None:
        """Up to `want` live jobs after `after` in the index; None when `after` is not in it.

        Each round reads the ids after the last live job found (the anchor) in one step, fetches their hashes in one
        pipeline, and removes the entries whose job is gone before the next round, so every round moves on. The
        anchor is `after` or a job just seen alive (entries are removed only once their job is gone); should that
        job expire and its entry go meanwhile, `_AnchorGone` makes the caller read the page again."""
        jobs: list[Job] = []
        anchor, size = after or "", want
        while len(jobs) < want:
            reply = await self.redis.eval(PAGE, 1, index, anchor, size, self.index_window_ms)
            if reply is None:
                if anchor == (after or ""):
                    return None
                raise _AnchorGone
            ids = as_bytes_list(reply)
            if not ids:
                break
            pipe = self.redis.pipeline(transaction=False)
            for raw_id in ids:
                pipe.hgetall(PREFIX + raw_id.decode())
            gone: list[str] = []
            for raw_id, raw in zip(ids, await pipe.execute(), strict=True):
                job = _job(raw_id.decode(), as_hash(raw), owner)
                if job is None:
                    gone.append(raw_id.decode())
                elif len(jobs) < want:
                    jobs.append(job)
                    anchor = job.id
            await self._forget(index, gone)
            if len(ids) < size:  # the index ends here (jobs created meanwhile go on top, not after the anchor)
                break
            size = max(want - len(jobs), min(2 * size, PAGE_READ_MAX))
        return jobs

    async def _forget(self, index: str, job_ids: list[str]) -> None:
        if job_ids:
            await self._best_effort(self.redis.zrem(index, *job_ids))

    @staticmethod
    async def _best_effort(write: Awaitable[Any]) -> None:
        """An index clean-up while reading: a reader allowed no writes (ACL, a read-only replica) lists all the
        same, since pages skip what the clean-up would remove."""
        try:
            await write
        except ResponseError as exc:
            if not _write_refused(exc):
                raise
            log.debug("job index not cleaned up: %s", exc)

    async def _get(self, job_id: str, owner: str | None = None) -> Job | None:
        """None also for an id of another shape: only job ids name job hashes (an Idempotency-Key's record
        shares the prefix)."""
        if JOB_ID.fullmatch(job_id) is None:
            return None
        return _job(job_id, as_hash(await self.redis.hgetall(PREFIX + job_id)), owner)

    async def result_lines(self, job: Job, after: int | None = None) -> AsyncIterator[str]:
        """The stored results as JSON texts (`{"index", "custom_id"?, "status", ...}`) in item order, read
        `RLAIFV_JOBS_PAGE_SIZE` at a time with HMGET, so memory stays flat for any job size. Items without a
        result yet are skipped. The first page is read before the caller starts a response (see routes/jobs).
        `after`: only the results of the items after that index, the first page starting there (the results
        hash is keyed by index, so a stream resumed near the end of a big job reads no page before it)."""
        key = PREFIX + job.id + ":results"
        for start in range(0 if after is None else after + 1, job.total, self.page_size):
            fields = [str(i) for i in range(start, min(start + self.page_size, job.total))]
            with self.guard():
                values = await self.redis.hmget(key, fields)
            for i, value in enumerate(values, start=start):
                raw = as_optional_bytes(value)
                if raw is not None:
                    yield f'{{"index":{i},{raw.decode()[1:]}'

    async def cancel(self, job_id: str, owner: str | None = None) -> Job | None:
        """Cancel a queued or running job: its items not started are dropped, and the results of those running
        now are not stored (the job's results and counts stay as this returns them); a finished job is returned
        as it is. None as `get` gives it."""
        key = PREFIX + job_id
        with self.guard():
            if await self._get(job_id, owner) is None:
                return None
            if not await self.redis.eval(CANCEL, 2, key, key + ":items", int(time.time())):
                return None
            return await self._get(job_id, owner)

    async def load(self, job_id: str, index: int) -> tuple[str | None, str | None, bool, dict[str, Any] | None]:
        """(kind, status, has a result, item) of one stream entry, in one round trip."""
        key = PREFIX + job_id
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(key, ["kind", "status"])
        pipe.hexists(key + ":results", str(index))
        pipe.hget(key + ":items", str(index))
        fields, has_result, item = await pipe.execute()
        kind, status = (as_optional_bytes(value) for value in as_sized_list(fields, 2))
        raw = as_optional_bytes(item)
        return (
            kind.decode() if kind else None,
            status.decode() if status else None,
            as_bool(has_result),
            json.loads(raw) if raw is not None else None,
        )

    async def mark_running(self, job_id: str) -> None:
        await self.redis.eval(MARK_RUNNING, 1, PREFIX + job_id)

    async def record(self, job_id: str, index: int, entry: dict[str, Any]) -> bool:
        """Store one item's result once; finish the job when every item has one. True: this call stored it."""
        key = PREFIX + job_id
        field = "completed" if entry["status"] == "succeeded" else "failed"
        stored = await self.redis.eval(
            RECORD, 3, key, key + ":results", key + ":items", str(index), json.dumps(entry), field, int(time.time())
        )
        return as_int(stored) == 1

    async def ack(self, entry_id: bytes) -> None:
        await self.redis.eval(ACK, 2, self.stream, self.outages.encode() + entry_id, GROUP, entry_id)


class JobWorkers:
    """Consumers of the job stream: inside a service replica, or the whole of an `rlaifv worker` process."""

    def __init__(self, store: JobStore, serving: Serving, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.serving = serving
        self.count = settings.jobs_workers
        self.claim_idle_ms = settings.jobs_claim_idle_ms
        self.max_deliveries = settings.jobs_max_deliveries
        self.backoff_max_s = settings.jobs_backoff_max_s
        self.redis_timeout_s = settings.redis_connect_timeout_s
        self.metrics = metrics
        self.batch = max(1, min(settings.max_batch, 16))
        self.redis_ok = True
        self.store_full = False  # a result was refused for Redis's memory and is waited with (`_record`)
        self._tasks: list[asyncio.Task[None]] = []
        self._consumers: list[str] = []
        self._draining = False
        self._base = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # a live consumer asks for entries every 250 ms, or holds some: one idle and empty this long is gone
        self.forget_after_ms = max(self.claim_idle_ms, 60_000)

    def start(self, count: int | None = None) -> None:
        self._draining = False
        self._consumers = [f"{self._base}-{i}" for i in range(self.count if count is None else count)]
        self._tasks = [
            asyncio.create_task(self._consume(name), name=f"rlaifv-jobs-{i}") for i, name in enumerate(self._consumers)
        ]

    async def wait(self) -> None:
        await asyncio.gather(*self._tasks)

    def liveness(self) -> str | None:
        """A consumer that ended while not draining (each catches its own errors: only a bug ends one), or None."""
        ended = sum(task.done() for task in self._tasks)
        if ended and not self._draining:
            return f"{ended} of {len(self._tasks)} job consumers stopped"
        return None

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop consuming. The items in hand get `grace_s` to finish (an `rlaifv worker` drains so; the
        server's own consumers stop at once, its grace going to HTTP requests); whatever still runs then is
        cancelled, and its entries stay pending until another worker reclaims them."""
        self._draining = True
        if grace_s > 0 and self._tasks:
            await asyncio.wait(self._tasks, timeout=grace_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._leave_group()

    async def _leave_group(self) -> None:
        """Remove this process's consumers that hold no entries from the group: stopped workers piled up in
        XINFO CONSUMERS, where idle ones are looked for. One that still holds entries stays (deleting a consumer
        drops its pending entries), and hands them back: another worker reclaims them at once, not after
        `RLAIFV_JOBS_CLAIM_IDLE_MS`."""
        redis, stream = self.store.redis, self.store.stream

        async def leave(consumer: str) -> None:
            held = await self._held(consumer)
            if held:
                await self._hand_back(consumer, held)
            else:
                await redis.xgroup_delconsumer(stream, GROUP, consumer)

        try:  # one bound for all: a hung Redis must not eat the shutdown grace, consumer after consumer
            await asyncio.wait_for(asyncio.gather(*map(leave, self._consumers)), self.redis_timeout_s)
        except Exception as exc:  # Redis away: the entries stay, as a killed worker's do
            log.debug("consumers left in the group: %s", type(exc).__name__)

    async def _held(self, consumer: str, entry_ids: list[bytes] | None = None) -> dict[bytes, int]:
        """The entries this consumer holds (of `entry_ids`, or all), with how often each was delivered."""
        held = pending(
            await self.store.redis.xpending_range(
                self.store.stream, GROUP, "-", "+", 10 * self.batch + len(entry_ids or ()), consumer
            )
        )
        wanted = None if entry_ids is None else set(entry_ids)
        return {p.entry_id: p.deliveries for p in held if wanted is None or p.entry_id in wanted}

    async def _hand_back(self, consumer: str, counts: dict[bytes, int]) -> None:
        """Entries this consumer holds but will not run (it is stopping; `counts`: their deliveries, `_held`): still
        its own, but idle as long as another worker's reclaim asks, so they are taken at once; their delivery count
        goes back by the one this consumer used (a stop asked for is no crash: it must not bring an item nearer
        RLAIFV_JOBS_MAX_DELIVERIES)."""
        redis, stream = self.store.redis, self.store.stream
        for times in sorted(set(counts.values())):
            ids: list[StreamIdT] = [entry_id for entry_id, n in counts.items() if n == times]
            await redis.xclaim(
                stream, GROUP, consumer, 0, ids, idle=self.claim_idle_ms, retrycount=max(0, times - 1), justid=True
            )

    async def _next(self, consumer: str) -> list[Entry]:
        """Stale entries of dead consumers first (`_reclaim`), else new ones (XREADGROUP, blocking briefly), each
        with its deliveries. A reclaimed entry delivered `RLAIFV_JOBS_MAX_DELIVERIES` times already fails instead of
        running again."""
        redis = self.store.redis
        reclaimed = await self._reclaim(consumer)
        if reclaimed:
            return await self._without_abandoned(reclaimed)
        reply = await redis.xreadgroup(GROUP, consumer, {self.store.stream: ">"}, count=self.batch, block=250)
        return [(entry_id, fields, 1) for entry_id, fields in read_group_entries(reply, self.store.stream)]

    async def _resume(self, consumer: str, interrupted: _Interrupted) -> list[Entry]:
        """After a Redis outage, the entries this consumer still holds, taken up again as the deliveries they were
        (`RESUME`): an outage ended them, not the items, and counted as deliveries five outages abandoned an item
        that was fine. Only a consumer that lives through the outage knows that; deliveries whose worker died
        (the item killed it) still count. An entry of the interrupted batch that another worker took meanwhile (the
        outage outlasted `RLAIFV_JOBS_CLAIM_IDLE_MS`) gets back the delivery the taking counted, for its next
        reclaim, once however often this is asked: the taking itself judged it with that delivery. At most
        `RLAIFV_JOBS_MAX_DELIVERIES` outages of an entry go uncounted so, by all workers together (an item whose
        every run met an outage ran max x (max + 1) times with a bound per worker; a refusal for memory is no outage:
        `_record` waits it out); the entry is then left where it is, as is one whose run failed otherwise: the
        reclaim that takes it counts."""
        leave = interrupted.leave
        batch = {entry_id: times for entry_id, times in (interrupted.batch or {}).items() if entry_id not in leave}
        pairs = [value for entry_id, times in batch.items() for value in (entry_id, times)]
        limit = 10 * self.batch + len(batch)
        store = self.store
        entries, left = _resumed(
            await store.redis.eval(
                RESUME,
                1,
                store.stream,
                GROUP,
                consumer,
                limit,
                store.outages,
                self.max_deliveries,
                store.ttl_s * 1000,
                len(leave),
                *leave,
                *pairs,
            )
        )
        kept = await self._without_abandoned(entries)
        interrupted.resumed(left)
        if entries:
            log.info("job worker %s takes up %d items a Redis outage interrupted", consumer, len(entries))
        return kept

    async def _reclaim(self, consumer: str) -> list[Entry]:
        """Entries idle past `RLAIFV_JOBS_CLAIM_IDLE_MS` (their consumer stopped), taken over with XCLAIM (which
        checks the idle time again, so a live worker keeps its own). Those delivered once go as a batch; one
        delivered more often goes alone: when an item kills its worker, the whole batch it ran in is reclaimed,
        and run together again every entry of it would reach the delivery bound with the item that did it. Each
        comes with its deliveries, this one included (XCLAIM counts one more than XPENDING said)."""
        redis, stream = self.store.redis, self.store.stream
        stale = pending(await redis.xpending_range(stream, GROUP, "-", "+", self.batch, idle=self.claim_idle_ms))
        if not stale:
            return []
        taken = stale[:1] if stale[0].deliveries > 1 else [p for p in stale if p.deliveries <= 1]
        deliveries = {p.entry_id: p.deliveries + 1 for p in taken}
        ids: list[StreamIdT] = list(deliveries)
        claimed = stream_entries(await redis.xclaim(stream, GROUP, consumer, self.claim_idle_ms, ids))
        await self._forget_dead_consumers()
        return [(entry_id, fields, deliveries[entry_id]) for entry_id, fields in claimed if fields]

    async def _forget_dead_consumers(self) -> None:
        """Remove the group's consumers that stopped without leaving it (killed: out of memory, a node lost) once
        nothing they held is left with them: each crash added one to XINFO CONSUMERS for ever, and a group of
        thousands of dead names hides the live ones. Run when a worker starts and after it reclaimed entries; best
        effort: a failure here must not keep the claimed entries from running (they would wait another claim-idle
        time, a delivery nearer the bound)."""
        try:
            removed = as_int(
                await self.store.redis.eval(FORGET_CONSUMERS, 1, self.store.stream, GROUP, self.forget_after_ms)
            )
        except _DOWN_OR_REFUSED as exc:
            log.debug("stopped consumers not removed: %s", type(exc).__name__)
            return
        if removed:
            log.info("removed %d stopped job consumers from the group", removed)

    async def _without_abandoned(self, entries: list[Entry]) -> list[Entry]:
        """The entries to run; those every earlier delivery of which ended with its worker (a process killed while
        running it, out of memory or by a crash the item itself causes) get a failed result and leave the stream:
        reclaimed for ever, such an item took down worker after worker until its job expired."""
        kept: list[Entry] = []
        for entry_id, fields, times in entries:
            if times <= self.max_deliveries:
                kept.append((entry_id, fields, times))
                continue
            item = _parse_entry(entry_id, fields)
            if item is not None:
                message = (
                    f"the item was taken {times - 1} times by workers that stopped while running it (killed: out of"
                    " memory, or a crash it causes?); not tried again (RLAIFV_JOBS_MAX_DELIVERIES)"
                )
                entry = _failed(message, None, "item_abandoned", "internal_error")
                log.error("job item abandoned", extra={"job": item[0], "index": item[1], "deliveries": times - 1})
                try:
                    stored = await self.store.record(*item, entry)
                except OutOfMemoryError:  # left pending for a later reclaim (waited for here, unclaimed, it ran again)
                    continue
                if stored:
                    self.metrics.jobs.labels(outcome="failed").inc()
            await self.store.ack(entry_id)
        return kept

    async def _consume(self, consumer: str) -> None:
        delay = 0.0
        group_ready = False
        interrupted = _Interrupted()
        while not self._draining:
            entries: list[Entry] = []
            try:
                if not group_ready:  # registering the consumer up front shows idle workers in XINFO CONSUMERS
                    await self.store.ensure_group()
                    await self.store.redis.xgroup_createconsumer(self.store.stream, GROUP, consumer)
                    if consumer == self._consumers[0]:
                        await self._forget_dead_consumers()
                    group_ready = True
                if interrupted.batch is not None:
                    entries = await self._resume(consumer, interrupted)
                    interrupted.batch = None
                else:
                    entries = await self._next(consumer)
                ids = [entry_id for entry_id, _, _ in entries]
                if self._draining:  # told to stop while it read: no new items (another worker takes them now)
                    await self._hand_back(consumer, await self._held(consumer, ids))
                    break
                async with self._claimed(consumer, ids):
                    outcomes = await asyncio.gather(
                        *(self._process(entry_id, fields) for entry_id, fields, _ in entries), return_exceptions=True
                    )
                for outcome in outcomes:
                    if isinstance(outcome, BaseException):
                        raise outcome
                if delay:
                    log.warning("redis is reachable again; job worker %s resumes", consumer)
                    delay = 0.0
                    self.redis_ok = True
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN as exc:
                interrupted.outage(entries)
                if not delay and isinstance(exc, OutOfMemoryError):  # no delivery ended: nothing written (RESUME)
                    log.warning("redis is full (writes refused); job worker %s backs off; %s", consumer, FULL_HINT)
                elif not delay:
                    log.warning("redis unreachable (%s); job worker %s backs off", type(exc).__name__, consumer)
                self.redis_ok = False
                delay = min(max(delay * 2, 0.05), self.backoff_max_s)
                await asyncio.sleep(delay)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # the stream was lost (a Redis without persistence restarted)
                    group_ready = False
                    continue
                interrupted.failed(entries)
                log.exception("job worker error; retrying")
                await asyncio.sleep(1.0)
            except Exception:
                interrupted.failed(entries)
                log.exception("job worker error; retrying")
                await asyncio.sleep(1.0)

    @contextlib.asynccontextmanager
    async def _claimed(self, consumer: str, entry_ids: list[bytes]) -> AsyncIterator[None]:
        """While a batch runs, its entries stay this consumer's: XCLAIM ... JUSTID resets their idle time every third
        of `RLAIFV_JOBS_CLAIM_IDLE_MS`, so another worker's reclaim takes only the items of a consumer that
        stopped, never those of one still running a long GPU batch (they ran twice)."""

        redis, stream = self.store.redis, self.store.stream
        done = asyncio.Event()

        async def renew() -> None:
            while not done.is_set():
                await asyncio.sleep(self.claim_idle_ms / 3000)
                if done.is_set():
                    return
                try:  # only the entries still ours: one another worker took (Redis was away) stays theirs
                    held = pending(
                        await redis.xpending_range(stream, GROUP, "-", "+", 4 * len(entry_ids) + 100, consumer)
                    )
                    ours: list[StreamIdT] = [p.entry_id for p in held if p.entry_id in entry_ids]
                    if ours:
                        await redis.xclaim(stream, GROUP, consumer, 0, ours, justid=True)
                except Exception as exc:  # a lapse costs at most a rerun elsewhere; the batch goes on
                    log.debug("claim renewal skipped: %s", type(exc).__name__)

        renewing = asyncio.create_task(renew())
        try:
            yield
        finally:
            # A flag as well as the cancel: redis-py loses a cancel that lands while Redis reloads its AOF (the
            # call returns or raises BusyLoadingError instead), and the renewal looped on while the consumer waited
            # for it for ever, its health checks green.
            done.set()
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(renewing, timeout=5.0)

    async def _process(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        named = _parse_entry(entry_id, fields)
        if named is None:
            await self.store.ack(entry_id)
            return
        job_id, index = named
        kind, status, has_result, item = await self.store.load(job_id, index)
        if kind is not None and status != "cancelled" and not has_result:
            if status == "queued":
                with contextlib.suppress(OutOfMemoryError):  # a label only: the result sets the final status
                    await self.store.mark_running(job_id)
            entry = await self._run(kind, item)
            if await self._record(job_id, index, entry):  # a rerun of a reclaimed item is not counted again
                self.metrics.jobs.labels(outcome=entry["status"]).inc()
        await self.store.ack(entry_id)

    async def _record(self, job_id: str, index: int, entry: dict[str, Any]) -> bool:
        """`JobStore.record`, waited out while Redis is full: a refusal for memory ends neither the item nor its
        delivery, so the result is kept and written once Redis takes writes again (backing off up to
        RLAIFV_JOBS_BACKOFF_MAX_S; the entry stays this worker's meanwhile, `_claimed` renewing it). Taken for an
        outage, it cost a model run each time, spent the entry's uncounted outages, and then the reclaims between
        workers counted deliveries until the item failed as `item_abandoned`."""
        delay = 0.0
        while True:
            try:
                stored = await self.store.record(job_id, index, entry)
            except OutOfMemoryError:
                if not self.store_full:
                    log.warning(
                        "redis is full (used_memory at maxmemory under noeviction: writes refused); job workers hold"
                        " their results and write them once it takes writes again, retrying every %g s at most;"
                        " %s",
                        self.backoff_max_s,
                        FULL_HINT,
                        extra={"job": job_id, "index": index},
                    )
                self.store_full = True
                delay = min(max(delay * 2, 0.05), self.backoff_max_s)
                await asyncio.sleep(delay)
                continue
            if self.store_full:
                log.warning("redis takes writes again; job workers write their results")
                self.store_full = False
            return stored

    async def _run(self, kind: str, item: dict[str, Any] | None) -> dict[str, Any]:
        entry: dict[str, Any] = {}
        if item is not None and item.get("custom_id") is not None:
            entry["custom_id"] = item["custom_id"]
        try:
            if item is None:
                raise BadRequest("job item is missing (expired?)")
            try:  # checked at submission; a schema changed since (an upgrade) fails the item as the client's
                request = REQUEST_MODELS[kind].model_validate(item["body"])
            except ValidationError as exc:
                raise BadRequest.listing(field_problems(exc.errors(), item["body"])) from None
            response = await self._serve(request)
            return entry | {"status": "succeeded", "result": response.model_dump(mode="json")}
        except ServiceError as exc:
            return entry | _failed(exc.message, exc.param, exc.code, exc.type, exc.errors)
        except InvalidInputError as exc:
            return entry | _failed(exc.message, exc.param, invalid_input_code(exc))
        except Exception:  # a bug must not leave a poison entry that is reclaimed forever
            log.exception("job item failed")
            return entry | _failed("internal server error", None, "internal_error", "internal_error")

    async def _serve(self, request: BestOfNRequest | RewardsRequest) -> Any:
        """One item through the serving code. A full scheduler queue, or a deadline passed while still queued
        (HTTP traffic has the priority), is waited out here instead of failing the item: jobs are the work that
        can wait (under HTTP load 29 of 48 items failed as deadline_exceeded). An item that ran past its deadline
        still fails: it would run past it again."""
        delay = 0.05
        while True:
            try:
                if isinstance(request, BestOfNRequest):
                    return await self.serving.best_of_n(request, None)
                return await self.serving.rewards(request, None)
            except (Overloaded, QueuedTooLong):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


class _Interrupted:
    """What one consumer knows of the deliveries a Redis outage ended, to take them up again (`JobWorkers._resume`).

    `batch`: the entries it was running when Redis went away, with their deliveries ({} when it knows none: a reply
    lost with the connection), or None when no outage awaits taking up. `leave`: entries it holds but leaves to
    another worker's reclaim, which counts a delivery: those whose run failed otherwise (a bug, a refused command:
    that delivery counts, or such an item would go round for ever), and those the last taking up left alone."""

    KEEP = 1000  # entries left alone, remembered until the next taking up reads what is left

    def __init__(self) -> None:
        self.batch: dict[bytes, int] | None = None
        self._leave: dict[bytes, None] = {}  # a dict for its order: the oldest go first past KEEP

    @property
    def leave(self) -> KeysView[bytes]:
        return self._leave.keys()

    def outage(self, entries: list[Entry]) -> None:
        self.batch = (self.batch or {}) | {entry_id: times for entry_id, _, times in entries}

    def failed(self, entries: list[Entry]) -> None:
        """A taking up that failed so is given up too: a consumer must not try it for ever instead of reading."""
        self.batch = None
        self._leave |= {entry_id: None for entry_id, _, _ in entries}
        while len(self._leave) > self.KEEP:
            del self._leave[next(iter(self._leave))]

    def resumed(self, left: list[bytes]) -> None:
        """Only entries still held stay left alone: one finished, or taken by another worker, starts afresh."""
        self._leave = dict.fromkeys(left)


def _parse_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> tuple[str, int] | None:
    """The (job, item index) a stream entry names; None, logged, for an entry no version of this service wrote
    (retried for ever, it kept the backlog above zero and workers busy)."""
    try:
        return fields[b"job"].decode(), int(fields[b"index"])
    except (KeyError, ValueError, UnicodeDecodeError):
        log.error("job stream entry %s names no job item (fields %s): dropped", entry_id.decode(), sorted(fields))
        return None


# What a best-effort clean-up shrugs off: Redis away, or the command refused (`_forget_dead_consumers`).
_DOWN_OR_REFUSED: tuple[type[Exception], ...] = (*REDIS_DOWN, ResponseError)


def _write_refused(exc: ResponseError) -> bool:
    """A write refused to this user or connection (ACL, a read-only replica), also from inside a script, where
    Redis words it its own way ("The user executing the script can't run this command")."""
    text = str(exc)
    return isinstance(exc, NoPermissionError | ReadOnlyError) or any(
        mark in text for mark in ("NOPERM", "can't run this command", "READONLY", "read only replica")
    )


def _job(job_id: str, raw: dict[bytes, bytes], owner: str | None) -> Job | None:
    """The job of a job hash as HGETALL returns it; None when it is not the owner's or not a whole job."""
    d = {k.decode(): v.decode() for k, v in raw.items()}
    if not {"kind", "status", "total"} <= d.keys():  # absent, or a fragment a write left after the job expired
        return None
    if d.get("owner", owner or ANONYMOUS) != (owner or ANONYMOUS):  # a job from before owners were kept: any
        return None
    return Job(
        id=job_id,
        kind=d["kind"],
        status=d["status"],
        created=int(d["created"]),
        updated=int(d["updated"]),
        total=int(d["total"]),
        completed=int(d["completed"]),
        failed=int(d["failed"]),
        metadata=json.loads(d.get("metadata", "{}")),
    )


def _resumed(reply: object) -> tuple[list[Entry], list[bytes]]:
    """`RESUME`'s reply: the entries taken up ({id, flat fields, deliveries}) and the ids left alone."""
    taken, left = as_sized_list(reply, 2)
    entries: list[Entry] = []
    for entry in as_list(taken):
        entry_id, fields, times = as_sized_list(entry, 3)
        entries.append((as_bytes(entry_id), as_pairs(fields), as_int(times)))
    return entries, as_bytes_list(left)


class _AnchorGone(Exception):
    """The job a page was being read after left the index meanwhile (it expired): the page is read again."""


def _depth(value: Any) -> int:
    """How deeply a JSON value nests (a scalar: 0), without recursion: any depth is measured."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            stack.extend((v, level + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, level + 1) for v in value)
        else:
            continue
        deepest = max(deepest, level + 1)
    return deepest


def _too_deep(where: str, depth: int) -> FieldProblem:
    found = f" ({depth} levels)" if depth else ""
    message = f"{where}: JSON nested too deeply{found}; at most {MAX_ITEM_DEPTH} levels"
    return FieldProblem(message=message, param=where, code="invalid_value")


def _bad_after(after: str) -> BadRequest:
    """OpenAI's wording for a cursor that names nothing in the list; the same for every reason, so another key's
    job ids cannot be probed."""
    return BadRequest(
        f"Invalid 'after': {after[:64]!r} is not one of your jobs (it does not exist or has expired).",
        param="after",
        code="invalid_value",
    )


def _problems(so_far: Problems, exc: ValidationError, data: Any, prefix: str) -> Problems:
    """An item's problems, or only their count once the listed ones are full (a file of 10,000 typos)."""
    if so_far.full:
        return Problems([], exc.error_count())
    return field_problems(exc.errors(include_url=False), data, prefix)


def _failed(
    message: str,
    param: str | None,
    code: str | None,
    type_: str = "invalid_request_error",
    errors: list[FieldProblem] | None = None,
) -> dict[str, Any]:
    return {"status": "failed"} | error_body(type_, message, param, code, errors)
