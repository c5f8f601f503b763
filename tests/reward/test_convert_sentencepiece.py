"""Converted SentencePiece tokenizers against the token ids the original code produced.

RLAIF-V-7B and llava-v1.5-7b ship only a SentencePiece `tokenizer.model`; the original LLaVA code (RLAIF-V's copy,
transformers 4.35) loads it as the slow `LlamaTokenizer` and builds prompts with `tokenizer_image_token`, and
RLAIF-V's DPO log-probs take the answer's ids from the same tokenization of the whole turn. OmniLMM's code loaded
the fast tokenizer transformers 4.36 converted from its `tokenizer.model`. A tiny model trained here with Llama's
trainer settings (BPE, byte fallback, digits split, whitespace-only pieces, no whitespace folding, `<unk>`, `<s>`,
`</s>` at 0, 1, 2) stands in for the real one; `SlowLlamaTokenizer` re-implements the slow tokenizer of
transformers 4.35 (`tokenization_llama.py`: `legacy`, the dummy prefix, the split at special tokens), with
SentencePiece itself encoding. Prompts and answers go through the service's own code (`encode_prompt`,
`encode_answers`) on the converted folders.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

SPIECE = "\u2581"
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")
HIDDEN = CLIP_HIDDEN = 16
IMAGE_INDEX = -200  # LLaVA's IMAGE_TOKEN_INDEX: what tokenizer_image_token splices in for each <image>
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
QUESTIONS = (
    "What is this?",
    " leading space?",
    "  two leading spaces",
    "\nstarts with a newline",
    "How many? 12345 or 3.14",
    "Ends with a space ",
    "Line one\nLine two\n\nLine four",
    "Tabs\tand\ttabs",
    "café naïve — 😀 emoji 🎉 and 中文",
    "a \u2581literal piece mark",
    "runs   of    spaces",
    "trailing newline\n",
)
ANSWERS = (
    "A red box.",
    "Yes",
    "no",
    "\nNewline first.",
    "There are 12 cats and 3,500 dogs.",
    "Emoji 😀 and café.",
    "Ends with space ",
    "Multi\nline\n\nanswer",
    "中文回答",
    "runs   of    spaces",
)
LEADING_WHITESPACE_ANSWERS = (" A red box.", "  Two spaces.", "\u2581mark")


CORPUS_WORDS = (
    "the a red blue green box cat dog table chair image picture shows there is are on in of with and what which how "
    "many colour left right top person people sitting holding USER ASSISTANT chat between curious human artificial "
    "intelligence assistant gives helpful detailed polite answers questions yes no Yes No please answer describe this"
)


def _corpus() -> list[str]:
    words = CORPUS_WORDS.split()
    lines = [LLAVA_SYSTEM, "USER: What is this? ASSISTANT: A red box.</s>USER: Which? ASSISTANT:"]
    for i in range(300):
        start = (i * 7) % len(words)
        sentence = " ".join(words[(start + 3 * j) % len(words)] for j in range(6 + i % 5))
        lines.append(f"{sentence.capitalize()}, {i * 13 % 1000} items; café naïve — ok! ({i})")
        lines.append(f"  indented   text with   runs of spaces {i}")
    return lines


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    return _train_llama_like_model()


def _train_llama_like_model() -> bytes:
    """A SentencePiece BPE model trained with the settings of Llama's tokenizer.model (its trainer_spec)."""
    from rlaifv.testing.sentencepiece_models import train_llama_like

    return train_llama_like(_corpus(), 520, shuffle=False)


class SlowLlamaTokenizer:
    """transformers 4.35's slow `LlamaTokenizer` (add_bos_token, no eos) with `legacy` as configured.

    legacy=True: SentencePiece encodes each text between special tokens with its dummy "▁" prefix. legacy=False:
    the model loads with `add_dummy_prefix` off, the text gets one "▁" in front (its own "▁" read as spaces) and
    is split at special tokens; a part starting with "▁" or " " is encoded behind "<unk>", whose pieces are then
    dropped, and a lone leading "▁" before a special token is removed.
    """

    def __init__(self, model: bytes, *, legacy: bool, specials: Sequence[str] = LLAMA_SPECIALS) -> None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        self.legacy = legacy
        self.specials = tuple(specials)
        if not legacy:
            proto = sentencepiece_model_pb2.ModelProto.FromString(model)
            proto.normalizer_spec.add_dummy_prefix = False
            model = proto.SerializeToString()
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(model)
        self.unk_length = len(self.sp.encode("<unk>"))
        self.split = re.compile("(" + "|".join(map(re.escape, sorted(self.specials, key=len, reverse=True))) + ")")

    def _tokenize(self, text: str) -> list[str]:
        if self.legacy or not text.startswith((SPIECE, " ")):
            return list(self.sp.encode(text, out_type=str))
        return list(self.sp.encode("<unk>" + text, out_type=str))[self.unk_length :]

    def _split_and_tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        for part in self.split.split(text):
            if part:
                tokens += [part] if part in self.specials else self._tokenize(part)
        return tokens

    def tokenize(self, text: str) -> list[str]:
        if self.legacy or not text:
            return self._split_and_tokenize(text)
        tokens = self._split_and_tokenize(SPIECE + text.replace(SPIECE, " "))
        if len(tokens) > 1 and tokens[0] == SPIECE and tokens[1] in self.specials:
            tokens = tokens[1:]
        return tokens

    def __call__(self, text: str) -> list[int]:
        """`tokenizer(text).input_ids`: BOS, then the pieces' ids; tokens added after the model's pieces (OmniLMM's
        image tokens) get the ids after them, in the order given."""
        size = self.sp.get_piece_size()
        added = {token: size + k for k, token in enumerate(self.specials[len(LLAMA_SPECIALS) :])}
        return [1, *(added[t] if t in added else self.sp.piece_to_id(t) for t in self.tokenize(text))]

    def image_token(self, prompt: str) -> list[int]:
        """LLaVA's `tokenizer_image_token`: each text between `<image>`s tokenized alone, later BOS dropped."""
        chunks = [self(chunk) for chunk in prompt.split("<image>")]
        ids = chunks[0]
        for chunk in chunks[1:]:
            ids += [IMAGE_INDEX, *chunk[1:]]
        return ids


def _llava_v1(turns: Sequence[tuple[str, str | None]], system: str = LLAVA_SYSTEM) -> str:
    """conv_llava_v1.get_prompt() (SeparatorStyle.TWO: sep " ", sep2 "</s>")."""
    seps = (" ", "</s>")
    text = system + seps[0]
    for i, (role, message) in enumerate(turns):
        text += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return text


def _special(content: str) -> dict[str, Any]:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def _llava_original(folder: Path, model: bytes, legacy: bool | None) -> None:
    """A tiny LLaVA-1.5 folder whose tokenizer is only `tokenizer.model`, its tokenizer_config.json and
    special_tokens_map.json in the form transformers 4.31 saved them for llava-v1.5-7b (pad token `<unk>`,
    model_max_length 2048); `legacy` (believed False there, not confirmed) is False, True or left out (None)."""
    import sentencepiece as spm
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    text = {
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }
    torch.manual_seed(0)
    state = dict(LlamaForCausalLM(LlamaConfig(**text)).state_dict())
    for i, width in ((0, CLIP_HIDDEN), (2, HIDDEN)):
        state[f"model.mm_projector.{i}.weight"] = torch.randn(HIDDEN, width)
        state[f"model.mm_projector.{i}.bias"] = torch.zeros(HIDDEN)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    config = {
        **text,
        "model_type": "llava_llama",
        "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
        "image_aspect_ratio": "pad",
        "mm_hidden_size": CLIP_HIDDEN,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.model").write_bytes(model)
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _special("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": _special("</s>"),
        **({} if legacy is None else {"legacy": legacy}),
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _special("<unk>"),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    specials = {
        name: {k: v for k, v in _special(token).items() if k != "__type"}
        for name, token in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))
    }
    (folder / "special_tokens_map.json").write_text(json.dumps({**specials, "pad_token": "<unk>"}))


def _clip_folder(folder: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    config = CLIPVisionConfig(
        hidden_size=CLIP_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    CLIPVisionModel(config).save_pretrained(folder)
    clip = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    pre = {"crop_size": 28, "size": 28, "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3}
    (folder / "preprocessor_config.json").write_text(json.dumps({**pre, **clip}))


def _placeholders(ids: Sequence[int], image_id: int) -> list[int]:
    """Each run of the converted model's image tokens as the original's one placeholder."""
    out: list[int] = []
    for token in ids:
        if token != image_id:
            out.append(int(token))
        elif not out or out[-1] != IMAGE_INDEX:
            out.append(IMAGE_INDEX)
    return out


@pytest.fixture(scope="module", params=[False, True, None], ids=["legacy-false", "legacy-true", "legacy-unset"])
def llava(request: pytest.FixtureRequest, spm_model: bytes, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A converted LLaVA folder's processor and the original's tokenizer (transformers 4.3x read an unset `legacy`
    as True)."""
    from rlaifv.convert.llava import convert_llava
    from rlaifv.reward.models import load_processor

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("llava-spm")
    _llava_original(root / "original", spm_model, request.param)
    _clip_folder(root / "clip")
    out = convert_llava(root / "original", root / "clip", root / "hf")
    return {
        "out": out,
        "processor": load_processor(out),
        "slow": SlowLlamaTokenizer(spm_model, legacy=request.param is not False),
        "legacy": request.param,
    }


IMAGE = Image.new("RGB", (30, 20), (200, 10, 10))


def _prompt_ids(processor: Any, images: list[Image.Image], **kwargs: Any) -> list[int]:
    from rlaifv.reward.prompt import encode_prompt

    prompt = encode_prompt(processor, images, **kwargs)
    return _placeholders(prompt.input_ids.tolist(), processor.image_token_id)


@pytest.mark.slow
def test_llava_prompts_have_the_original_ids(llava: dict[str, Any]) -> None:
    """Questions after an image or alone, system texts (a leading space, "▁" or nothing: SentencePiece prefixes "▁"
    even there) and a second turn (after "</s>", "▁" only with legacy=True, which an unset `legacy` meant)."""
    processor, slow = llava["processor"], llava["slow"]
    for question in QUESTIONS:
        for images, text in (([IMAGE], "<image>\n" + question), ([], question)):
            expected = slow.image_token(_llava_v1([("USER", text), ("ASSISTANT", None)]))
            assert _prompt_ids(processor, images, question=question) == expected, (question, images)
    for system in (" Be brief.", "  two spaces", "\u2581mark", "\nnewline", "", "Plain."):
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]},
        ]
        expected = slow.image_token(_llava_v1([("USER", "<image>\nHi?"), ("ASSISTANT", None)], system=system))
        assert _prompt_ids(processor, [IMAGE], messages=messages) == expected, system
    for follow_up in ("Which colour?", " and now?", "\nnext"):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A red box."}]},
            {"role": "user", "content": [{"type": "text", "text": follow_up}]},
        ]
        turns = [
            ("USER", "<image>\nWhat is this?"),
            ("ASSISTANT", "A red box."),
            ("USER", follow_up),
            ("ASSISTANT", None),
        ]
        assert _prompt_ids(processor, [IMAGE], messages=messages) == slow.image_token(_llava_v1(turns)), follow_up
    saved = json.loads((llava["out"] / "tokenizer_config.json").read_text())
    assert saved["legacy"] is (llava["legacy"] is not False)
    assert json.loads((llava["out"] / "rlaifv_conversion.json").read_text())["tokenizer"]["legacy"] is saved["legacy"]


def _turn_ids(llava: dict[str, Any], question: str, answers: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt + answer ids through the service's code, the original's ids of the whole turn) per answer."""
    from rlaifv.reward.prompt import encode_answers, end_of_turn_id

    processor, slow = llava["processor"], llava["slow"]
    prompt = _prompt_ids(processor, [IMAGE], question=question)
    encoded = encode_answers(processor, answers, eot_id=end_of_turn_id(processor.tokenizer, processor=processor))
    turns = [[("USER", "<image>\n" + question), ("ASSISTANT", answer)] for answer in answers]
    return [(prompt + ids, slow.image_token(_llava_v1(turn))) for ids, turn in zip(encoded, turns, strict=True)]


@pytest.mark.slow
def test_llava_answers_have_the_ids_of_the_original_turn(llava: dict[str, Any]) -> None:
    """RLAIF-V's log-probs read the answer's ids (and the closing "</s>") from the tokenization of the whole turn,
    "... ASSISTANT: " + answer + "</s>"; the service tokenizes the answer alone and appends the end-of-turn id."""
    for question in ("What is this?", "How many? 12", "café 😀"):
        for ours, original in _turn_ids(llava, question, ANSWERS):
            assert ours == original


def _random_texts(count: int, seed: int, *, leading: bool = False) -> list[str]:
    """Texts drawn from the corpus' words, digits, punctuation, runs of spaces, newlines, tabs and characters the
    model has no piece for (byte fallback); `leading`: each starts with whitespace or "▁", else none does."""
    import random

    rng = random.Random(seed)
    parts = [*CORPUS_WORDS.split(), "12", "3.5", ",", "?!", "  ", "   ", "\n", "\n\n", "\t", "é", "😀", "中文", "▁"]
    starts = (" ", "  ", "\n", "\t", "\u2581", " \u2581", "\n ")
    texts = []
    for _ in range(count):
        text = "".join(rng.choice(parts) + rng.choice(["", " ", " ", ""]) for _ in range(rng.randint(1, 12)))
        text = text.lstrip(" \t\n\u2581") or "x"
        texts.append(rng.choice(starts) + text if leading else text)
    return texts


@pytest.mark.slow
def test_llava_random_texts_have_the_original_ids(llava: dict[str, Any]) -> None:
    """The fast BPE (merges ranked by piece) against SentencePiece's own merging, over many questions and answers."""
    processor, slow = llava["processor"], llava["slow"]
    questions, answers = _random_texts(60, seed=1), _random_texts(60, seed=2)
    for question in questions:
        expected = slow.image_token(_llava_v1([("USER", question), ("ASSISTANT", None)]))
        assert _prompt_ids(processor, [], question=question) == expected, question
    for question in questions[:3]:
        for ours, original in _turn_ids(llava, question, answers):
            assert ours == original, question


@pytest.mark.slow
def test_llava_answers_with_leading_whitespace_have_the_ids_of_the_original_turn(llava: dict[str, Any]) -> None:
    """Tokenized alone, an answer starting with a space or "▁" got no "▁" from the fast Metaspace where SentencePiece,
    reading it after "ASSISTANT: ", puts one (one "▁" short); it is tokenized after the template's "ASSISTANT:"."""
    for ours, original in _turn_ids(llava, "What is this?", LEADING_WHITESPACE_ANSWERS):
        assert ours == original
    for ours, original in _turn_ids(llava, "How many? 12", _random_texts(40, seed=3, leading=True)):
        assert ours == original


OMNILMM_IMAGE_TOKENS = ("<im_patch>", "<im_start>", "<im_end>")


@pytest.fixture(scope="module")
def omnilmm(spm_model: bytes, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A converted OmniLMM folder's processor, the original's tokenizer (transformers 4.36's fast conversion: the
    slow legacy=True rule) and Zephyr's template as the original rendered it."""
    from jinja2 import Environment
    from safetensors.torch import load_file, save_file

    from rlaifv.convert.omnilmm import convert_omnilmm
    from rlaifv.reward.models import load_processor
    from rlaifv.testing.tiny_families import ZEPHYR_TEMPLATE, build_tiny_omnilmm_original

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("omnilmm-spm")
    original = build_tiny_omnilmm_original(root / "original")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (original / name).unlink(missing_ok=True)
    (original / "tokenizer.model").write_bytes(spm_model)
    slow = SlowLlamaTokenizer(spm_model, legacy=True, specials=LLAMA_SPECIALS + OMNILMM_IMAGE_TOKENS)
    size = slow.sp.get_piece_size()
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    added = {str(size + i): {**special, "content": token} for i, token in enumerate(OMNILMM_IMAGE_TOKENS)}
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "legacy": False,
        "chat_template": ZEPHYR_TEMPLATE,
        "tokenizer_class": "LlamaTokenizer",
    }
    (original / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps({**config, "vocab_size": size + len(OMNILMM_IMAGE_TOKENS)}))
    for shard in original.glob("*.safetensors"):
        tensors = load_file(str(shard))
        for key in [k for k in tensors if k.endswith(("embed_tokens.weight", "lm_head.weight"))]:
            tensors[key] = torch.randn(size + len(OMNILMM_IMAGE_TOKENS), tensors[key].shape[1])
        save_file(tensors, str(shard), metadata={"format": "pt"})
    return {
        "processor": load_processor(convert_omnilmm(original, root / "hf")),
        "slow": slow,
        "zephyr": Environment(trim_blocks=True, lstrip_blocks=True).from_string(ZEPHYR_TEMPLATE),
    }


def _omnilmm_text(omnilmm: dict[str, Any], question: str, images: list[Image.Image], answer: str | None) -> str:
    """OmniLMM's conversation text: its system turn, the user turn (image block first), the answer's turn or the
    generation prompt."""
    from rlaifv.reward.omnilmm.processing import DEFAULT_SYSTEM

    block = "<im_start>" + "<im_patch>" * omnilmm["processor"].num_query + "<im_end>\n"
    turns = [
        {"role": "system", "content": DEFAULT_SYSTEM},
        {"role": "user", "content": (block if images else "") + question},
    ]
    if answer is not None:
        turns.append({"role": "assistant", "content": answer})
    return str(omnilmm["zephyr"].render(messages=turns, eos_token="</s>", add_generation_prompt=answer is None))


@pytest.mark.slow
def test_omnilmm_prompts_have_the_ids_of_the_original_fast_tokenizer(omnilmm: dict[str, Any]) -> None:
    """OmniLMM's code had transformers 4.36 convert tokenizer.model: its normalizer puts "▁" before every text
    between special tokens (after `</s>` and `<im_end>` too), SentencePiece's legacy behaviour, whatever the folder's
    `legacy` (False here); the converted folder lost that "▁" once saved and loaded again."""
    for question in QUESTIONS:
        for images in ([IMAGE], []):
            text = _omnilmm_text(omnilmm, question, images, None)
            assert _prompt_ids_plain(omnilmm["processor"], images, question) == omnilmm["slow"](text), (
                question,
                images,
            )


@pytest.mark.slow
def test_omnilmm_answers_have_the_ids_of_the_original_turn(omnilmm: dict[str, Any]) -> None:
    """The original tokenized the whole conversation, the answer right after "<|assistant|>\n" (no "▁" before its
    first word); tokenized alone, the converted tokenizer's Metaspace gave the answer a leading "▁" (11 of 13
    answers differed). Answers are read after the template's generation prompt; "</s>" closes the turn."""
    from rlaifv.reward.prompt import encode_answers, end_of_turn_id

    processor, slow = omnilmm["processor"], omnilmm["slow"]
    answers = [
        *ANSWERS,
        *LEADING_WHITESPACE_ANSWERS,
        *_random_texts(40, seed=4),
        *_random_texts(20, seed=5, leading=True),
    ]
    eot = end_of_turn_id(processor.tokenizer, processor=processor)
    for question, images in (("What is this?", [IMAGE]), ("How many? 12", [])):
        prompt = _prompt_ids_plain(processor, images, question)
        for answer, ids in zip(answers, encode_answers(processor, answers, eot_id=eot), strict=True):
            original = slow(_omnilmm_text(omnilmm, question, images, answer))
            assert prompt + ids == original[: len(prompt) + len(ids)], answer
            assert ids[-1] == eot == slow("</s>")[-1]


def _prompt_ids_plain(processor: Any, images: list[Image.Image], question: str) -> list[int]:
    from rlaifv.reward.prompt import encode_prompt

    return [int(t) for t in encode_prompt(processor, images, question).input_ids]
