"""Service settings: one object, read from `RLAIFV_*` environment variables (CLI flags override them).

Every limit has a safe default. List-valued settings accept JSON (`["a","b"]`)
or a comma-separated string (`a,b`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from rlaifv.reward.images import ImageLimits

DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
PLACEHOLDER_KEYS = {"changeme", "change-me", "secret", "password", "test", "apikey", "api-key", "xxx"}


def _check_netloc(url: str) -> None:
    """A URL's host and port, read as the client will read them: a bad port ("abc", 99999) failed at start-up as a
    traceback naming no setting."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # urllib's message quotes the netloc: a password's characters, in an unescaped URL
        raise ValueError(
            "has no valid host and port: percent-encode special characters (#, /, @, :) of a user or password in"
            " the URL, or give the password in its own setting"
        ) from None
    if not parts.hostname:
        raise ValueError("names no host")
    if port == 0:
        raise ValueError("port 0 is not a server's port")


def _split(value: Any) -> Any:
    """A comma-separated list, or a JSON array; a value that starts with '[' but is no JSON (an IPv6 host entry,
    `[::1]:8080,images.example.com`) is a comma-separated list too."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            try:
                return json.loads(text)
            except json.JSONDecodeError:
                if text.startswith(('["', "[]")):  # meant as JSON: its error says what is wrong
                    raise
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


CommaList = Annotated[list[str], NoDecode]


LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
TEN_YEARS_S = 10 * 365 * 24 * 3600
"""Bound of the TTL settings: Redis refuses an expiry past 2^63 ms, and every cache write then failed (500)."""


class Settings(BaseSettings):
    """Configuration of `rlaifv serve` and `rlaifv worker`. Environment names: the field names upper-cased,
    prefixed with `RLAIFV_`."""

    # No float setting means anything at infinity (a grace of inf crashed `rlaifv serve`); NaN compares false.
    # Errors never repeat the value given: it may be a password, a key, or a URL holding one.
    model_config = SettingsConfigDict(
        env_prefix="RLAIFV_", extra="ignore", validate_default=True, allow_inf_nan=False, hide_input_in_errors=True
    )

    # -- model ------------------------------------------------------------------
    bundle: Path | None = Field(
        None,
        description="Bundle folder (rlaifv.json + policy/ + reference/); the built-in shapes-world model when unset.",
    )
    engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="What runs the model pair: 'transformers' (in process, CPU or GPU) or 'vllm' (vLLM servers of the "
        "policy and the reference, RLAIFV_VLLM_*; docs/vllm.md).",
    )
    model_name: str | None = Field(None, description="Name advertised by /v1/models; the bundle's name when unset.")
    device: str | None = Field(None, description="'cpu', 'cuda', 'cuda:1'...; auto when unset.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto | float32 | bfloat16 | float16."
    )
    trust_remote_code: bool = Field(False, description="Allow model folders to run their own code (off by default).")
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch intra-op threads; torch's default when unset. 1 is often fastest on shared CPUs.",
    )
    pack_weights: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Serve CPU linears from weights packed once for oneDNN (1.5-3x faster decode products; one more "
        "copy of those weights in memory). auto: bfloat16 wherever the CPU has AVX512_BF16 or AMX, float32 on AMD CPUs "
        "(where MKL's float32 GEMM is slow), and only if the copies fit in half the memory left; on: every bfloat16 "
        "or float32 linear this CPU can pack, and start-up fails where none can; off: never.",
    )
    family_check: Literal["refuse", "warn"] = Field(
        "refuse",
        description="A model type without rules in the engine (reward/families.py) is compared at start-up with its "
        "own generate (reward/family_check.py). refuse: start-up fails where they disagree; warn: log it and serve "
        "(for a model checked otherwise; one the engine cannot run at all is refused either way).",
    )
    warmup: bool = Field(True, description="Run one tiny best-of-N before reporting ready.")

    # -- generator: best-of-N over another model ---------------------------------
    generator_url: str | None = Field(
        None,
        description="Base URL of an OpenAI-compatible API (e.g. http://host:8000/v1) whose /chat/completions writes "
        "the best-of-N candidates; the model pair only scores them. Unset: the pair samples.",
    )
    generator_model: str | None = Field(
        None, description="Model the generator is asked for; the only one its /models lists when unset."
    )
    generator_api_key: SecretStr | None = Field(None, description="Bearer key sent to the generator.")
    generator_timeout_s: float = Field(60.0, gt=0, description="One generator request gives up after this long (503).")
    generator_max_n: int | None = Field(
        None,
        ge=1,
        description="Most candidates asked of the generator per request (its n); more are split into concurrent "
        "requests. Unset: all in one.",
    )

    # -- vLLM engine (RLAIFV_ENGINE=vllm) -----------------------------------------
    vllm_policy_url: str | None = Field(
        None,
        description="Base URL of the vLLM server of the bundle's policy (`vllm serve <bundle>/policy`), e.g. "
        "http://host:8000/v1. Needed with RLAIFV_ENGINE=vllm.",
    )
    vllm_reference_url: str | None = Field(
        None,
        description="Base URL of the vLLM server of the bundle's reference (`vllm serve <bundle>/reference`). "
        "Needed with RLAIFV_ENGINE=vllm unless RLAIFV_VLLM_REFERENCE=inprocess.",
    )
    vllm_reference: Literal["server", "inprocess"] = Field(
        "server",
        description="Where the vllm engine scores the reference: 'server' (its vLLM server, prompt_logprobs) or "
        "'inprocess' (the reference loaded here, shared-prefix scoring: 1.9-5.6x cheaper on a CPU, docs/vllm.md).",
    )
    vllm_policy_model: str | None = Field(
        None, description="Model name the policy server serves; the only one its /v1/models lists when unset."
    )
    vllm_reference_model: str | None = Field(
        None, description="Model name the reference server serves; the only one its /v1/models lists when unset."
    )
    vllm_api_key: SecretStr | None = Field(None, description="Bearer key of the vLLM servers (`vllm serve --api-key`).")
    vllm_timeout_s: float = Field(
        120.0, gt=0, description="One request to a vLLM server gives up after this long (503)."
    )
    vllm_concurrent_batches: int = Field(
        8,
        ge=1,
        description="With RLAIFV_ENGINE=vllm: batches sent to the vLLM servers at once (vLLM batches them together"
        " continuously): a short request is not held behind a long best-of-N. 1: one batch at a time.",
    )
    vllm_wait_s: float = Field(
        0.0,
        ge=0,
        description="How long start-up waits for the vLLM servers to answer /health (pods starting together); "
        "0: they must answer at once.",
    )

    # -- HTTP -------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the API (or the worker's operations port) listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port of the API.")
    log_level: str = Field("info", description="critical, error, warning, info or debug.")
    shutdown_grace_s: float = Field(30.0, ge=0, description="Time in-flight requests get to finish on shutdown.")
    engine_stall_s: float = Field(
        900.0,
        ge=0,
        description="/healthz fails once one engine batch has run this long (a model call hung in a driver never"
        " returns; a restart frees it). Set above your longest batch; 0: never.",
    )
    worker_port: int = Field(
        8001, ge=0, le=65535, description="`rlaifv worker`: port of its /healthz, /readyz and /metrics; 0: none."
    )

    # -- limits -----------------------------------------------------------------
    max_n: int = Field(16, ge=1, description="Largest n (and best_of) a request may ask for.")
    max_tokens: int = Field(256, ge=1, description="Largest max_tokens per answer.")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when the request gives none.")
    max_answers: int = Field(64, ge=1, description="Most answers one /v1/rewards request may score.")
    max_answer_chars: int = Field(20_000, ge=1, description="Longest answer text accepted by /v1/rewards.")
    max_question_chars: int = Field(
        20_000, ge=1, description="Longest question, or text of all messages together, in characters."
    )
    max_images: int = Field(4, ge=1, description="Most images per request.")
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Largest encoded image, in bytes.")
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1,
        le=178_956_970,  # Pillow refuses larger images itself, as decompression bombs
        description="Largest declared width*height (checked before decoding; at most 178956970, Pillow's own bound).",
    )
    max_image_aspect: float = Field(
        20.0, ge=1, description="Largest long/short side ratio (a 1x16M image would blow up when resized)."
    )
    allowed_image_formats: CommaList = Field(list(DEFAULT_IMAGE_FORMATS), description="PIL format names accepted.")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1, description="Largest request body; 413 above it.")
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A request body not fully received this long after the request began is refused (408) and"
        " its connection closed: a client trickling its upload held a connection for as long as it liked.",
    )
    header_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A connection whose request head (line and headers) is not complete this long after it opened"
        " or after its last response is closed: idle or trickling connections used up file descriptors.",
    )
    stream_write_timeout_s: float = Field(
        60.0,
        ge=0,
        description="A response whose client takes none of it for this long (the socket's buffers full) is cut, its"
        " connection reset and the request counted 499: a client that stopped reading a stream held the answer in"
        " memory and a connection for ever. A slow reader that keeps reading is not cut (the socket's send queue"
        " counts). 0: no limit.",
    )
    allowed_image_hosts: CommaList = Field(
        default_factory=list,
        description="Hosts remote http(s) image URLs may come from ('*.example.com' for subdomains; 'host:8080' or"
        " 'host:*' for ports other than the scheme's own; an IP address or CIDR network, e.g. '10.0.0.0/8:9000',"
        " allows URLs naming it and allowed names resolving to it). An allowed name must resolve to public addresses"
        " only, unless an IP or CIDR entry covers the address. Empty: none.",
    )
    allow_private_image_addresses: bool = Field(
        False,
        description="Allowed image host names may resolve to private addresses (10/8, 172.16/12, 192.168/16, CGNAT"
        " 100.64/10, IPv6 fc00::/7): an in-cluster image store. Loopback, link-local and cloud metadata addresses"
        " still need an IP or CIDR entry in RLAIFV_ALLOWED_IMAGE_HOSTS.",
    )
    image_fetch_timeout_s: float = Field(
        5.0, gt=0, description="Time limit of fetching a remote image URL, redirects and all."
    )

    # -- scheduler --------------------------------------------------------------
    max_queue: int = Field(64, ge=1, description="Requests waiting for the model before 429s are returned.")
    max_queued_image_pixels: int = Field(
        256_000_000,
        ge=0,
        description="Decoded image pixels (3 bytes each) the waiting and running requests may hold together; past it "
        "a request with images is a 429 (one request is always let in). 0: no limit.",
    )
    max_batch: int = Field(16, ge=1, description="Most requests sharing one forward pass; 1 disables micro-batching.")
    batch_window_ms: float = Field(
        5.0, ge=0, description="A forming batch waits this long after each arrival for the next request."
    )
    batch_max_wait_ms: float = Field(
        50.0, ge=0, description="At most this long in all between a batch's first request and its start."
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="Deadline of a request, queueing included (504 after it)."
    )
    retry_after_s: int = Field(
        1,
        ge=1,
        description="Retry-After of a 429 `queue_full` and of the 503s of a stopping server, a vLLM server down"
        " and a generator down (unless it gave one); a 429 `rate_limited` gives the seconds left in its minute.",
    )

    # -- auth -------------------------------------------------------------------
    api_keys: CommaList = Field(default_factory=list, description="API keys; when any is set, /v1 routes need one.")
    api_keys_file: Path | None = Field(None, description="File with one API key per line (# comments allowed).")
    protect_metrics: bool = Field(False, description="Require an API key for /metrics too.")
    allow_placeholder_keys: bool = Field(False, description="Accept keys like 'changeme' (development only).")

    # -- redis ------------------------------------------------------------------
    redis_url: str | None = Field(
        None, description="redis://... (rediss:// for TLS) for jobs, reward cache and rate limits; memory when unset."
    )
    redis_password: SecretStr | None = Field(None, description="Redis password (AUTH); overrides one in the URL.")
    redis_username: str | None = Field(None, description="Redis ACL user name (with redis_password).")
    redis_tls: bool = Field(False, description="Use TLS even when the URL says redis:// (rediss:// implies TLS).")
    redis_tls_ca_file: Path | None = Field(None, description="CA bundle that signs the Redis server's certificate.")
    redis_tls_cert_file: Path | None = Field(None, description="Client certificate for mutual TLS.")
    redis_tls_key_file: Path | None = Field(None, description="Key of the client certificate.")
    redis_connect_timeout_s: float = Field(2.0, gt=0, description="Connecting to Redis gives up after this long.")
    redis_timeout_s: float = Field(
        5.0, gt=0, description="One Redis command gives up after this long (an outage then costs at most this)."
    )
    redis_retry_after_s: int = Field(5, ge=1, description="Retry-After of job endpoints' 503 while Redis is down.")
    redis_optional_timeout_s: float = Field(
        0.5,
        gt=0,
        description="The reward cache and rate limits give up on a Redis command after this long (a cache miss, a"
        " count in memory) and leave Redis alone for RLAIFV_REDIS_RETRY_AFTER_S: a request never waits out"
        " RLAIFV_REDIS_TIMEOUT_S for them.",
    )
    ready_requires_redis: bool = Field(
        False, description="Make /readyz answer 503 while Redis is unreachable (off: Redis state is only reported)."
    )
    cache_size: int = Field(1024, ge=0, description="Entries of the in-memory reward cache; 0 disables caching.")
    cache_ttl_s: int = Field(3600, ge=1, le=TEN_YEARS_S, description="Lifetime of a cached reward.")
    rate_limit_per_minute: int = Field(
        0, ge=0, description="Requests per minute per API key (or client address); 0: off."
    )
    forwarded_allow_ips: CommaList = Field(
        default_factory=list,
        description="Proxies (IPs, CIDRs, or * for any) whose X-Forwarded-For / X-Forwarded-Proto give the client"
        " address (rate limits, logs); none: the connection's own address (a client could name any address).",
    )
    jobs_stream: str = Field("rlaifv:jobs", description="Redis stream holding batch-job work items.")
    jobs_workers: int = Field(1, ge=0, description="Job consumers this replica runs (0: accept jobs, run none).")
    jobs_claim_idle_ms: int = Field(
        60_000, ge=100, le=7 * 24 * 3600 * 1000, description="Idle time after which another worker reclaims a job."
    )
    jobs_max_deliveries: int = Field(
        5,
        ge=1,
        description="An item taken this many times by workers that stopped while running it (killed: out of memory,"
        " a crash it causes) fails with code item_abandoned instead of being taken again.",
    )
    jobs_max_items: int = Field(10_000, ge=1, description="Most items in one batch job.")
    jobs_page_size: int = Field(
        500, ge=1, le=10_000, description="Results read from Redis per round trip while streaming a job's results."
    )
    jobs_backoff_max_s: float = Field(
        5.0,
        gt=0,
        description="Longest pause of a job worker between attempts while Redis is unreachable, or full (a result it"
        " refused is held and retried).",
    )
    jobs_ttl_s: int = Field(
        7 * 24 * 3600, ge=60, le=TEN_YEARS_S, description="How long job status and results are kept."
    )
    jobs_admit_memory_fraction: float = Field(
        0.9,
        gt=0,
        le=1,
        description="New jobs are refused (503 jobs_store_full) while Redis's used_memory is above this fraction of"
        " its maxmemory (no check without a maxmemory): the rest is left to the results of the jobs accepted.",
    )

    @field_validator("allowed_image_formats", "allowed_image_hosts", "api_keys", "forwarded_allow_ips", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("allowed_image_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        from rlaifv.service.urls import entry_problem

        problems = [problem for entry in value if (problem := entry_problem(entry))]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("allowed_image_formats")
    @classmethod
    def _formats(cls, value: list[str]) -> list[str]:
        """Pillow's format names: "JPG" matched no image (every JPEG was refused), an empty list every image."""
        from PIL import Image

        Image.init()
        known = set(Image.OPEN) | set(Image.SAVE) | {"MPO"}  # MPO (phones' JPEGs) opens through the JPEG plugin
        formats = [v.upper() for v in value]
        if not formats:
            raise ValueError(f"must name at least one image format, e.g. {','.join(DEFAULT_IMAGE_FORMATS)}")
        unknown = [f for f in formats if f not in known]
        if unknown:
            hint = " (Pillow calls it JPEG)" if "JPG" in unknown else ""
            raise ValueError(
                f"unknown image format(s) {', '.join(unknown)}{hint}; Pillow knows {', '.join(sorted(known))}"
            )
        return formats

    @field_validator("dtype", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator(
        "bundle", "api_keys_file", "redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file", mode="before"
    )
    @classmethod
    def _empty_path(cls, value: Any) -> Any:
        """An empty variable is unset (as for the URLs): it was the current folder."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")
    @classmethod
    def _tls_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        """Refused here, before a model loads for minutes only to fail on the device."""
        if value is None or not value.strip() or value.strip().lower() == "auto":
            return None
        value = value.strip().lower()
        kind, _, index = value.partition(":")
        if kind not in ("cpu", "cuda", "mps", "xpu") or (index and not index.isdigit()):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N, mps, xpu or xpu:N, got {value!r}")
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """Settings printed in a log line or a traceback's locals keep secrets out: the API keys hidden as the other
        keys are (SecretStr), URLs without their user, password and query (one that does not parse as host and port,
        such as a unix:// socket path, shows its scheme only)."""
        from rlaifv.service.urls import without_credentials

        for name, value in super().__repr_args__():
            if name == "api_keys":
                value = [SecretStr(key) for key in value]
            elif name in ("generator_url", "vllm_policy_url", "vllm_reference_url", "redis_url") and value:
                try:
                    value = without_credentials(value)[1]
                except ValueError:
                    value = f"{value.partition(':')[0]}://***"
            yield name, value

    @field_validator("generator_url", "vllm_policy_url", "vllm_reference_url")
    @classmethod
    def _generator_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL such as http://host:8000/v1")
        _check_netloc(value)
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        """An empty host bound every interface without a word: that is said as 0.0.0.0 or ::."""
        if not value.strip():
            raise ValueError("is empty: name an address (0.0.0.0 or :: to listen on every interface)")
        return value.strip()

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return value.lower()

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// (TLS) or unix:// URL")
        if value.startswith("unix://"):
            from urllib.parse import urlsplit

            if not urlsplit(value).path:
                raise ValueError("a unix:// URL names the socket's path: unix:///run/redis/redis.sock")
        else:
            _check_netloc(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        needs_reference = self.vllm_reference == "server"
        if self.engine == "vllm" and (
            self.vllm_policy_url is None or (needs_reference and not self.vllm_reference_url)
        ):
            raise ValueError(
                "RLAIFV_ENGINE=vllm needs RLAIFV_VLLM_POLICY_URL and RLAIFV_VLLM_REFERENCE_URL (the vLLM servers of "
                "the bundle's policy and reference; docs/vllm.md), or RLAIFV_VLLM_REFERENCE=inprocess"
            )
        # A vllm batch waits on up to three calls in a row (sampling, both scorings at once, the claims judge), each
        # allowed RLAIFV_VLLM_TIMEOUT_S for a free connection and again for its answer: a stall limit under that
        # would restart replicas that are only slow.
        if self.engine == "vllm" and 0 < self.engine_stall_s <= 6 * self.vllm_timeout_s:
            raise ValueError(
                f"RLAIFV_ENGINE_STALL_S ({self.engine_stall_s:g}) must exceed 6 x RLAIFV_VLLM_TIMEOUT_S "
                f"({self.vllm_timeout_s:g}): a vllm batch makes up to three calls in a row, each allowed that long to"
                " get a connection and again to be answered"
            )
        self._check_redis()
        if self.protect_metrics and not self.load_api_keys():
            raise ValueError(
                "RLAIFV_PROTECT_METRICS needs API keys (RLAIFV_API_KEYS or RLAIFV_API_KEYS_FILE): without any, /metrics"
                " would stay open"
            )
        if self.default_max_tokens > self.max_tokens:
            self.default_max_tokens = self.max_tokens
        if not self.allow_placeholder_keys:
            bad = [k for k in self.load_api_keys() if k.lower() in PLACEHOLDER_KEYS or len(k) < 8]
            if bad:
                raise ValueError(
                    "API keys must be at least 8 characters and not a placeholder such as 'changeme' "
                    "(set RLAIFV_ALLOW_PLACEHOLDER_KEYS=true for development)"
                )
        return self

    def _check_redis(self) -> None:
        """Redis settings that would be dropped without a word: TLS files without TLS (plaintext), TLS over a
        socket, readiness on a Redis that is not configured."""
        url = self.redis_url or ""
        if self.ready_requires_redis and not url:
            raise ValueError("RLAIFV_READY_REQUIRES_REDIS needs RLAIFV_REDIS_URL")
        if self.redis_tls and url.startswith("unix://"):
            raise ValueError("RLAIFV_REDIS_TLS needs a redis:// or rediss:// URL, not a unix:// socket")
        tls = self.redis_tls or url.startswith("rediss://")
        files = ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")
        given = [f"RLAIFV_{name.upper()}" for name in files if getattr(self, name) is not None]
        if given and not tls:
            raise ValueError(
                f"{', '.join(given)} without TLS would be ignored (a plaintext connection): set RLAIFV_REDIS_TLS=true"
                " or use a rediss:// URL"
            )

    def redis_connection_url(self) -> str:
        """RLAIFV_REDIS_URL as the client gets it: rediss:// when RLAIFV_REDIS_TLS is on (redis-py takes no `ssl`
        option with a redis:// URL: every command failed), and without the user or password that
        RLAIFV_REDIS_USERNAME / RLAIFV_REDIS_PASSWORD override (redis-py lets the URL's win over its arguments)."""
        from urllib.parse import urlsplit, urlunsplit

        url = self.redis_url or ""
        if self.redis_tls and url.startswith("redis://"):
            url = "rediss://" + url[len("redis://") :]
        parts = urlsplit(url)
        if url.startswith("unix://") or "@" not in parts.netloc:
            return url
        userinfo, _, host = parts.netloc.rpartition("@")
        user, has_password, password = userinfo.partition(":")  # each part overridden alone, kept percent-encoded
        if self.redis_username is not None:
            user = ""
        if self.redis_password is not None:
            has_password, password = "", ""
        kept = f"{user}{has_password}{password}"
        netloc = f"{kept}@{host}" if kept else host
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def image_limits(self) -> ImageLimits:
        """The limits of every image, for the service's decoding and for the model pair's own check of what it is
        given (the pair kept its defaults: a raised RLAIFV_MAX_IMAGE_ASPECT was refused there)."""
        from rlaifv.reward.images import ImageLimits

        return ImageLimits(
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            max_aspect=self.max_image_aspect,
            allowed_formats=frozenset(self.allowed_image_formats),
        )

    def load_api_keys(self) -> list[str]:
        """Keys from RLAIFV_API_KEYS plus the lines of RLAIFV_API_KEYS_FILE."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            try:
                lines = self.api_keys_file.read_text(encoding="utf-8-sig").splitlines()
            except OSError as exc:
                raise ValueError(f"cannot read api_keys_file {self.api_keys_file}: {exc.strerror}") from None
            # A comment after a key ("sk-... # prod") is the key's note, not part of it (keys hold no spaces).
            in_file = [line.split(" #")[0].split("\t#")[0].strip() for line in lines]
            in_file = [key for key in in_file if key and not key.startswith("#")]
            if not in_file:  # a file given for keys, empty (a Secret created without its key): /v1 open to all
                raise ValueError(
                    f"api_keys_file {self.api_keys_file} holds no key: with it, /v1 would be open to anyone; write"
                    " one key per line (or unset RLAIFV_API_KEYS_FILE to run without keys)"
                )
            keys += in_file
        return keys

    def redis_options(self) -> dict[str, Any]:
        """Keyword arguments of `redis.asyncio.Redis.from_url` besides the URL (timeouts, auth, TLS)."""
        options: dict[str, Any] = {
            "socket_connect_timeout": self.redis_connect_timeout_s,
            "socket_timeout": self.redis_timeout_s,
            "health_check_interval": 10,
        }
        if self.redis_password is not None:
            options["password"] = self.redis_password.get_secret_value()
        if self.redis_username is not None:
            options["username"] = self.redis_username
        tls = self.redis_tls or (self.redis_url or "").startswith("rediss://")
        if tls:  # the scheme says TLS: see `redis_connection_url`
            if self.redis_tls_ca_file is not None:
                options["ssl_ca_certs"] = str(self.redis_tls_ca_file)
            if self.redis_tls_cert_file is not None:
                options["ssl_certfile"] = str(self.redis_tls_cert_file)
            if self.redis_tls_key_file is not None:
                options["ssl_keyfile"] = str(self.redis_tls_key_file)
        return options

    def api_key_hashes(self) -> list[bytes]:
        return [hashlib.sha256(key.encode()).digest() for key in self.load_api_keys()]
