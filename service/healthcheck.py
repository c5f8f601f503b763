"""`python -m rlaifv.service.healthcheck`: the container images' HEALTHCHECK, for the API and the worker alike.

One image runs `rlaifv serve` (/healthz on RLAIFV_PORT) or `rlaifv worker` (/healthz on RLAIFV_WORKER_PORT). The
check reads which from the container's first process (/proc/1/cmdline) and asks that port only: with the host's
network (or a shared one) the other process's port may answer for it. When the command says neither (a wrapper
script), each port is asked in turn and the first that answers decides. Only the standard library is imported,
so a check costs milliseconds, not the seconds of importing torch. Ports given as CLI flags must come as the same
`RLAIFV_*` variables for the check to see them."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal

DEFAULTS = (("RLAIFV_PORT", 8000), ("RLAIFV_WORKER_PORT", 8001))  # as Settings.port and Settings.worker_port
CMDLINE = Path("/proc/1/cmdline")
Role = Literal["serve", "worker"]


def role(cmdline: Path = CMDLINE) -> Role | None:
    """What the container runs, from its first process's arguments (None: not ours to tell)."""
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return None
    for arg in args:
        if arg in (b"serve", b"worker"):
            return "serve" if arg == b"serve" else "worker"
    return None


def ports(which: Role | None = None) -> list[int]:
    """The ports to ask, in order; 0 (the worker serves no operations port) is none."""
    found = []
    for name, default in DEFAULTS:
        if which is not None and (name == "RLAIFV_WORKER_PORT") != (which == "worker"):
            continue
        port = int(os.environ.get(name, default))
        if port and port not in found:
            found.append(port)
    return found


def check(timeout_s: float = 2.0, cmdline: Path = CMDLINE) -> str | None:
    """None when the process answers /healthz with 200 (or is a worker without an operations port, which cannot
    be asked), else why not."""
    which = role(cmdline)
    asked = ports(which)
    if not asked and which == "worker":
        return None
    for port in asked:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout_s):
                return None
        except urllib.error.HTTPError as exc:
            return f"port {port}: /healthz HTTP {exc.code}"
        except OSError:
            continue
    return f"nothing answers /healthz on port(s) {', '.join(map(str, asked))}"


def main() -> int:
    problem = check()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
