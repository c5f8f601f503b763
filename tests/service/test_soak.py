"""A short `rlaifv bench soak`: ~12 s of mixed best-of-n / rewards / chat / jobs load on the shipped bundle."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
RSS_GROWTH_BOUND_MB = 64  # after warm-up; the 2-minute run in docs/soak.md grew by a few MiB


def test_short_soak_has_no_server_errors_and_flat_memory() -> None:
    from rlaifv.bench.soak import report, run_soak

    result = run_soak(duration_s=12, max_requests=5_000, concurrency=4)
    print(report(result))
    assert result.requests > 50
    assert not any(code.startswith("5") for code in result.errors), result.errors
    assert result.server_errors == 0, result.errors
    if result.jobs_enabled:
        assert result.counts.get("job", 0) > 0
    assert result.rss_mb["end"] - result.rss_mb["after_warmup"] < RSS_GROWTH_BOUND_MB, result.rss_mb
