"""An answer given as text gets the ids it has in the model's own rendered turn, for every family's chat template.

The oracle is the whole conversation, the answer in its assistant turn, rendered by the template and tokenized at
once (what the model was trained on, and what `apply_chat_template(..., tokenize=True)` gives). The tiny families
carry word-level tokenizers, so each family's template and special tokens are put on tokenizers of the real kinds,
trained here: byte-level BPE (Qwen2's and GPT-2's pre-tokenizers), SentencePiece BPE read by the fast Metaspace
(Llama's `legacy` false and true) and Gemma's (no dummy prefix).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from rlaifv.reward.prompt import answer_seam, continuation_ids, encode_prompt
from rlaifv.testing.tiny_families import FAMILIES, build_tiny_family

WORD_LIST = (
    "the a red blue green box cat dog table image picture shows there is are on in of with and what how many colour "
    "left right person sitting holding USER ASSISTANT User Assistant user assistant model system Human yes no Yes No "
    "please answer describe this You helpful"
)
WORDS = WORD_LIST.split()
ANSWERS = [
    "A red box.",
    " A red box.",
    "  Two spaces.",
    "\nNewline first.",
    "\n\nTwo newlines.",
    "\tTab first",
    "Yes",
    "no",
    "Multi\nline\n\nanswer",
    "There are 12 cats and 3,500 dogs.",
    "1",
    "中文回答",
    " 中文",
    "Emoji 😀 and café.",
    "😀 first",
    ". Dot first",
    ", comma",
    "?!",
    "'quoted'",
    "(paren)",
    "- a list\n- b",
    ":colon",
    "\u2581mark",
    " \u2581mark",
    "runs   of    spaces",
    "Ends with space ",
    "Ends with newline\n",
]


def _corpus() -> list[str]:
    rng = random.Random(0)
    lines = []
    for i in range(400):
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        lines.append(
            f"{sentence.capitalize()}, {rng.randint(0, 9999)} items; café — ok! ({i})\n  {rng.choice(WORDS)}:  x"
        )
        lines.append("USER: What? ASSISTANT: A red box.\nAssistant: Yes\n###Assistant: no [INST] hi [/INST]")
    return lines


def _random_answers(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    parts = [*WORDS, "12", "3.5", ",", "?!", "  ", "\n", "\n\n", "\t", "é", "😀", "中文", "\u2581", ".", ":", "'"]
    starts = ["", "", " ", "  ", "\n", "\t", "\u2581", ".", ",", "'", "(", "-", "1", "😀", ":", " \n", "\n "]
    texts = []
    for _ in range(count):
        text = rng.choice(starts) + "".join(rng.choice(parts) + rng.choice(["", " "]) for _ in range(rng.randint(1, 8)))
        texts.append(text if text.strip() else text + "x")
    return texts


@functools.cache
def _byte_level_model() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        _corpus(), trainers.BpeTrainer(vocab_size=800, initial_alphabet=alphabet, show_progress=False)
    )
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])


def _byte_level(kind: str) -> Any:
    """Qwen2's tokenizer (its regex, then bytes) or GPT-2's (bytes, GPT-2's regex) over one trained model."""
    from transformers import GPT2Tokenizer, Qwen2Tokenizer

    vocab, merges = _byte_level_model()
    return (Qwen2Tokenizer if kind == "qwen2" else GPT2Tokenizer)(vocab=dict(vocab), merges=list(merges))


def _sentencepiece(kind: str, folder: Path) -> Path:
    """A folder with a SentencePiece model trained with Llama's settings (`gemma`: without the dummy prefix, read by
    GemmaTokenizer), converted by transformers on each load."""
    from rlaifv.testing.sentencepiece_models import train_llama_like

    model = train_llama_like(_corpus(), 700, dummy_prefix=kind != "gemma")
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(model)
    config = {
        "tokenizer_class": "GemmaTokenizer" if kind == "gemma" else "LlamaTokenizer",
        "legacy": kind == "metaspace-always",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


KINDS = ("qwen2", "gpt2", "metaspace-first", "metaspace-always", "gemma")


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each tiny family's tokenizer (its chat template, its special tokens)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("families")
    return {name: AutoTokenizer.from_pretrained(build_tiny_family(name, root / name)) for name in FAMILIES}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Callable[[], Any]]:
    """A fresh tokenizer of each kind per call (a family's special tokens are added to it)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("kinds")
    made: dict[str, Callable[[], Any]] = {kind: functools.partial(_byte_level, kind) for kind in ("qwen2", "gpt2")}
    for kind in ("metaspace-first", "metaspace-always", "gemma"):
        made[kind] = functools.partial(AutoTokenizer.from_pretrained, _sentencepiece(kind, root / kind))
    return made


def _as_family(base: Any, family: Any) -> Any:
    """`base` with `family`'s special tokens, names and chat template."""
    named = {k: getattr(family, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if getattr(family, k)}
    specials = [str(t.content) for t in family.added_tokens_decoder.values() if t.special]
    base.add_special_tokens({**named, "additional_special_tokens": [s for s in specials if s not in named.values()]})
    base.chat_template = family.chat_template
    return base


def _turn(text: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": text}]


USER = {"role": "user", "content": _turn("What is this?")}


def _answered(answer: str) -> list[dict[str, Any]]:
    return [USER, {"role": "assistant", "content": _turn(answer)}]


def _conversation(tok: Any) -> tuple[str, list[int], Callable[[str], list[int]]]:
    """The oracle: the generation prompt's text and ids, and a function giving the whole answered conversation's
    ids, rendered by the template and tokenized at once (a BOS the template writes is not added again)."""
    prompt_text = tok.apply_chat_template([USER], add_generation_prompt=True, tokenize=False)
    add = not (tok.bos_token and prompt_text.startswith(tok.bos_token))
    prompt = list(tok(prompt_text, add_special_tokens=add)["input_ids"])

    def whole(answer: str) -> list[int]:
        text = tok.apply_chat_template(_answered(answer), tokenize=False)
        return list(tok(text, add_special_tokens=add)["input_ids"])

    return prompt_text, prompt, whole


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_text_answers_have_the_ids_of_the_rendered_turn_for_every_family(
    kind: str, templates: dict[str, Any], bases: dict[str, Callable[[], Any]]
) -> None:
    """Wherever the answer tokenized alone had the turn's ids, it still has them (byte-level BPE after ChatML, Gemma
    after "model\\n"); and every answer whose ids the turn can give (the prompt's own ids are a prefix of the whole
    turn's) gets them, trailing whitespace aside (it meets the template's end of turn). Without the seam, a
    byte-level answer after Idefics' "Assistant:" lost the space the template writes before it, and a Metaspace
    answer after ChatML's "assistant\\n" got a "▁" no turn has."""
    answers = ANSWERS + _random_answers(60, seed=1)
    checked = 0
    for name in FAMILIES:
        tok = _as_family(bases[kind](), templates[name])
        prompt_text, prompt, whole_ids = _conversation(tok)
        for answer in answers:
            whole = whole_ids(answer)
            ours = continuation_ids(tok, answer)
            alone = list(tok(answer, add_special_tokens=False)["input_ids"])
            after = whole[len(prompt) :]
            if after[: len(alone)] == alone and whole[: len(prompt)] == prompt:
                assert after[: len(ours)] == ours, (name, answer)
            rendered = tok.apply_chat_template(_answered(answer), tokenize=False)
            verbatim = rendered.startswith(prompt_text) and answer in rendered[len(prompt_text) :]
            if whole[: len(prompt)] == prompt and verbatim and answer == answer.rstrip():
                assert after[: len(ours)] == ours, (name, answer, tok.convert_ids_to_tokens(after[:6]))
                checked += 1
    assert checked > len(FAMILIES) * len(answers) // 2


def _chatml_byte_level(template: str) -> Any:
    tok = _byte_level("qwen2")
    tok.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = template
    return tok


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def test_the_space_a_template_writes_before_the_answer_starts_its_first_token() -> None:
    """Idefics' "Assistant:" generation prompt, then "Assistant: " + answer in the turn: a byte-level answer's first
    word is " Yes" there (what the model samples), "Yes" alone."""
    tok = _chatml_byte_level(IDEFICS)
    assert answer_seam(tok) is not None and answer_seam(tok).seam == " "  # type: ignore[union-attr]
    assert continuation_ids(tok, "Yes, a red box.") == tok(" Yes, a red box.")["input_ids"]


def test_where_the_seam_is_unknown_or_merges_the_answer_tokenizes_alone() -> None:
    """No template; a template writing text between the generation prompt and the answer (a reasoning block the
    answer's text does not spell); an answered turn that does not extend the generation prompt; a newline-led
    answer after ChatML's "assistant\\n" (byte-level merges the two newlines: no ids of the prompt's own and the
    answer's make that turn)."""
    thinking = CHATML.replace(
        "{{ m['content'] }}", "{% if m['role'] == 'assistant' %}<think></think>{% endif %}{{ m['content'] }}"
    )
    other = CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant:\n{% endif %}")
    for template in (None, thinking, other):
        tok = _chatml_byte_level(CHATML)
        tok.chat_template = template
        assert answer_seam(tok) is None
        assert continuation_ids(tok, "Yes") == tok("Yes")["input_ids"]
    tok = _chatml_byte_level(CHATML)
    assert answer_seam(tok) is not None
    assert continuation_ids(tok, "\nYes") == tok("\nYes")["input_ids"]
    assert continuation_ids(tok, "Yes") == tok("Yes")["input_ids"]


TRIMMING = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")


@pytest.mark.parametrize(
    ("template", "start", "end"),
    [
        (TRIMMING, True, True),
        (CHATML.replace("{{ m['content'] }}", "{{ m['content'] | trim }}\n"), True, True),
        (CHATML.replace("{{ m['content'] }}", "{{ m['content'].lstrip() }}"), True, False),
        (CHATML.replace("{{ m['content'] }}", "{{ m['content'].rstrip() }}"), False, True),
        (CHATML, False, False),
        (IDEFICS, False, False),
    ],
)
def test_whitespace_a_template_trims_off_a_message_is_left_off_the_answer(
    template: str, start: bool, end: bool
) -> None:
    """Gemma 3 and Llama 3 trim every message: another model's answer ending in a newline was scored with a
    newline before the end of turn, a token no turn of the model's has there."""
    tok = _chatml_byte_level(template)
    seam = answer_seam(tok)
    assert seam is not None and (seam.trims_start, seam.trims_end) == (start, end)
    text = "\n A red box. \n\n"
    kept = text.lstrip() if start else text
    kept = kept.rstrip() if end else kept
    assert continuation_ids(tok, text) == continuation_ids(tok, kept)
    if start or end:
        assert continuation_ids(tok, text) != tok(text)["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_answers_in_a_trimming_template_have_the_ids_of_the_rendered_turn(
    kind: str, templates: dict[str, Any], bases: dict[str, Callable[[], Any]]
) -> None:
    """Gemma 3's and Mllama's templates over every tokenizer kind: each answer, whitespace around it included, has
    the ids the whole rendered conversation gives it, up to the end of turn."""
    answers = ANSWERS + _random_answers(60, seed=2) + [f"{a}\n" for a in ("Yes", "A red box.", " x ")]
    checked = 0
    for name in ("gemma3", "mllama"):
        tok = _as_family(bases[kind](), templates[name])
        seam = answer_seam(tok)
        assert seam is not None and seam.trims_start and seam.trims_end, name
        _, prompt, whole_ids = _conversation(tok)
        for answer in answers:
            whole = whole_ids(answer)
            if whole[: len(prompt)] != prompt:
                continue
            ours = continuation_ids(tok, answer)
            assert whole[len(prompt) : len(prompt) + len(ours) + 1] == [*ours, whole[len(prompt) + len(ours)]]
            assert whole[len(prompt) + len(ours)] in tok.all_special_ids, (name, answer)
            checked += 1
    assert checked > len(answers)


def test_the_seam_is_found_once_per_tokenizer() -> None:
    tok = _chatml_byte_level(IDEFICS)
    calls = []
    render = tok.apply_chat_template
    tok.apply_chat_template = lambda *a, **kw: calls.append(1) or render(*a, **kw)  # type: ignore[method-assign]
    continuation_ids(tok, "Yes")
    assert calls
    found = len(calls)
    for text in ("No", "A red box.", " Yes"):
        continuation_ids(tok, text)
    assert len(calls) == found


def test_a_template_only_the_processor_has_is_found_by_encode_prompt() -> None:
    """A folder whose template is the processor's alone (a legacy chat_template.json): every later tokenizer-only
    caller (stop-cut samples, DPO pairs) reads answers as the processor's turn renders them."""
    from rlaifv.trainer.shapes.tiny_vlm import TinyVLMSpec, build_processor

    processor = build_processor(TinyVLMSpec())
    processor.tokenizer.chat_template = None
    assert answer_seam(processor.tokenizer) is None
    encode_prompt(processor, [], "What is this?")
    seam = answer_seam(processor.tokenizer)
    assert seam is not None and seam.seam == " " and seam.prompt.endswith("ASSISTANT:")


def test_the_shapes_world_answers_tokenize_as_before() -> None:
    """The shipped bundle's build tokenizes its SFT answers with `encode_answer` (word-level, "▁" before every word,
    object phrases one token): read after "ASSISTANT:", they have the ids they had alone, so builds do not change."""
    from rlaifv.reward.models import load_processor
    from rlaifv.service.default_model import default_bundle

    processor = load_processor(default_bundle() / "reference")
    tok = processor.tokenizer
    assert answer_seam(processor) is not None
    rng = random.Random(0)
    words = [tok.decode([i]) for t, i in tok.get_vocab().items() if t.startswith("\u2581")]
    for _ in range(300):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) + rng.choice(["", ".", "?", " .", ","])
        assert continuation_ids(tok, text) == tok(text, add_special_tokens=False)["input_ids"], text


def test_cached_rewards_are_keyed_by_the_answer_tokenization_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewards cached for the same text under the earlier tokenization (answers alone) are misses."""
    from rlaifv.reward.scoring import RewardConfig
    from rlaifv.service import cache

    args = ("m", RewardConfig(), [b"image"], "q", None, ["a"])
    now = cache.RewardCache.key(*args)
    monkeypatch.setattr(cache, "ANSWER_TOKENIZATION_VERSION", cache.ANSWER_TOKENIZATION_VERSION - 1)
    assert cache.RewardCache.key(*args) != now


def test_dpo_pairs_read_answers_as_the_processors_template_renders_them() -> None:
    """`train dpo` encoded its pairs before any prompt: with a template only the processor has (a legacy
    chat_template.json), the answers were tokenized alone while scoring read them inside the turn."""
    from rlaifv.trainer.data import PreferenceRow
    from rlaifv.trainer.dpo import encode_pairs

    def tokenizer_without_template() -> Any:
        tok = _chatml_byte_level(IDEFICS)
        tok.chat_template = None
        return tok

    class Processor:
        chat_template = IDEFICS

        def __init__(self, tokenizer: Any) -> None:
            self.tokenizer = tokenizer

        def apply_chat_template(self, messages: Any, **kwargs: Any) -> Any:
            return self.tokenizer.apply_chat_template(messages, chat_template=IDEFICS, **kwargs)

    rows = [PreferenceRow("r0", b"", "what is this", "Yes, a red box.", "No.")]
    tok = tokenizer_without_template()
    eot = tok.eos_token_id
    (pair,), _ = encode_pairs(rows, tok, eot_id=eot, processor=Processor(tok))
    assert pair.chosen_ids[:-1] == tok(" Yes, a red box.")["input_ids"]
    tok = tokenizer_without_template()
    (alone,), _ = encode_pairs(rows, tok, eot_id=eot)
    assert alone.chosen_ids[:-1] == tok("Yes, a red box.")["input_ids"]
