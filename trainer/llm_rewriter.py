"""Claim splitting and question writing by an instruction-following LLM (RLAIF-V uses fine-tuned Llama-3-8B).

Both classes implement the protocols of `reward.claims` (`ClaimSplitter`,
`QuestionWriter`), so they drop into `verify_answers` in place of the spaCy
rules. The text generator behind them is pluggable:

- `LocalChatBackend(model_folder)`: any causal LM with a chat template we can
  load from a local folder (greedy decoding);
- `OpenAIChatBackend(base_url, model)`: any OpenAI-compatible server (vLLM,
  llama.cpp, ...) through `POST {base_url}/chat/completions`, via httpx.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

from rlaifv.reward.claims import YES_NO_SUFFIX
from rlaifv.trainer.errors import ConfigError, TrainerError

SPLIT_INSTRUCTION = (
    "Split the answer below into short, self-contained factual claims about the image, one per line. "
    "Resolve pronouns, keep negations, leave out opinions and filler. Output only the claims.\n\nAnswer: {answer}"
)
QUESTION_INSTRUCTION = (
    "Rewrite the claim below as a general yes/no question whose answer is 'yes' exactly when the claim is true. "
    "Keep negations. Output only the question.\n\nClaim: {claim}"
)
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")


class ChatBackend(Protocol):
    def complete(self, prompt: str) -> str:
        """One user message in, the assistant's text out."""
        ...


class OpenAIChatBackend:
    """An OpenAI-compatible chat completions endpoint (temperature 0)."""

    def __init__(
        self,
        base_url: str,
        model: str = "default",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_tokens: int = 512,
    ):
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_tokens = max_tokens
        key = api_key if api_key is not None else os.environ.get("RLAIFV_LLM_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)

    def complete(self, prompt: str) -> str:
        import httpx

        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
        }
        try:
            response = self.client.post(self.url, json=body)
            response.raise_for_status()
            return str(response.json()["choices"][0]["message"]["content"] or "")
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise TrainerError(f"LLM request to {self.url} failed: {exc}") from exc


class LocalChatBackend:
    """A local causal LM with a chat template, greedy decoding."""

    def __init__(self, folder: str | Path, *, max_new_tokens: int = 256, device: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rlaifv.reward.models import check_model_folder, pick_device

        check_model_folder(Path(folder), what="LLM")
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True).to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    def complete(self, prompt: str) -> str:
        import torch

        messages = [{"role": "user", "content": prompt}]
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = {k: v.to(self.device) for k, v in ids.items()}
        with torch.no_grad():
            out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def make_backend(*, model: str | None = None, url: str | None = None, name: str = "default") -> ChatBackend:
    if (model is None) == (url is None):
        raise ConfigError("give exactly one of an LLM model folder or an OpenAI-compatible URL")
    if url is not None:
        return OpenAIChatBackend(url, name)
    return LocalChatBackend(model)  # type: ignore[arg-type]


class LLMClaimSplitter:
    """Claims = the non-empty lines of the LLM's reply (bullets/numbers stripped)."""

    def __init__(self, backend: ChatBackend, instruction: str = SPLIT_INSTRUCTION) -> None:
        self.backend = backend
        self.instruction = instruction

    def split(self, answer: str) -> list[str]:
        reply = self.backend.complete(self.instruction.format(answer=answer.strip()))
        claims = []
        for line in reply.splitlines():
            claim = _BULLET.sub("", line).strip()
            if claim:
                claims.append(claim if claim.endswith((".", "!", "?")) else claim + ".")
        return claims


class LLMQuestionWriter:
    """Question = the first line of the LLM's reply ending in '?', suffixed with "Please answer yes or no."."""

    def __init__(
        self, backend: ChatBackend, instruction: str = QUESTION_INSTRUCTION, suffix: str = YES_NO_SUFFIX
    ) -> None:
        self.backend = backend
        self.instruction = instruction
        self.suffix = suffix

    def question(self, claim: str) -> str:
        reply = self.backend.complete(self.instruction.format(claim=claim.strip()))
        lines = [_BULLET.sub("", line).strip() for line in reply.splitlines() if line.strip()]
        if not lines:
            raise TrainerError(f"the LLM returned no question for claim {claim!r}")
        question = next((line for line in lines if line.endswith("?")), lines[0])
        if not question.endswith("?"):
            question = question.rstrip(".!") + "?"
        return f"{question} {self.suffix}".strip() if self.suffix and self.suffix not in question else question
