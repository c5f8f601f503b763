"""Objects an answer mentions, listed by an LLM at an OpenAI-compatible URL (as RLAIF-V does with gpt-3.5).

The LLM gets the question and the answer and replies with a JSON list of object names; the names are
mapped onto COCO categories by the same synonym table as the rule extractor (`CocoObjects.listed`).
As in the original, answers of three words or fewer yield no objects without a call. Replies are kept in a
JSONL store keyed by (model, prompt), so a rerun asks only about answers it has not seen; an answer whose
extraction keeps failing is recorded as failed (and left out of CHAIR by the caller, which reports it).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from rlaifv.trainer.evaluation.coco_objects import CocoObjects
from rlaifv.trainer.evaluation.llm import ChatClient, ChatSettings, Sleep
from rlaifv.trainer.evaluation.store import JsonlStore, digest

SHORT_ANSWER_WORDS = 3  # answers of this many words or fewer name no objects (the original's rule)

EXTRACT_PROMPT = """Below is a question about an image and an answer someone gave. Take the answer as true and list
the objects it says are visible in the image.

Question: {question}

Answer: {answer}

Rules:
1. List only objects the answer explicitly mentions as present.
2. Give object names only: no colours, materials, sizes, counts or other attributes.
3. Reply with a JSON list of strings, e.g. ["dog", "frisbee"], or [] when there are none."""

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def parse_object_list(text: str) -> list[str] | None:
    """The JSON list of strings in a reply (a fenced block, the whole text, a line, or the first [...] span)."""
    chunks = [m.group(1) for m in _FENCE.finditer(text)]
    chunks += [text, *reversed(text.splitlines())]
    if "[" in text and "]" in text:
        chunks.append(text[text.index("[") : text.rindex("]") + 1])
    for chunk in chunks:
        try:
            value = json.loads(chunk.strip())
        except json.JSONDecodeError:
            continue
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    return None


class Extraction(BaseModel):
    status: Literal["listed", "short", "failed"]
    listed: list[str] = Field(default_factory=list, description="The names the LLM listed.")
    mentions: list[str] = Field(default_factory=list, description="Their COCO categories.")
    replies: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)


class LLMObjectExtractor:
    """`extract(questions, answers)` -> one `Extraction` per answer, in order."""

    def __init__(
        self,
        settings: ChatSettings,
        objects: CocoObjects | None = None,
        *,
        store: str | Path | None = None,
        sleep: Sleep = asyncio.sleep,
        progress: bool = True,
    ) -> None:
        self.settings = settings
        self.objects = objects or CocoObjects()
        self.store = JsonlStore(store)
        self._sleep = sleep
        self.progress = progress

    def extract(self, questions: Sequence[str], answers: Sequence[str]) -> list[Extraction]:
        return asyncio.run(self._extract(questions, answers))

    async def _extract(self, questions: Sequence[str], answers: Sequence[str]) -> list[Extraction]:
        out: list[Extraction | None] = [None] * len(answers)
        todo: list[tuple[int, str, str]] = []
        for i, (question, answer) in enumerate(zip(questions, answers, strict=True)):
            if len(answer.split()) <= SHORT_ANSWER_WORDS:  # as the original: no call, no objects
                out[i] = Extraction(status="short")
                continue
            prompt = EXTRACT_PROMPT.format(question=question, answer=answer)
            key = digest("objects", self.settings.model, prompt)
            cached = self.store.get(key)
            if cached is not None and cached["status"] == "listed":
                listed = cached["listed"]
                out[i] = Extraction(status="listed", listed=listed, mentions=self.objects.listed(listed))
            else:
                todo.append((i, key, prompt))
        bar = tqdm(total=len(todo), desc="listing objects", disable=not self.progress or not todo)
        async with ChatClient(self.settings, sleep=self._sleep) as chat:

            async def one(i: int, key: str, prompt: str) -> None:
                result = await chat.complete(
                    [{"role": "user", "content": prompt}], accept=lambda t: parse_object_list(t) is not None
                )
                listed = parse_object_list(result.content or "") if result.ok else None
                extraction = Extraction(
                    status="listed" if listed is not None else "failed",
                    listed=listed or [],
                    mentions=self.objects.listed(listed or []),
                    replies=result.replies,
                    errors=result.errors,
                )
                out[i] = extraction
                self.store.put(key, extraction.model_dump(exclude={"mentions"}))
                bar.update(1)

            await asyncio.gather(*(one(*job) for job in todo))
        bar.close()
        return [e for e in out if e is not None]
