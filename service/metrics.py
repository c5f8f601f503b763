"""Prometheus metrics of the service, in one registry per app (tests run several apps in one process).

Names follow Prometheus conventions: `rlaifv_` prefix, `_total` counters,
`_seconds` durations, base units.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
REWARD_BUCKETS = (-5, -2, -1, -0.5, -0.2, -0.1, -0.05, -0.02, -0.01, 0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
MARGIN_BUCKETS = (0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "rlaifv_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "rlaifv_http_request_duration_seconds",
            "HTTP request latency by route template and status.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("rlaifv_queue_depth", "Requests waiting for the model.", registry=r)
        self.in_flight = Gauge("rlaifv_requests_in_flight", "Requests in batches the model is running.", registry=r)
        self.responses_cut = Counter(
            "rlaifv_http_responses_cut",
            "Responses whose connection was aborted, by reason: unread (RLAIFV_STREAM_WRITE_TIMEOUT_S) or shutdown.",
            ["reason"],
            registry=r,
        )
        self.image_pixels = Gauge(
            "rlaifv_image_pixels_held",
            "Decoded image pixels held by requests not yet ended (the RLAIFV_MAX_QUEUED_IMAGE_PIXELS budget).",
            registry=r,
        )
        self.batch_size = Histogram(
            "rlaifv_batch_size",
            "Requests sharing one forward pass, by kind.",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.rejected = Counter("rlaifv_requests_rejected", "Requests not served, by reason.", ["reason"], registry=r)
        self.generated_tokens = Counter("rlaifv_generated_tokens", "Answer tokens sampled by the policy.", registry=r)
        self.scored_tokens = Counter(
            "rlaifv_scored_tokens", "Answer tokens whose reward terms were computed.", registry=r
        )
        self.prompt_tokens = Counter(
            "rlaifv_prompt_tokens", "Prompt tokens (image tokens included) processed.", registry=r
        )
        self.reward = Histogram(
            "rlaifv_reward",
            "RLAIF-V reward of every candidate, by API (best_of_n, rewards, chat). Not `endpoint`: the Prometheus"
            " Operator sets that label itself (the scrape port) and would rename ours.",
            ["api"],
            buckets=REWARD_BUCKETS,
            registry=r,
        )
        self.best_margin = Histogram(
            "rlaifv_best_reward_margin",
            "Best reward minus the mean reward of the candidates of one request, by API.",
            ["api"],
            buckets=MARGIN_BUCKETS,
            registry=r,
        )
        self.model_load = Gauge("rlaifv_model_load_seconds", "Time to load the model pair.", registry=r)
        self.warmup = Gauge("rlaifv_model_warmup_seconds", "Time of the warm-up pass.", registry=r)
        self.ready = Gauge("rlaifv_ready", "1 when the model is loaded and warm.", registry=r)
        self.cache = Counter("rlaifv_reward_cache", "Reward cache lookups by result.", ["result"], registry=r)
        self.generator_latency = Histogram(
            "rlaifv_generator_request_duration_seconds",
            "Requests to the generator (RLAIFV_GENERATOR_URL), failed ones included.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generator_errors = Counter(
            "rlaifv_generator_errors",
            "Failed requests to the generator, by reason (unreachable, timeout, overloaded, server_error, "
            "bad_response, refused, rejected).",
            ["reason"],
            registry=r,
        )
        self.vllm_latency = Histogram(
            "rlaifv_vllm_request_duration_seconds",
            "Requests to the vLLM servers of the pair (RLAIFV_ENGINE=vllm), failed ones included, by server.",
            ["server"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.vllm_errors = Counter(
            "rlaifv_vllm_errors",
            "Failed requests to the vLLM servers, by server (policy, reference) and reason (unreachable, timeout, "
            "unavailable, refused, rejected, bad_response).",
            ["server", "reason"],
            registry=r,
        )
        self.jobs = Counter("rlaifv_jobs_items", "Batch-job items processed, by outcome.", ["outcome"], registry=r)
        self.jobs_backlog = Gauge(
            "rlaifv_jobs_backlog",
            "Batch-job items not yet done, queued or in hand (the job stream's length: a worker deletes an entry"
            " once its result is stored), read from Redis at each scrape; every replica and worker reports the"
            " same stream. What a worker pool scales on.",
            registry=r,
        )
        # Jobs, results, the cache and the rate limits live in Redis, whose maxmemory-policy is noeviction: a full
        # Redis refuses every write (job results are lost to retries) while the backlog makes KEDA add workers.
        self.redis_used_memory = Gauge(
            "rlaifv_redis_used_memory_bytes",
            "Memory Redis uses (INFO memory: used_memory), read at each scrape.",
            registry=r,
        )
        self.redis_maxmemory = Gauge(
            "rlaifv_redis_maxmemory_bytes",
            "Redis's maxmemory (INFO memory; 0: no limit), read at each scrape.",
            registry=r,
        )
        self.redis_up = Gauge(
            "rlaifv_redis_up",
            "1 when Redis answered this process's last look (a scrape, a readiness check), else 0.",
            registry=r,
        )
        self.jobs_store_full = Gauge(
            "rlaifv_jobs_store_full",
            "1 while Redis's used_memory is past RLAIFV_JOBS_ADMIT_MEMORY_FRACTION of its maxmemory: new jobs are"
            " refused (503 jobs_store_full); at maxmemory every write is, and job workers hold their results.",
            registry=r,
        )

    def observe_ranking(self, endpoint: str, rewards: list[float]) -> None:
        for value in rewards:
            self.reward.labels(api=endpoint).observe(value)
        if rewards:
            self.best_margin.labels(api=endpoint).observe(max(rewards) - sum(rewards) / len(rewards))
