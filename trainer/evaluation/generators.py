"""Where evaluation candidates come from: a bundle in this process, or a running `rlaifv serve`.

Both report, per candidate, the RLAIF-V implicit reward and (when asked) the claims reward, so one
sampling pass serves every selection rule. `BundleGenerator` drives a `ModelPair` directly (one
generation batch per call, each answer's length fitted to the model's positions); `ServiceGenerator` calls
`POST /v1/best-of-n` (n split into requests of at most the server's RLAIFV_MAX_N, several prompts in flight so
the server's micro-batching has work; `max_tokens=None` sends none: the server's default, fitted).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaifv.trainer.errors import DataError
from rlaifv.trainer.evaluation.candidates import Prompt, Sampled, Sampling, image_bytes, prompt_seed
from rlaifv.trainer.evaluation.images import describe_image
from rlaifv.trainer.evaluation.store import digest

if TYPE_CHECKING:
    from rlaifv.reward.model_pair import ModelPair


def bundle_fingerprint(folder: str | Path) -> str:
    """The manifest plus, per model file, its name, size and a hash of its first and last MiB.

    Cheap on a 7B bundle, and it changes whenever weights are rewritten (a retrained policy).
    """
    from rlaifv.reward.bundle import MANIFEST, resolve

    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    h = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode())
    for key in ("policy", "reference"):
        root = resolve(folder, manifest[key])
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            size = path.stat().st_size
            h.update(f"{key}/{path.relative_to(root)}:{size}".encode())
            with path.open("rb") as f:
                h.update(f.read(1 << 20))
                if size > 2 << 20:
                    f.seek(-(1 << 20), 2)
                    h.update(f.read())
    return "bundle:" + h.hexdigest()[:24]


class BundleGenerator:
    """Samples with a `ModelPair` in process; the 'claims' reward is computed in the same batch."""

    def __init__(self, pair: ModelPair, fingerprint: str) -> None:
        self.pair = pair
        self.fingerprint = fingerprint

    @classmethod
    def load(cls, bundle: str | Path) -> BundleGenerator:
        from rlaifv.reward import load_bundle

        return cls(load_bundle(bundle), bundle_fingerprint(bundle))

    def sample(self, prompts: Sequence[Prompt], n: int, sampling: Sampling, claims: bool) -> list[Sampled]:
        from rlaifv.reward.model_pair import GenerateTask
        from rlaifv.reward.sampling import SamplingParams

        reward = self.pair.reward.model_copy(update={"mode": "claims"}) if claims else self.pair.reward
        tasks = []
        for p in prompts:
            images = self._images(p)
            encoded = self.pair.encode(images, p.question)
            params = SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=self._fitted(sampling.max_tokens, len(encoded), p.id),
                seed=prompt_seed(sampling.seed, p.id),
            )
            tasks.append(GenerateTask(encoded, n, params, reward, images))
        out = []
        for ranking in self.pair.generate_batch(tasks):
            c = ranking.candidates
            out.append(
                Sampled(
                    texts=[x.text for x in c],
                    dpo=[x.implicit_reward for x in c],
                    claims=[x.reward for x in c] if claims else None,
                )
            )
        return out

    def _images(self, prompt: Prompt) -> list[Any]:
        """The prompt's image decoded, or an error naming the prompt and its image: the readers check images, but a
        file can change after it was read (the error named neither, after earlier batches were sampled)."""
        from rlaifv.reward.errors import ImageError

        try:
            return self.pair.load_images([prompt.image])
        except ImageError as exc:
            raise DataError(f"prompt {prompt.id} (image {describe_image(prompt.image)}): {exc.message}") from None

    def _fitted(self, max_tokens: int | None, prompt_tokens: int, prompt_id: str) -> int:
        """`max_tokens` (None: all the room left) cut to what the prompt leaves of the model's positions, as
        `rlaifv serve` fits its default: sampling went on past them (512 tokens on the shipped 256-position
        model), where the model was never trained."""
        limit = self.pair.max_positions
        if limit is None:
            if max_tokens is None:
                raise DataError("max_tokens=None needs a model whose positions are known: give max_tokens")
            return max_tokens
        if prompt_tokens >= limit:
            raise DataError(
                f"prompt {prompt_id} ({prompt_tokens} tokens) leaves no room for an answer in the model's"
                f" {limit} positions"
            )
        return min(max_tokens or limit, limit - prompt_tokens)


class ServiceGenerator:
    """Samples through a running service's `POST /v1/best-of-n` (implicit and claims rewards in one call).

    The fingerprint is the served model's name and reward settings (`GET /v1/models`): use another cache
    file when the service starts serving another bundle under the same name.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        max_n: int = 16,
        concurrency: int = 4,
        retries: int = 3,
    ) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.max_n = max_n
        self.concurrency = concurrency
        self.retries = retries
        cards = [{k: v for k, v in card.items() if k != "created"} for card in self._call("GET", "/v1/models")["data"]]
        self.model = cards[0]["id"] if cards else None
        self.fingerprint = "service:" + digest(cards)[:24]

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import httpx

        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2**attempt, 30))
            try:
                response = self.http.request(method, path, json=body)
            except httpx.TransportError as exc:
                error = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 200:
                return response.json()
            error = f"HTTP {response.status_code}: {response.text[:300]}"
            if response.status_code not in (429, 503):
                break
        raise DataError(f"service {path} failed: {error}")

    def _one(self, prompt: Prompt, n: int, sampling: Sampling, claims: bool) -> Sampled:
        """One prompt's candidates; a failure names the prompt and its image (a 400 for an image the service
        refuses named neither, among hundreds of prompts)."""
        try:
            return self._sampled(prompt, n, sampling, claims)
        except (DataError, OSError) as exc:
            raise DataError(f"prompt {prompt.id} (image {describe_image(prompt.image)}): {exc}") from None

    def _sampled(self, prompt: Prompt, n: int, sampling: Sampling, claims: bool) -> Sampled:
        image = "data:image/png;base64," + base64.b64encode(image_bytes(prompt.image)).decode()
        texts: list[str] = []
        dpo: list[float] = []
        reward: list[float] = []
        for part, start in enumerate(range(0, n, self.max_n)):
            options = {
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "max_tokens": sampling.max_tokens,
                "seed": prompt_seed(sampling.seed, f"{prompt.id}#{part}" if part else prompt.id),
            }
            body = {
                "images": [image],
                "question": prompt.question,
                "n": min(self.max_n, n - start),
                "sampling": {key: value for key, value in options.items() if value is not None},
                "reward": {"mode": "claims" if claims else "dpo"},
            }
            reply = self._call("POST", "/v1/best-of-n", body)
            for c in sorted(reply["candidates"], key=lambda x: x["index"]):
                texts.append(c["text"])
                dpo.append(c["implicit_reward"])
                reward.append(c["reward"])
        return Sampled(texts=texts, dpo=dpo, claims=reward if claims else None)

    def sample(self, prompts: Sequence[Prompt], n: int, sampling: Sampling, claims: bool) -> list[Sampled]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda p: self._one(p, n, sampling, claims), prompts))
