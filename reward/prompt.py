"""Turning image(s) + question into model inputs, and answers into token ids.

The prompt (image + question, rendered by the model's chat template) and each
answer are tokenized *separately* and concatenated. Generation, service
scoring and DPO training all go through these two functions, so the same
answer text always becomes the same tokens wherever it is scored. An answer
given as text is tokenized as it reads in the model's own rendered turn, after
the generation prompt and what the template puts between it and the answer
(`answer_seam`), not alone: the ids the model was trained on.
"""

from __future__ import annotations

import contextlib
import logging
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlaifv.reward.errors import AnswerError, ContextLengthError, ImageError, InvalidInputError

log = logging.getLogger("rlaifv.reward")

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image


@dataclass
class EncodedPrompt:
    """An image+question prefix ready for the model.

    `input_ids` is (L,) with image placeholders already expanded; `vision` holds
    the processor's image tensors (e.g. pixel_values (n_images, 3, H, W)).
    """

    input_ids: torch.Tensor
    vision: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
_SHOWN_AS_NOTHING = frozenset(
    chr(c)
    for first, last in (
        (0x034F, 0x034F),  # combining grapheme joiner
        (0x115F, 0x1160),  # Hangul fillers
        (0x17B4, 0x17B5),  # Khmer inherent vowels
        (0x180B, 0x180F),  # Mongolian variation selectors
        (0x2065, 0x2065),  # unassigned, default-ignorable
        (0x2800, 0x2800),  # braille blank
        (0x3164, 0x3164),  # Hangul filler
        (0xFE00, 0xFE0F),  # variation selectors
        (0xFFA0, 0xFFA0),  # halfwidth Hangul filler
        (0xFFF0, 0xFFF8),  # unassigned, default-ignorable
        (0xE0000, 0xE0FFF),  # tags, variation selectors supplement, and unassigned default-ignorables
    )
    for c in range(first, last + 1)
)
"""Unicode's default-ignorable code points that are not format characters (letters, marks, unassigned ones), and
the braille blank: characters that show nothing."""


def blank(text: str) -> bool:
    """Whether `text` shows nothing: whitespace, control, format and other default-ignorable characters only.
    `str.strip` keeps all but whitespace (a zero-width space, a byte-order mark, a Hangul filler, NUL): an answer
    of one zero-width space scored as one unknown token and outranked every real answer."""
    return not text.strip() or all(
        ch.isspace() or ch in _SHOWN_AS_NOTHING or unicodedata.category(ch) in _INVISIBLE for ch in text
    )


BLANK_ANSWER = "answers must be non-empty strings (not only whitespace or invisible characters)"
BLANK_QUESTION = "question must not be empty (nothing but whitespace or invisible characters)"


def user_message(question: str, num_images: int) -> list[dict[str, Any]]:
    """The LLaVA convention: images first, then the question, in one user turn (images alone when it is empty)."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    if question:
        content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def count_image_parts(messages: Sequence[dict[str, Any]]) -> int:
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            total += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image")
    return total


def _first_image_part(messages: Sequence[dict[str, Any]]) -> str:
    """Where the first image part of `messages` is, as the request names it (`messages[1].content[0]`)."""
    for i, message in enumerate(messages):
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and part.get("type") == "image":
                return f"messages[{i}].content[{j}]"
    return "messages"


def encode_prompt(
    processor: Any,
    images: Sequence[Image],
    question: str | None = None,
    *,
    messages: Sequence[dict[str, Any]] | None = None,
    max_length: int | None = None,
    continue_final: bool = False,
) -> EncodedPrompt:
    """Render the chat template (generation prompt appended) and run the processor.

    Either `question` (one user turn, images first) or full `messages` in the
    Hugging Face chat format with `{"type": "image"}` placeholders. `continue_final`
    (vLLM's `continue_final_message`): the answer continues the last message, an
    assistant turn, instead of starting a new one (`render_chat`).
    """
    if (question is None) == (messages is None):
        raise InvalidInputError("give exactly one of question or messages", param="question")
    text_param = "question" if question is not None else "messages"
    if continue_final and messages is None:
        raise InvalidInputError("continuing a message needs messages ending with an assistant turn", param="question")
    if messages is None:
        if question is None or blank(question):
            raise InvalidInputError(BLANK_QUESTION, param="question")
        messages = user_message(question, len(images))
    elif count_image_parts(messages) != len(images):
        raise InvalidInputError(
            f"messages have {count_image_parts(messages)} image parts but {len(images)} images were given",
            param="messages",
        )
    _refuse_reserved_text(processor, question, messages)
    if images and not getattr(processor, "accepts_images", True):
        raise InvalidInputError(
            f"this model reads text only: send no images (got {len(images)})",
            param="images" if question is not None else _first_image_part(messages),
        )
    text = render_chat(processor, messages, continue_final=continue_final, param=text_param)
    tokenizer = processor.tokenizer
    answer_seam(processor)  # found with the processor's own template, before any answer is tokenized
    has_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
    try:
        batch = processor(
            images=[list(images)] if images else None,  # one prompt's images together: OneVision's multi-image mode
            text=[text],
            return_tensors="pt",
            add_special_tokens=not has_bos,
        )
    except (ArithmeticError, ValueError) as exc:  # not RuntimeError: out of memory, a library fault stay 500s
        if not images:
            raise
        log.warning("the image processor failed on %s", [image.size for image in images], exc_info=True)
        param = "images" if question is not None else _first_image_part(messages)
        raise _unprocessable(images, exc, param=param) from exc
    input_ids = batch.pop("input_ids")[0]
    batch.pop("attention_mask", None)
    batch.pop("labels", None)  # PaliGemma's processor adds training labels whenever it returns token_type_ids
    if max_length is not None and input_ids.shape[0] > max_length:
        raise ContextLengthError(
            f"prompt is too long: {input_ids.shape[0]} tokens, over the model limit of {max_length}",
            param=text_param,
        )
    return EncodedPrompt(input_ids=input_ids, vision=dict(batch))


def _unprocessable(images: Sequence[Image], exc: Exception, *, param: str) -> ImageError:
    """The model's own image processor failed on images that passed the service's checks (Idefics2's divides by
    zero on an image 1 px high): the request's images are what it cannot take, not a server fault."""
    sizes = ", ".join(f"{image.width}x{image.height}" for image in images)
    if len(images) == 1 and param == "images":
        param = "images[0]"
    return ImageError(
        f"this model's image processor cannot take the image{'s' if len(images) > 1 else ''} ({sizes} px):"
        f" {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no message'}; a larger image"
        " may do",
        param=param,
    )


def render_chat(
    processor: Any, messages: Sequence[dict[str, Any]], *, continue_final: bool = False, param: str = "messages"
) -> str:
    """The chat template's text for `messages`: a new assistant turn opened after them, or with `continue_final`
    the last message (an assistant turn with text) left open so that the answer continues it (transformers'
    `continue_final_message`, what vLLM does with the same request field). The template's own refusals are the
    caller's input errors."""
    from jinja2 import TemplateError

    if continue_final:
        last = messages[-1] if messages else {}
        content = last.get("content")
        texts = [content] if isinstance(content, str) else [p.get("text", "") for p in content or [] if p]
        if last.get("role") != "assistant" or not any(str(t).strip() for t in texts):
            raise InvalidInputError(
                "continue_final_message needs the last message to be an assistant turn with text to continue",
                param=f"{param}[{len(messages) - 1}]",
            )
    formats = content_formats(processor)
    if "string" in formats.values():
        messages = _as_strings(messages, formats, param)
    try:
        return str(
            processor.apply_chat_template(
                list(messages),
                add_generation_prompt=not continue_final,
                continue_final_message=continue_final,
                tokenize=False,
            )
        )
    except TemplateError as exc:  # the template's own rules (e.g. roles must alternate): the caller's input
        raise InvalidInputError(f"the model's chat template refused these messages: {exc}", param=param) from None
    except TypeError as exc:  # a template that adds strings to a shape of message it was not written for (a 500)
        raise InvalidInputError(
            f"the model's chat template cannot render these messages: {type(exc).__name__}: {exc}", param=param
        ) from None
    except ValueError as exc:  # transformers: a template that drops the text to continue
        if not continue_final:
            raise
        raise InvalidInputError(f"the last message cannot be continued: {exc}", param=param) from None


ROLES = ("user", "system", "assistant")
"""The roles a template's content format is probed for, the user's first (the others are probed beside a user turn
in its format)."""


def content_formats(processor: Any) -> dict[str, str]:
    """How the chat template reads each role's content: "parts" (a list of typed parts, as every vision template
    and the templates of HF's recent chat models) or "string" (templates written for a plain string:
    Qwen2-Instruct's, Llama-3's, Mistral's; Llama-3.2-Vision's and Pixtral's for the system and assistant turns
    only). Told by rendering a probe of each role both ways, once per processor (vLLM's
    `chat_template_content_format=auto` reads the template's source for one answer). Given parts, a string
    template failed (`str + list`: a 500) or, worse, rendered the list's Python repr into the prompt: every reward
    scored a wrong prompt, and the engine check agreed with `generate` on it."""
    cached = getattr(processor, "_rlaifv_content_formats", None)
    if isinstance(cached, dict):
        return cached
    found = _probe_content_formats(processor)
    with contextlib.suppress(AttributeError):
        processor._rlaifv_content_formats = found
    return found


def _template_failures() -> tuple[type[Exception], ...]:
    """What a chat template raises on a probe it was not written for (its own rules, a shape of message it cannot
    read): the probes of `content_formats`, `answer_seam` and `template_end_of_turn` move on to another shape."""
    from jinja2 import TemplateError

    return (TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError)


def _probe_content_formats(processor: Any) -> dict[str, str]:
    failures = _template_failures()
    as_repr = re.compile(r"""['"]text['"]: *['"]""" + re.escape(_MARKER))  # `{{ message['content'] }}` of a list

    def rendered(turns: list[dict[str, Any]], opened: bool) -> str | None:
        try:
            return str(processor.apply_chat_template(turns, add_generation_prompt=opened, tokenize=False))
        except failures:
            return None

    def conversation(role: str, content: Any, user: Any) -> tuple[list[dict[str, Any]], bool]:
        probe = {"role": role, "content": content}
        if role == "system":
            return [probe, {"role": "user", "content": user}], True
        if role == "assistant":
            return [{"role": "user", "content": user}, probe], False
        return [probe], True

    formats: dict[str, str] = {}
    for role in ROLES:
        user_format = formats.get("user", "parts")
        user: Any = [{"type": "text", "text": "Hi."}] if user_format == "parts" else "Hi."
        as_parts = rendered(*conversation(role, [{"type": "text", "text": _MARKER}], user))
        if as_parts is not None and _MARKER in as_parts and not as_repr.search(as_parts):
            formats[role] = "parts"
            continue
        as_string = rendered(*conversation(role, _MARKER, user))
        formats[role] = "string" if as_string is not None and _MARKER in as_string else "parts"
    return formats


def _as_strings(messages: Sequence[dict[str, Any]], formats: dict[str, str], param: str) -> list[dict[str, Any]]:
    """The messages of the roles a template reads as strings with their text parts joined by newlines (vLLM's
    rule for a string template); an image part there is refused: such a turn has no place for one."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list) and formats.get(str(message.get("role")), "parts") == "string":
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text":
                    raise InvalidInputError(
                        f"this model's chat template takes text only in a {message.get('role')} message: it has no"
                        " place for an image",
                        param=f"{param}[{i}].content[{j}]" if param == "messages" else "images",
                    )
                texts.append(str(part.get("text", "")))
            message = {**message, "content": "\n".join(texts)}
        out.append(message)
    return out


def decoded_after(tokenizer: Any, ids: Sequence[int], context: Sequence[int] = ()) -> str:
    """`ids` decoded as they read after `context` (the prompt's last tokens), special tokens left out.

    Without context, as the answer's own text. With it, the continuation of a message: SentencePiece and other
    decoders drop a word's leading space at the start of a decode ("▁red" -> "red"), which joined to the message
    would run two words together; decoding behind the context keeps it (" red"), as vLLM's detokenizer does."""
    if not context:
        return str(tokenizer.decode(list(ids), skip_special_tokens=True))
    head = str(tokenizer.decode(list(context), skip_special_tokens=True))
    both = str(tokenizer.decode([*context, *ids], skip_special_tokens=True))
    return both[len(head) :] if both.startswith(head) else str(tokenizer.decode(list(ids), skip_special_tokens=True))


def continuation_ids(tokenizer: Any, text: str, context: Sequence[int] = ()) -> list[int]:
    """`text`'s token ids; with `context` (the prompt's last tokens), as `text` tokenizes where it continues them;
    without, as an answer in a new assistant turn tokenizes there (`answer_ids`).

    A continuation's leading space belongs to its first token in some tokenizers (byte-level BPE: " red" is one
    token) and is implied by a word-start marker in others (SentencePiece adds "▁" itself; a literal space there
    becomes a token of its own). Tokenizing the context's text followed by `text`, and keeping what follows the
    context's own tokens, is right for both; where the two disagree at the seam (a merge across it), `text` is
    tokenized alone, its leading space left out."""
    if not context:
        return answer_ids(tokenizer, text)
    head = str(tokenizer.decode(list(context), skip_special_tokens=True))
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    both = tokenizer(head + text, add_special_tokens=False)["input_ids"]
    if head and list(both[: len(head_ids)]) == list(head_ids):
        return [int(t) for t in both[len(head_ids) :]]
    return [int(t) for t in tokenizer(text.lstrip(), add_special_tokens=False)["input_ids"]]


def tidy_answer(text: str, context: Sequence[int] = ()) -> str:
    """An answer's text as returned: stripped, or for a continuation (`context`) only on the right, as the
    message it joins needs its leading space."""
    return text.rstrip() if context else text.strip()


def stop_cut_ids(
    tokenizer: Any, raw: str, sampled: Sequence[int], *, eot_id: int, context: Sequence[int] = ()
) -> tuple[str, list[int]]:
    """A sampled answer cut at a stop string (`raw`: its text before the stop string) as returned
    (`tidy_answer`), and its ids as a finished turn (end-of-turn appended), as /v1/rewards scores that text. A
    tokenizer that cannot spell the cut text (a word-level vocabulary cut inside a word gives its unknown token,
    which the sample never had) cuts at the last whole sampled token instead: the reward and the log-probs score
    what the client receives, not the unknown token."""

    def turn(words: str) -> list[int]:
        return [*continuation_ids(tokenizer, words, context), eot_id] if words.strip() else [eot_id]

    text = tidy_answer(raw, context)
    ids = turn(text)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or ids.count(unk) <= list(sampled).count(unk):
        return text, ids
    for end in range(len(sampled), 0, -1):
        whole = tidy_answer(decoded_after(tokenizer, sampled[:end], context), context)
        if text.startswith(whole):
            return whole, turn(whole)
    return "", [eot_id]


ANSWER_TOKENIZATION_VERSION = 4
"""What text answers tokenize to changed in version 2 (`answer_ids`: as inside the model's own rendered turn) and
3 (the whitespace a template trims off a message left off), and what a prompt renders to in 4 (a string-content
template's prompt was the repr of its parts, `content_formats`): rewards cached for the same text carry it."""


@dataclass(frozen=True)
class AnswerSeam:
    """Where an assistant's answer starts in the chat template's text: `prompt`, a conversation rendered with the
    generation prompt (`prompt_ids` its tokens), and `seam`, the whitespace the template writes between that and
    the answer's text (LLaVA's "ASSISTANT:" + " " + answer; "" after ChatML's "<|im_start|>assistant\n").
    `trims_start`/`trims_end`: the template strips whitespace off that end of a message (Gemma 3's and Llama 3's
    `| trim`), so no turn the model saw had it there."""

    prompt: str
    seam: str
    prompt_ids: tuple[int, ...]
    trims_start: bool = False
    trims_end: bool = False

    def as_rendered(self, text: str) -> str:
        """`text` as the template writes it into a turn."""
        text = text.lstrip() if self.trims_start else text
        return text.rstrip() if self.trims_end else text


_MARKER = "Zq7 xylophone"
"""Text no template changes, to find where a message's content lands in the template's rendering."""

_PAD = " \n"
"""Whitespace put around `_MARKER` to see whether a template trims a message's ends."""


def answer_seam(owner: Any) -> AnswerSeam | None:
    """The `AnswerSeam` of `owner`'s chat template (a processor's, else its tokenizer's); None where the template
    cannot tell: no template, a rendering of the answered turn that does not extend the generation prompt, or
    anything but whitespace between them (a reasoning block the answer's text does not spell).

    Cached on the tokenizer, so that every caller (scoring, stop-cut samples, DPO pairs) tokenizes an answer
    alike; `encode_prompt` finds it with the processor's template first (a folder whose template only the
    processor has). A tokenizer without a template caches nothing: its processor may still come."""
    tokenizer = getattr(owner, "tokenizer", owner)
    cached = getattr(tokenizer, "_rlaifv_answer_seam", False)
    if cached is not False:
        return cached if isinstance(cached, AnswerSeam) else None
    renderer = owner if getattr(owner, "chat_template", None) else tokenizer
    if not getattr(renderer, "chat_template", None):
        return None
    found = _find_answer_seam(renderer, tokenizer)
    with contextlib.suppress(AttributeError):  # a tokenizer that refuses new attributes: found again each time
        tokenizer._rlaifv_answer_seam = found
    return found


def _find_answer_seam(renderer: Any, tokenizer: Any) -> AnswerSeam | None:

    for parts in (True, False):  # parts (vision templates), or a plain string
        question: Any = [{"type": "text", "text": "Hi."}] if parts else "Hi."
        user = {"role": "user", "content": question}

        def answered(text: str, parts: bool = parts, user: dict[str, Any] = user) -> str:
            content = [{"type": "text", "text": text}] if parts else text
            turns = [user, {"role": "assistant", "content": content}]
            return str(renderer.apply_chat_template(turns, add_generation_prompt=False, tokenize=False))

        try:
            prompt = str(renderer.apply_chat_template([user], add_generation_prompt=True, tokenize=False))
            turn = answered(_MARKER)
            padded = answered(_PAD + _MARKER + _PAD)
        except _template_failures():  # its own rules
            continue
        at = turn.find(_MARKER, len(prompt))
        if at < 0 or not turn.startswith(prompt) or turn[len(prompt) : at].strip():
            continue
        seam, tail = turn[len(prompt) : at], turn[at + len(_MARKER) :]
        at_padded = padded.find(_MARKER, len(prompt))
        seen = at_padded >= 0 and padded.startswith(prompt)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return AnswerSeam(
            prompt,
            seam,
            tuple(int(t) for t in ids),
            trims_start=seen and padded[len(prompt) : at_padded] == seam,
            trims_end=seen and padded[at_padded + len(_MARKER) :] == tail,
        )
    return None


def answer_ids(tokenizer: Any, text: str) -> list[int]:
    """`text`'s ids as an answer opening a new assistant turn: the template's seam and `text` tokenized after its
    generation prompt, as in the whole rendered conversation the model was trained on (and RLAIF-V's log-probs
    were read from). Tokenized alone, an answer can differ at its start: a fast Metaspace tokenizer gives "A" a
    "▁" it has no room for after OmniLMM's "<|assistant|>\n" (or ChatML's), and " A" one "▁" fewer than LLaVA's
    "ASSISTANT: " + " A"; byte-level BPE loses the space that Idefics' "Assistant:" + " " gives the first word.
    Whitespace the template trims off a message is left off (Gemma 3, Llama 3: another model's answer ending in
    "\n" was scored with a newline before the end of turn that no turn of the model's has). Alone where the seam
    is unknown (`answer_seam`) or where the prompt's own tokens would change (a merge across it: ChatML's
    "assistant\n" before an answer starting with a newline, in byte-level BPE)."""
    seam = answer_seam(tokenizer)
    if seam is not None:
        text = seam.as_rendered(text)
        both = tokenizer(seam.prompt + seam.seam + text, add_special_tokens=False)["input_ids"]
        if tuple(both[: len(seam.prompt_ids)]) == seam.prompt_ids:
            return [int(t) for t in both[len(seam.prompt_ids) :]]
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


CONTEXT_TOKENS = 4
"""Prompt tokens decoded before a continuation (`decoded_after`): enough to settle a multi-byte character or
a word split over tokens."""


def continuation_context(prompt_ids: Sequence[int] | Any, continue_final: bool) -> list[int]:
    """The prompt tokens a continuation is read and tokenized after (a list or a 1-D tensor of ids); none when
    the answers start a new turn."""
    return [int(t) for t in prompt_ids[-CONTEXT_TOKENS:]] if continue_final else []


def token_text(decode: Callable[[tuple[int, ...]], str], previous: int | None, token: int) -> str:
    """The text `token` adds after `previous` (None: at the start), so that a word-start space survives;
    `decode` renders ids with special tokens kept."""
    alone = decode((token,))
    if previous is None:
        return alone
    before = decode((previous,))
    both = decode((previous, token))
    return both[len(before) :] if both.startswith(before) else alone


def reserved_strings(processor: Any) -> tuple[str, ...]:
    """Text the model reads as markup, not words: the tokenizer's special tokens and the processor's image/video
    placeholders. Typed by a user, "<image>" would stand for an image that is not there, and "</s>" would end a
    turn. Cached on the processor (its tokens do not change once loaded)."""
    cached = getattr(processor, "_rlaifv_reserved", None)
    if isinstance(cached, tuple):
        return cached
    tokenizer = getattr(processor, "tokenizer", processor)
    # The declared special tokens only: tokenizers also flag plain added tokens (Gemma's HTML tags) as special,
    # which users may write (`markup_ids` still keeps them from being sampled).
    found = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    for owner in (processor, tokenizer):
        found |= {v for k, v in vars(owner).items() if k.endswith("_token") and isinstance(v, str)}
    reserved = tuple(sorted(t for t in found if t.strip()))  # sorted: a text always names the same token
    with contextlib.suppress(AttributeError):  # a processor that refuses new attributes: recomputed per prompt
        processor._rlaifv_reserved = reserved
    return reserved


def markup_ids(processor: Any) -> set[int]:
    """Token ids a sampled answer must not hold: those of `reserved_strings` (an image placeholder not flagged
    special was sampled: an answer no plain forward could score) and every added token the answer's text drops
    (`decode(skip_special_tokens=True)`: with fast tokenizers, every one flagged special, such as Idefics3's
    `<row_1_col_1>`): an answer's text must say what its ids are, or rescored from its text it gets another
    reward. Computed once per pair (a 262k vocabulary with 6,000 added tokens: about 0.2 s)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    vocab = tokenizer.get_vocab()
    ids = {int(i) for i in tokenizer.all_special_ids}
    ids |= {int(vocab[token]) for token in reserved_strings(processor) if token in vocab}
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False) and not tokenizer.decode([token_id], skip_special_tokens=True):
            ids.add(int(token_id))
    return ids


def _refuse_reserved_text(processor: Any, question: str | None, messages: Sequence[dict[str, Any]] | None) -> None:
    texts: list[tuple[str, str]] = [("question", question)] if question is not None else []
    for i, message in enumerate(messages or []):
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        texts += [
            (f"messages[{i}].content", p["text"]) for p in parts if isinstance(p, dict) and p.get("type") == "text"
        ]
    refuse_markup(processor, texts)


def refuse_markup(
    processor: Any, texts: Sequence[tuple[str, str]], error: type[InvalidInputError] = InvalidInputError
) -> None:
    """Raise `error` naming the first (param, text) that holds one of `reserved_strings(processor)`."""
    for param, text in texts:
        for token in reserved_strings(processor):
            if token in text:
                raise error(
                    f"{param} contains {token!r}, which this model reads as markup (an image placeholder or a"
                    " special token), not as text; remove it",
                    param=param,
                )


def without_markup(processor: Any, text: str) -> str:
    """`text` with the model's markup removed: for text the engine wrote itself (a claim's yes/no question made
    from a sampled answer), where refusing would blame a request for what the model said."""
    for token in sorted(reserved_strings(processor), key=len, reverse=True):
        text = text.replace(token, " ")
    return text


def markup_free(processor: Any, text: str) -> str:
    """`text` as words for this model: its markup removed and the ends trimmed where there was any; text without
    markup comes back unchanged (data that had none trains and samples exactly as before)."""
    cleaned = without_markup(processor, text)
    return cleaned.strip() if cleaned != text else text


def encode_answers(
    processor: Any,
    texts: Sequence[str],
    *,
    eot_id: int,
    max_tokens: int | None = None,
    context: Sequence[int] = (),
) -> list[list[int]]:
    """Answers to score -> token ids each, named `answers[i]` in errors; markup in one is refused (another model's
    answer holding "</s>" would be scored as two turns), as in a question. `context`: the answers continue a
    message ending in these prompt tokens (`continuation_ids`)."""
    if not texts:
        raise AnswerError("answers must be a non-empty list", param="answers")
    refuse_markup(processor, [(f"answers[{i}]", t) for i, t in enumerate(texts) if isinstance(t, str)], AnswerError)
    tokenizer = processor.tokenizer
    return [
        encode_answer(tokenizer, text, eot_id=eot_id, max_tokens=max_tokens, param=f"answers[{i}]", context=context)
        for i, text in enumerate(texts)
    ]


def template_end_of_turn(processor: Any) -> str | None:
    """The special token the chat template writes right after an assistant message's text, if any: the token a
    chat model ends its turns with. Gemma-3-it's EOS is `<eos>` but its turns end with `<end_of_turn>`, so given
    answers closed by EOS scored otherwise than the same text sampled (which stops at either)."""

    tokenizer = getattr(processor, "tokenizer", processor)
    marker = _MARKER
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    for content in ([{"type": "text", "text": marker}], marker):  # parts (vision templates), or a plain string
        first = [{"type": "text", "text": "Hi."}] if isinstance(content, list) else "Hi."
        turns = [{"role": "user", "content": first}, {"role": "assistant", "content": content}]
        try:
            text = str(processor.apply_chat_template(turns, add_generation_prompt=False, tokenize=False))
        except _template_failures():  # no template, or its own rules
            continue
        at = text.rfind(marker)
        ids = tokenizer(text[at + len(marker) :], add_special_tokens=False)["input_ids"] if at >= 0 else []
        if ids and ids[0] in special:
            return str(tokenizer.convert_ids_to_tokens(ids[0]))
    return None


def end_of_turn_id(tokenizer: Any, token: str | None = None, processor: Any = None) -> int:
    """The token that closes an assistant turn: the bundle's `end_of_turn`, else the one the chat template of
    `processor` (or of the tokenizer) writes after an assistant message, else EOS."""
    token = token or template_end_of_turn(processor if processor is not None else tokenizer) or tokenizer.eos_token
    if token is None:
        raise InvalidInputError(
            "the tokenizer has no eos_token to close an answer: name the end-of-turn token"
            " (rlaifv bundle create --end-of-turn TOKEN, or end_of_turn in rlaifv.json)"
        )
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise InvalidInputError(f"end-of-turn token {token!r} is not in the vocabulary")
    return int(token_id)


def encode_answer(
    tokenizer: Any,
    text: str,
    *,
    eot_id: int,
    max_tokens: int | None = None,
    param: str = "answers",
    context: Sequence[int] = (),
) -> list[int]:
    """Answer text -> token ids, the end-of-turn token appended (a complete turn); `param` names it in errors;
    `context` as in `continuation_ids`."""
    if not isinstance(text, str) or blank(text):
        raise AnswerError(BLANK_ANSWER, param=param)
    ids = [*continuation_ids(tokenizer, text, context), eot_id]
    if max_tokens is not None and len(ids) > max_tokens:
        raise AnswerError(f"{param} is {len(ids)} tokens, over the limit of {max_tokens}", param=param)
    return ids
