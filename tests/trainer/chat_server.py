"""A real OpenAI-compatible chat server for the evaluation tests (judges, object extractors).

FastAPI under uvicorn on a free loopback port, in a thread. `reply(prompt)` decides each answer and
returns a `Reply`: text in a chat completion, an HTTP error, a body that is no chat completion, or a
hang (the handler waits on an event the server sets when it stops, so the client's deadline is what
ends the call). Every request is counted per prompt, and the most requests in flight at once are kept.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from rlaifv.testing.server import free_port


@dataclass
class Reply:
    text: str = ""
    status: int = 200
    raw: str | None = None  # a body that is not a chat completion
    hang: bool = False
    headers: dict[str, str] | None = None  # sent with an error or a raw body (Retry-After)


class ChatServer:
    def __init__(self, reply: Callable[[str], Reply], *, gate_at: int | None = None) -> None:
        self.reply = reply
        self.hits: Counter[str] = Counter()
        self.models: list[str] = []
        self.auth: list[str | None] = []
        self.queries: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = threading.Event()  # set on stop: hanging handlers return
        self._gate_at = gate_at
        self._gate: asyncio.Event | None = None
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            prompt = body["messages"][-1]["content"]
            self.hits[prompt] += 1
            self.models.append(body["model"])
            self.auth.append(request.headers.get("authorization"))
            self.queries.append(request.url.query)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if self._gate_at is not None:  # hold requests until `gate_at` are in flight together
                    self._gate = self._gate or asyncio.Event()
                    if self.in_flight >= self._gate_at:
                        self._gate.set()
                    await self._gate.wait()
                answer = self.reply(prompt)
                if answer.hang:
                    await asyncio.to_thread(self.release.wait)
                if answer.raw is not None:
                    return PlainTextResponse(answer.raw, status_code=answer.status, headers=answer.headers)
                if answer.status != 200:
                    return JSONResponse(
                        {"error": {"message": "unavailable"}}, status_code=answer.status, headers=answer.headers
                    )
                return {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": answer.text},
                            "finish_reason": "stop",
                        }
                    ],
                }
            finally:
                self.in_flight -= 1

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ChatServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:  # uvicorn's own start-up flag, polled
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the chat server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.should_exit = True
        self.thread.join(timeout=30)
