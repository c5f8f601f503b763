"""An append-only JSONL file of results keyed by what they were computed from: what makes evals resumable.

Each line is `{"key": ..., ...}`; the last line of a key wins, and a line cut short by a crash is ignored
(that item is computed again). Callers make the key a hash of every input the result depends on (the
model, the prompt, the settings), so a changed input is a miss, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def digest(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (bytes are hashed first)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, bytes):
            part = hashlib.sha256(part).hexdigest()
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


class JsonlStore:
    """`store.get(key)`, `store.put(key, row)`; with `path=None` it only lives in memory.

    `reused` holds the keys whose row, read from the file (an earlier run's), `get` returned and no `put` has
    replaced since, so a command can say that results come from the store rather than from a new computation
    (a score that does not move after the judge was fixed)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.rows: dict[str, dict[str, Any]] = {}
        self.reused: set[str] = set()
        if self.path and self.path.is_file():
            text = self.path.read_text(encoding="utf-8", errors="replace")  # a garbled line is skipped, as a cut one
            if text and not text.endswith("\n"):
                with self.path.open("a") as f:
                    f.write("\n")  # close a line a crash cut short, so the next row starts on its own line
            for line in text.splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("key"), str):
                    self.rows[row["key"]] = row
        self._earlier = set(self.rows)

    def written_now(self, key: str) -> bool:
        """Whether this run computed the key's row (not read from an earlier run's file)."""
        return key in self.rows and key not in self._earlier

    def get(self, key: str) -> dict[str, Any] | None:
        if key in self._earlier:
            self.reused.add(key)
        return self.rows.get(key)

    def put(self, key: str, row: dict[str, Any]) -> None:
        row = {"key": key, **row}
        self.rows[key] = row
        self._earlier.discard(key)
        self.reused.discard(key)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
