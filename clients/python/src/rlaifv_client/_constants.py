"""Client defaults, in one place."""

from __future__ import annotations

import httpx

BASE_URL_ENV = "RLAIFV_BASE_URL"
API_KEY_ENV = "RLAIFV_API_KEY"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"

# Best-of-N runs the model n times: reads may take long, connecting should not.
DEFAULT_TIMEOUT = httpx.Timeout(timeout=180.0, connect=5.0)
DEFAULT_MAX_RETRIES = 2

# Retries: exponential backoff from INITIAL_RETRY_DELAY doubling up to MAX_RETRY_DELAY, each delay
# multiplied by a random factor in [1 - RETRY_JITTER, 1]. A server's Retry-After is honoured up to
# MAX_RETRY_AFTER seconds (plus up to RETRY_JITTER of itself, so a burst of rejected clients spreads out).
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
MAX_RETRY_AFTER = 60.0
RETRY_JITTER = 0.25
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
NOT_PROCESSED_STATUSES = frozenset({429, 503})  # refused before any work: safe to repeat even non-idempotent calls

# Jobs and readiness
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_READY_TIMEOUT = 600.0  # seconds `wait_until_ready` waits by default: a 7B pair or vLLM servers load for minutes
MAX_POLL_INTERVAL = 10.0

REQUEST_ID_HEADER = "X-Request-ID"
RETRY_COUNT_HEADER = "X-RLAIFV-Retry-Count"
USER_AGENT_NAME = "rlaifv-client"
MIN_POLL_TIMEOUT = 1.0  # seconds: the shortest timeout of a `jobs.wait` poll near its deadline
# seconds a retry must have left after its wait (a quarter of the call's timeout if that is less): a retry given
# 0.01 s timed out, and the caller saw a timeout instead of the server's answer
MIN_RETRY_ATTEMPT_S = 1.0

# Files the SDK reads itself (an image given as a path or a file object, a JSONL file given to `jobs.submit_file`)
# are read up to these sizes, and only when they are regular files: "/dev/zero" grew until the kernel killed the
# process, a FIFO blocked for ever. Both are the server's default request body limit (RLAIFV_MAX_BODY_BYTES, 16 MiB):
# no larger file can reach a server at its defaults (an image travels base64-encoded, 4/3 of its size, inside the JSON
# body, and its own limit, RLAIFV_MAX_IMAGE_BYTES, is 10 MiB; an upload is the body). Bytes you pass are not bounded:
# you read them yourself, for a server whose operator raised its limits.
MAX_IMAGE_FILE_BYTES = 16 * 1024 * 1024
MAX_UPLOAD_FILE_BYTES = 16 * 1024 * 1024
