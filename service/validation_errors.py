"""Pydantic's validation errors as the problems a client can act on: each named by the request's own field path.

Pydantic's `loc` is a path through the *schema*: besides field names and list indices it holds the labels of
union members (`str`, `list[tagged-union[TextPart,ImagePart]]`) and the tags of discriminated unions, and a
union reports one error per member. Sent as they are, `{"content": [{"type": "image_url", "image_url":
{"url": 5}}]}` would be blamed on `messages[0].content.str` ("should be a valid string"). Here each `loc` is
walked through the request body itself: what the body does not have is a schema label and is dropped (so the
path is `messages[0].content[0].image_url.url`), and of a union's members the ones the input was not even of
the type of are dropped when another member got further; when none did they become one problem ("a valid
string or a valid list").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

MAX_LISTED_PROBLEMS = 50  # a 10,000-item job of typos answers with a bounded body

_LOCATIONS = ("body", "query", "path", "header")
_CODES = {"json_invalid": "invalid_json", "extra_forbidden": "unknown_field", "missing": "missing_field"}
_NO_INPUT = object()
_MAX_WALK = 16  # every reading of a loc is tried (2^len); the request schemas nest far less deep


class FieldProblem(BaseModel):
    """One of several problems of a rejected request."""

    message: str = Field(description="Human-readable explanation of this problem.")
    param: str | None = Field(None, description="Dotted path of the field it is about.")
    code: str | None = Field(None, description="Machine-readable code, as in the envelope.")


def field_problems(errors: Sequence[Any], data: Any = _NO_INPUT, prefix: str = "") -> list[FieldProblem]:
    """The problems of `errors` (pydantic's `.errors()`), in pydantic's order.

    `data` is the validated input (for FastAPI's body errors, the parsed body): field paths are walked through
    it. `prefix` places the problems inside a bigger body (a job's `items[3].body`).
    """
    found: list[tuple[tuple[Any, ...], int | None, dict[str, Any]]] = []  # (path, union position, error)
    for err in errors:
        loc = tuple(err.get("loc", ()))
        source = data
        if loc and loc[0] in _LOCATIONS:
            if loc[0] != "body":
                source = _NO_INPUT
            loc = loc[1:]
        if err.get("type") == "json_invalid":
            found.append(((), None, err))
            continue
        path, union = _walk(loc, source, keep_last=err.get("type") == "missing")
        found.append((path, union, err))
    return _merge_unions(found, prefix)


def summary(problems: Sequence[FieldProblem]) -> str:
    """The envelope's message: the first problem, and how many more `errors` lists."""
    more = len(problems) - 1
    return problems[0].message + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def _walk(loc: tuple[Any, ...], data: Any, *, keep_last: bool) -> tuple[tuple[Any, ...], int | None]:
    """The part of `loc` the input has (and where the first schema label was dropped); the whole `loc` when
    there is no input to walk. A missing field's own name is kept although the input lacks it.

    A tag may equal a field's name (`{"type": "text", "text": 3}` fails at loc (text, text)), so every reading
    is tried: the most elements kept wins, then the reading that keeps the later ones (labels wrap fields).
    """
    if data is _NO_INPUT or len(loc) > _MAX_WALK:
        return loc, None
    kept = _best(loc, 0, data, keep_last)
    dropped = next((i for i in range(len(loc)) if i not in kept), None)
    union = None if dropped is None else sum(1 for i in kept if i < dropped)
    return tuple(loc[i] for i in kept), union


def _best(loc: tuple[Any, ...], start: int, current: Any, keep_last: bool) -> tuple[int, ...]:
    """Indices of `loc[start:]` kept by the best reading from `current` (see `_walk`)."""
    if start == len(loc):
        return ()
    part = loc[start]
    if keep_last and start == len(loc) - 1:
        return (start,)
    options = [_best(loc, start + 1, current, keep_last)]  # `part` is a schema label
    if _has(current, part):
        options.append((start, *_best(loc, start + 1, current[part], keep_last)))
    return max(options, key=lambda kept: (len(kept), kept[::-1]))


def _has(container: Any, part: Any) -> bool:
    if isinstance(container, dict):
        return isinstance(part, str) and part in container
    return isinstance(container, list) and isinstance(part, int) and -len(container) <= part < len(container)


def _is_type_mismatch(err: dict[str, Any]) -> bool:
    kind = str(err.get("type", ""))
    return kind.endswith("_type") or kind in ("model_attributes_type", "is_instance_of")


def _merge_unions(found: list[tuple[tuple[Any, ...], int | None, dict[str, Any]]], prefix: str) -> list[FieldProblem]:
    """Per union position: drop the members the input was not of when another got further, else merge them."""
    problems: list[FieldProblem] = []
    merged: dict[tuple[Any, ...], int] = {}  # union path -> index in problems of its merged type mismatch
    deeper = {path[:union] for path, union, err in found if union is not None and not _shallow(path, union, err)}
    for path, union, err in found:
        if union is not None and _shallow(path, union, err):
            key = path[:union]
            if key in deeper:
                continue
            if key in merged:
                problems[merged[key]] = _joined(problems[merged[key]], err)
                continue
            merged[key] = len(problems)
        problems.append(_problem(path, err, prefix))
    return problems


def _shallow(path: tuple[Any, ...], union: int, err: dict[str, Any]) -> bool:
    """A union member's error at the union itself: the input was not of that member's type."""
    return len(path) == union and _is_type_mismatch(err)


def _joined(problem: FieldProblem, err: dict[str, Any]) -> FieldProblem:
    lead = "Input should be "
    text = str(err.get("msg", ""))
    addition = text[len(lead) :] if text.startswith(lead) else text
    return problem.model_copy(update={"message": f"{problem.message} or {addition}"})


def _problem(path: tuple[Any, ...], err: dict[str, Any], prefix: str) -> FieldProblem:
    kind = err.get("type", "")
    param = _dotted(path, prefix)
    if kind == "json_invalid":
        message = f"request body is not valid JSON: {err.get('ctx', {}).get('error', 'parse error')}"
    elif kind == "extra_forbidden":
        message = f"unknown field '{param or '?'}'"
    elif kind == "missing":
        message = f"field '{param or '?'}' is required"
    else:
        text = str(err.get("msg", "invalid value"))
        message = f"{param}: {text}" if param else text
    return FieldProblem(message=message, param=param, code=_CODES.get(kind, "invalid_value"))


def _dotted(path: tuple[Any, ...], prefix: str) -> str | None:
    """`messages[0].content[1].image_url` from the walked path; `prefix` goes in front."""
    out = prefix
    for part in (str(p) for p in path):
        out += f"[{part}]" if part.isdigit() else f".{part}" if out else part
    return out or None
