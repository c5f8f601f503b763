"""The reference's pass over sampled answers, run beside the sampling instead of after it.

Best-of-N's reward needs the reference's log-probs of every sampled token. Computed after sampling, that is
two compute-bound passes (the prompt's prefill and the answers) the request waits for: on a CPU whose matrix
units are modest against its memory bandwidth, a quarter of a best-of-8 request (docs/performance.md). Yet the
prefill needs no answer, and an answer's first k tokens are final once the policy has sampled them. So with
two cores or more, a second thread of the same process runs the reference while the policy samples:

    sampler thread    [policy prefill][decode step 0 .. step t .......... step T-1]
    reference thread  [reference prefill]  [tokens 0..15]  [16..31]  ...          [rest]
                                          ^ published every `chunk` columns        ^ after sampling

and the request waits only for the last chunk. Chunks start at column 0 and are `chunk` columns wide
whatever the sampler's pace (a late stream runs two chunks, never one wider one), so a run's numbers do
not depend on thread timing. Each model runs on its own share of the torch threads
(`torch.set_num_threads` is per thread). The two models must be separate modules: a LoRA pair's reference is
its policy with the adapter switched off, which the sampler is using, so a LoRA pair scores after sampling.

The sampler's token buffer is shared, not copied: it writes column t at step t and never again, and the stream
reads only columns the sampler has published as final. Tokens of a finished row past its end are padding that
the attention mask hides, as in `answer_logprobs`; the numbers equal that one-pass computation up to float
summation order (chunked forwards).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from rlaifv.reward.logprobs import attending, fork, prefill, selective_log_softmax
from rlaifv.reward.prompt import EncodedPrompt


class ReferenceStream:
    """Scores sampled rows under `model` on a thread of its own while the sampler publishes their tokens.

    Rows are the sampler's: prompt b's `counts[b]` answers in order, prompts in order. `width` is the most
    tokens a row can have (the sampler's buffer width).
    """

    def __init__(
        self,
        model: Any,
        prompts: Sequence[EncodedPrompt],
        counts: Sequence[int],
        *,
        width: int,
        pad_id: int,
        threads: int,
        chunk: int = 16,
    ) -> None:
        if chunk < 1 or threads < 1 or width < 1:
            raise ValueError("chunk, threads and width must be >= 1")
        self.chunk = chunk
        self._model = model
        self._prompts = list(prompts)
        self._counts = list(counts)
        self._width = width
        self._pad_id = pad_id
        self._threads = threads
        self._cond = threading.Condition()
        self._tokens: torch.Tensor | None = None  # the sampler's (rows, width) buffer
        self._lengths: torch.Tensor | None = None  # a copy of the rows' lengths when `_ready` was published
        self._ready = 0  # columns < _ready of `_tokens` are final
        self._final: list[list[int]] | None = None
        self._closed = False
        self._error: BaseException | None = None
        self._result: list[torch.Tensor] = []
        self._published = 0
        self._thread = threading.Thread(target=self._run, name="rlaifv-reference-stream", daemon=True)
        self._thread.start()

    # -- the sampler's side -----------------------------------------------------------------

    def publish(self, tokens: torch.Tensor, lengths: torch.Tensor, ready: int) -> None:
        """Columns < `ready` of `tokens` are final. Cheap unless a new chunk is due (then one small copy)."""
        if ready - self._published < self.chunk:
            return
        self._published = ready
        with self._cond:
            self._tokens, self._lengths, self._ready = tokens, lengths.clone(), ready
            self._cond.notify()

    def finish(self, token_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The rows' final tokens (in row order) -> each row's per-token reference log-probs, (len,) float32."""
        with self._cond:
            self._final = [list(ids) for ids in token_ids]
            self._cond.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result

    def close(self) -> None:
        """Stop without a result (the sampler failed); safe to call at any time."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # -- the stream's thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            torch.set_num_threads(self._threads)
            with torch.inference_mode():
                self._score()
        except BaseException as error:  # re-raised in the sampler's thread by `finish`
            self._error = error

    def _wait(self, fed: int) -> tuple[torch.Tensor, torch.Tensor, int, bool] | None:
        """Block until a chunk beyond `fed` is published or sampling ended: (tokens, lengths, ready, final);
        None once closed."""
        with self._cond:
            while not self._closed and self._final is None and self._ready - 1 - fed < self.chunk:
                self._cond.wait()
            if self._closed:
                return None
            if self._final is not None:
                lengths = torch.tensor([len(ids) for ids in self._final])
                tokens = torch.full((len(self._final), max(int(lengths.max()), 1)), self._pad_id, dtype=torch.long)
                for row, ids in enumerate(self._final):
                    tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                return tokens, lengths, int(lengths.max()), True
            assert self._tokens is not None and self._lengths is not None
            return self._tokens, self._lengths, self._ready, False

    def _score(self) -> None:
        model = self._model
        device = next(model.parameters()).device
        state = prefill(model, self._prompts, self._pad_id)
        rows = torch.repeat_interleave(
            torch.arange(len(self._prompts), device=device), torch.tensor(self._counts, device=device)
        )
        state = fork(model, state, rows, self._width)
        logprobs = torch.zeros((rows.shape[0], self._width), dtype=torch.float32, device=device)
        fed = 0  # columns fed to the model; column 0's log-prob comes from the prefill's logits
        scored_first = False
        with attending(model, state):
            while True:
                published = self._wait(fed)
                if published is None:
                    return
                tokens, lengths, ready, final = published
                tokens, lengths = tokens.to(device), lengths.to(device)
                if ready == 0:
                    break
                if not scored_first:
                    logprobs[:, 0] = selective_log_softmax(state.logits, tokens[:, 0])
                    scored_first = True
                # Feed columns [fed, end) in chunks of `chunk` starting at 0 whatever the sampler's pace, so the
                # forwards (and their float sums) are the same on every run: their logits predict fed+1 .. end.
                limit = ready - 1
                while fed < limit and (final or limit - fed >= self.chunk):
                    end = min(fed + self.chunk, limit)
                    span = end - fed
                    columns = torch.arange(fed, end, device=device)
                    mask = (columns[None, :] < lengths[:, None]).to(state.mask.dtype)
                    state.mask = torch.cat([state.mask, mask], dim=1)
                    out = model(
                        input_ids=tokens[:, fed:end],
                        attention_mask=state.mask,
                        position_ids=state.positions(span),
                        past_key_values=state.cache,
                        use_cache=True,
                    )
                    state.next_position = state.next_position + span
                    state.cache = out.past_key_values
                    logprobs[:, fed + 1 : end + 1] = selective_log_softmax(out.logits, tokens[:, fed + 1 : end + 1])
                    fed = end
                if final:
                    break
        assert self._final is not None
        self._result = [logprobs[row, : len(ids)].cpu() for row, ids in enumerate(self._final)]
