"""`python -m rlaifv.service.healthcheck`: the container images' HEALTHCHECK, for the API and the worker alike.

One image runs `rlaifv serve` (/healthz on RLAIFV_PORT) or `rlaifv worker` (/healthz on RLAIFV_WORKER_PORT): the
check asks each port in turn, and the first that answers decides; a refused connection means the process is the
other one (or not up yet: the image's start period covers loading). Only the standard library is imported, so
a check costs milliseconds, not the seconds of importing torch. Ports given as CLI flags must come as the same
`RLAIFV_*` variables for the check to see them."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULTS = (("RLAIFV_PORT", 8000), ("RLAIFV_WORKER_PORT", 8001))  # as Settings.port and Settings.worker_port


def ports() -> list[int]:
    found = []
    for name, default in DEFAULTS:
        port = int(os.environ.get(name, default))
        if port and port not in found:  # 0: the worker serves no operations port
            found.append(port)
    return found


def check(timeout_s: float = 2.0) -> str | None:
    """None when the process answers /healthz with 200, else why not."""
    for port in ports():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout_s):
                return None
        except urllib.error.HTTPError as exc:
            return f"port {port}: /healthz HTTP {exc.code}"
        except OSError:
            continue
    return f"nothing answers /healthz on port(s) {', '.join(map(str, ports()))}"


def main() -> int:
    problem = check()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
