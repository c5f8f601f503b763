"""Pydantic's validation errors as the problems a client can act on: each named by the request's own field path.

Pydantic's `loc` is a path through the *schema*: besides field names and list indices it holds the labels of
union members (`str`, `list[tagged-union[TextPart,ImagePart]]`) and the tags of discriminated unions, and a
union reports one error per member. Sent as they are, `{"content": [{"type": "image_url", "image_url":
{"url": 5}}]}` would be blamed on `messages[0].content.str` ("should be a valid string"). Here each `loc` is
walked through the request body itself: a tag is the value of the object's discriminator (`type`), anything
else the body does not have is a schema label, and both are dropped (the path is
`messages[0].content[0].image_url.url`); of a union's members, the ones the input was not even of the type of
are dropped when another member got further, and merged into one problem ("a valid string or a valid list")
when none did. At most `MAX_LISTED_PROBLEMS` are built, however many errors a huge body has.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

MAX_LISTED_PROBLEMS = 50  # a 10,000-item job of typos answers with a bounded body
TAG_KEYS = ("type",)  # the discriminators of the API's tagged unions (OpenAI's convention; a test checks ours)
_WINDOW = 4 * MAX_LISTED_PROBLEMS  # errors looked at: a union's members come out next to each other
_PARAM_CHARS = 200  # a path echoes the client's keys: bounded like the messages

_LOCATIONS = ("body", "query", "path", "header")
_CODES = {"json_invalid": "invalid_json", "extra_forbidden": "unknown_field", "missing": "missing_field"}
_NOT_AN_OBJECT = ("model_attributes_type", "model_type", "dict_type")
_NO_INPUT = object()

Walked = tuple[tuple[Any, ...], int | None, Mapping[str, Any]]  # (path, where a union label was dropped, error)


class FieldProblem(BaseModel):
    """One of several problems of a rejected request."""

    message: str = Field(description="Human-readable explanation of this problem.")
    param: str | None = Field(None, description="Dotted path of the field it is about.")
    code: str | None = Field(None, description="Machine-readable code, as in the envelope.")


@dataclass(frozen=True)
class Problems:
    """The first problems of a request (at most `MAX_LISTED_PROBLEMS`) and how many errors were not looked at."""

    listed: list[FieldProblem]
    unlisted: int = 0

    def __add__(self, other: Problems) -> Problems:
        room = MAX_LISTED_PROBLEMS - len(self.listed)
        extra = other.listed[:room]
        return Problems(self.listed + extra, self.unlisted + other.unlisted + len(other.listed) - len(extra))

    @property
    def full(self) -> bool:
        return len(self.listed) >= MAX_LISTED_PROBLEMS

    @property
    def message(self) -> str:
        """The envelope's message: the first problem, and how many more there are."""
        if not self.listed:
            return "invalid request"
        more = len(self.listed) - 1 + self.unlisted
        if not more:
            return self.listed[0].message
        listed = f"; the first {len(self.listed)} are listed" if self.unlisted else ""
        return f"{self.listed[0].message} (and {more} more problem{'s' if more > 1 else ''}{listed})"


def field_problems(
    errors: Sequence[Mapping[str, Any]],
    data: Any = _NO_INPUT,
    prefix: str = "",
    *,
    http: bool = False,
    tags: Collection[str] = TAG_KEYS,
) -> Problems:
    """The problems of pydantic's `errors`, in pydantic's order.

    `data` is the validated input: field paths are walked through it. `prefix` places the problems inside a bigger
    body (a job's `items[3].body`). `http`: the errors are FastAPI's, whose loc starts with the request part
    (`body`, `query`, ...); only `body` errors are walked through `data`.
    """
    window = errors[:_WINDOW]
    found: list[Walked] = []
    for err in window:
        loc = tuple(err.get("loc") or ())
        source = data
        if http and loc and loc[0] in _LOCATIONS:
            source = data if loc[0] == "body" else _NO_INPUT
            if loc[0] == "header":  # ASGI lower-cases header names: named as the docs and clients write them
                loc = tuple("-".join(w.capitalize() for w in str(k).split("-")) for k in loc[1:2]) + loc[2:]
            else:
                loc = loc[1:]
        if err.get("type") == "json_invalid":
            found.append(((), None, err))
            continue
        ctx = err.get("ctx")
        if isinstance(ctx, Mapping) and isinstance(ctx.get("path"), list):  # a validator's path inside its field
            loc += tuple(ctx["path"])
        path, union = _walk(loc, source, keep_last=err.get("type") == "missing", tags=tags)
        found.append((path, union, err))
    problems = _merge_unions(found, prefix)
    unlisted = max(0, len(problems) - MAX_LISTED_PROBLEMS) + len(errors) - len(window)
    return Problems(problems[:MAX_LISTED_PROBLEMS], unlisted)


def _walk(
    loc: tuple[Any, ...], data: Any, *, keep_last: bool, tags: Collection[str]
) -> tuple[tuple[Any, ...], int | None]:
    """The part of `loc` the input has, and where the first schema label was dropped; the whole `loc` when there
    is no input. A missing field's own name is kept although the input lacks it. A tag comes first in the object
    it selects a member for, and may equal a field's name (`{"type": "text", "text": 3}` fails at (text, text)),
    so it is recognised by value before it is tried as a key."""
    if data is _NO_INPUT:
        return loc, None
    path: list[Any] = []
    union: int | None = None
    current, entered = data, True
    for i, part in enumerate(loc):
        tag = entered and isinstance(current, dict) and any(current.get(key) == part for key in tags)
        entered = False
        if not tag and _has(current, part):
            current, entered = current[part], True
        elif keep_last and i == len(loc) - 1:
            pass
        else:
            union = len(path) if union is None else union
            continue
        path.append(part)
    return tuple(path), union


def _has(container: Any, part: Any) -> bool:
    if isinstance(container, dict):
        return isinstance(part, str) and part in container
    return isinstance(container, list) and isinstance(part, int) and -len(container) <= part < len(container)


def _merge_unions(found: list[Walked], prefix: str) -> list[FieldProblem]:
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


def _shallow(path: tuple[Any, ...], union: int, err: Mapping[str, Any]) -> bool:
    """A union member's error at the union itself: the input was not of that member's type."""
    kind = str(err.get("type", ""))
    return len(path) == union and (kind.endswith("_type") or kind == "is_instance_of")


def _joined(problem: FieldProblem, err: Mapping[str, Any]) -> FieldProblem:
    lead = "Input should be "
    text = str(err.get("msg", ""))
    addition = text[len(lead) :] if text.startswith(lead) else text
    return problem.model_copy(update={"message": f"{problem.message} or {addition}"})


def _problem(path: tuple[Any, ...], err: Mapping[str, Any], prefix: str) -> FieldProblem:
    kind = err.get("type", "")
    param = _dotted(path, prefix)
    where = param or "request body"
    if kind == "json_invalid":
        ctx = err.get("ctx")
        message = f"request body is not valid JSON: {ctx.get('error', 'parse error') if isinstance(ctx, dict) else ''}"
    elif kind == "extra_forbidden":
        message = f"unknown field '{param}'"
    elif kind == "missing":
        message = f"field '{param}' is required" if param else "request body is required"
    elif kind in _NOT_AN_OBJECT and not path:
        message = f"{where} must be a JSON object, sent as Content-Type: application/json"
    else:
        text = str(err.get("msg", "invalid value")).removeprefix("Value error, ")  # (pydantic's, for our checks)
        message = f"{param}: {text}" if param else text
    return FieldProblem(message=message, param=param, code=_CODES.get(kind, "invalid_value"))


def _dotted(path: tuple[Any, ...], prefix: str) -> str | None:
    """`messages[0].content[1].image_url` from the walked path (list indices are ints, keys strings: a key "50256"
    stays `.50256`); `prefix` goes in front. Bounded: the keys are the client's."""
    out = prefix
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "" or not isinstance(part, str):
            out += f"[{str(part)!r}]"
        else:
            out += f".{part}" if out else part
    if len(out) > _PARAM_CHARS:
        out = out[: _PARAM_CHARS - 3] + "..."
    return out or None
