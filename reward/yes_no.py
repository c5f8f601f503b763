"""The yes/no labeler of divide-and-conquer feedback.

As in RLAIF-V, a claim's question is put to a multimodal model and the answer
is read from the first generated step: p(yes) = (p("yes") + p("Yes")) over
(p(yes-forms) + p(no-forms)), softmax of the raw logits. The labeler may be the
policy itself (self-feedback) or any other loaded model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

from rlaifv.reward.families import truncate
from rlaifv.reward.logprobs import continuation_logits
from rlaifv.reward.prompt import EncodedPrompt, encode_prompt, without_markup

YES_FORMS = ("yes", "Yes", "YES")
NO_FORMS = ("no", "No", "NO")


class Labeler(Protocol):
    """Anything that answers yes/no questions about an image with a probability of yes."""

    def p_yes(self, image: Any, questions: Sequence[str]) -> list[float]:
        """`image` is one PIL image or a list of them (all shown with each question)."""
        ...


def first_token_ids(tokenizer: Any, forms: Sequence[str]) -> list[int]:
    """The first token ids of each form, with and without a leading space: the labeler's answer tokens (every
    engine reads p(yes) vs p(no) over the same ids). A token that is only whitespace (SentencePiece's bare "▁"
    before " yes") is skipped: it would count for yes and for no alike."""
    ids: set[int] = set()
    for form in forms:
        for text in (form, " " + form):
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            word = next((int(t) for t in tokens if tokenizer.decode([t]).strip()), None)
            if word is not None and word != tokenizer.unk_token_id:
                ids.add(word)
    return sorted(ids)


def split_shared_prefix(prompts: Sequence[EncodedPrompt], image_token_id: int | None) -> int:
    """Length of the token prefix all prompts share, capped so every prompt keeps >= 1 own token.

    Returns 0 when the shared part does not cover every image token (then the
    prompts cannot share one vision pass).
    """
    first = prompts[0].input_ids
    shared = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        same = (p.input_ids[:shared] == first[:shared]).long()
        shared = int(same.cumprod(0).sum())
    if image_token_id is not None:
        for p in prompts:
            positions = (p.input_ids == image_token_id).nonzero()
            if positions.numel() and int(positions.max()) >= shared:
                return 0
    return shared


class YesNoJudge:
    """Scores yes/no questions about an image with one shared image+template prefix pass."""

    def __init__(
        self, model: Any, processor: Any, *, max_batch: int = 64, lock: AbstractContextManager[Any] | None = None
    ) -> None:
        self.model = model
        self.processor = processor
        self.lock = lock or contextlib.nullcontext()  # a pair's own judge takes turns with the pair's other calls
        tokenizer = processor.tokenizer
        self.yes_ids = first_token_ids(tokenizer, YES_FORMS)
        self.no_ids = first_token_ids(tokenizer, NO_FORMS)
        if not self.yes_ids or not self.no_ids:
            raise ValueError("the labeler's tokenizer has no token for 'yes' or 'no'")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        config = getattr(model, "config", None)
        self.image_token_id = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
        self.max_batch = max_batch

    @torch.no_grad()
    def p_yes(self, image: Any, questions: Sequence[str]) -> list[float]:
        scores: list[float] = self.p_yes_batch([(image, list(questions))])[0]
        return scores

    @torch.no_grad()
    def p_yes_batch(self, items: Sequence[tuple[Any, Sequence[str]]]) -> list[list[float]]:
        """p(yes) for each question of each (image, questions) item."""
        with self.lock:
            return self._p_yes_batch(items)

    def _p_yes_batch(self, items: Sequence[tuple[Any, Sequence[str]]]) -> list[list[float]]:
        prefixes: list[EncodedPrompt] = []
        suffixes: list[list[list[int]]] = []
        for image, questions in items:
            images = list(image) if isinstance(image, list | tuple) else [image]
            prompts = [encode_prompt(self.processor, images, without_markup(self.processor, q)) for q in questions]
            if not prompts:
                prefixes.append(EncodedPrompt(torch.zeros(1, dtype=torch.long)))
                suffixes.append([])
                continue
            cut = split_shared_prefix(prompts, self.image_token_id)
            if cut > 0:
                prefixes.append(truncate(prompts[0], cut))
                suffixes.append([p.input_ids[cut:].tolist() for p in prompts])
            else:  # no shareable prefix: each question is its own prompt (the last token as continuation)
                for p in prompts:
                    prefixes.append(truncate(p, len(p) - 1))
                    suffixes.append([p.input_ids[-1:].tolist()])
        logits: list[torch.Tensor] = []
        for start in range(0, len(prefixes), self.max_batch):
            logits.extend(
                continuation_logits(
                    self.model,
                    prefixes[start : start + self.max_batch],
                    suffixes[start : start + self.max_batch],
                    self.pad_id,
                )
            )
        flat = [row for group in logits for row in group]
        results: list[list[float]] = []
        cursor = 0
        for _, questions in items:
            scores = []
            for _ in questions:
                probs = torch.softmax(flat[cursor], dim=-1)
                yes, no = float(probs[self.yes_ids].sum()), float(probs[self.no_ids].sum())
                scores.append(yes / (yes + no) if yes + no > 0 else 0.5)
                cursor += 1
            results.append(scores)
        return results
