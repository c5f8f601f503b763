"""The LLaVA converter against an independent forward written from the original weights.

A tiny checkpoint is built offline in the original LLaVA-repo layout (Llama keys + `model.mm_projector.0/2`, config
with `mm_*` keys) beside a tiny CLIP folder, converted, and loaded through the auto classes. The reference forward
never touches the converted folder: CLIP penultimate-layer patch features -> Linear-GELU-Linear with the original
projector tensors -> spliced into a plain LlamaForCausalLM's input embeddings where the original puts its
placeholder (-200).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rlaifv.convert.llava import LLAVA_V1_SYSTEM, convert_llava
from rlaifv.reward.errors import ModelLoadError

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_PX = 42
PATCH = 14
MM_HIDDEN = 32
HIDDEN = 64


def _tokenizer() -> Any:
    """A sentencepiece-free Llama-style tokenizer (Metaspace + byte fallback), as a tokenizer.json folder has.

    It does not add BOS by itself (add_bos_token unset), which the converter must correct: the original prompts
    always start with <s>.
    """
    from transformers import LlamaTokenizer

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁"]
    pieces += [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:.,?'"]
    merges = [("▁", c) for c in "abcdefghijklmnopqrstuvwxyzAU"]
    pieces += ["".join(pair) for pair in merges]
    return LlamaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=merges)


def _llama_config(vocab: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        pad_token_id=0,
    )


def _original_config(vocab: int, **overrides: Any) -> dict[str, Any]:
    """config.json as the LLaVA repo writes it: LlamaConfig keys plus the mm_* keys."""
    config = {
        "_name_or_path": "tiny-llava-v1.5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "use_cache": True,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": MM_HIDDEN,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "use_mm_proj": True,
    }
    config.update(overrides)
    return config


def _vision_folder(folder: Path, *, full_clip: bool, seed: int = 1) -> Any:
    """A tiny CLIP folder; `full_clip` saves a CLIPModel, as openai/clip-vit-large-patch14-336 is."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    vision_config = CLIPVisionConfig(
        hidden_size=MM_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_PX,
        patch_size=PATCH,
        projection_dim=16,
    )
    if full_clip:
        config = CLIPConfig(
            text_config={
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "vocab_size": 50,
                "max_position_embeddings": 16,
                "projection_dim": 16,
            },
            vision_config=vision_config.to_dict(),
            projection_dim=16,
        )
        full = CLIPModel(config).eval()
        full.save_pretrained(folder)
        tower = CLIPVisionModel(vision_config).eval()
        tower.load_state_dict(full.vision_model.state_dict())
    else:
        tower = CLIPVisionModel(vision_config).eval()
        tower.save_pretrained(folder)
    preprocessor = {
        "crop_size": IMAGE_PX,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "size": IMAGE_PX,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return tower


def _original_folder(
    folder: Path, *, weights: str = "safetensors", embedded_tower: Any = None, projector: bool = True, **config: Any
) -> dict[str, torch.Tensor]:
    """A tiny LLaVA-1.5 checkpoint in the original layout, two shards plus an index; returns its state dict.

    `embedded_tower` (a CLIPVisionModel) is saved under model.vision_tower.vision_tower.vision_model.*, the
    transformers-4 layout the original repo wrote when the tower was part of the model.
    """
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    folder.mkdir(parents=True)
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(folder)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in LlamaForCausalLM(_llama_config(vocab)).state_dict().items()}
    if projector:
        state["model.mm_projector.0.weight"] = torch.randn(HIDDEN, MM_HIDDEN) * 0.2
        state["model.mm_projector.0.bias"] = torch.randn(HIDDEN) * 0.1
        state["model.mm_projector.2.weight"] = torch.randn(HIDDEN, HIDDEN) * 0.2
        state["model.mm_projector.2.bias"] = torch.randn(HIDDEN) * 0.1
    if embedded_tower is not None:
        for key, value in embedded_tower.state_dict().items():
            state[f"model.vision_tower.vision_tower.vision_model.{key}"] = value.clone()
    (folder / "config.json").write_text(json.dumps(_original_config(vocab, **config)))
    keys = sorted(state)
    shards = {1: keys[: len(keys) // 2], 2: keys[len(keys) // 2 :]}
    weight_map = {}
    for number, shard_keys in shards.items():
        if weights == "safetensors":
            name = f"model-{number:05d}-of-00002.safetensors"
            save_file({k: state[k] for k in shard_keys}, str(folder / name), metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{number:05d}-of-00002.bin"
            torch.save({k: state[k] for k in shard_keys}, folder / name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    index = "model.safetensors.index.json" if weights == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


def _reference_logits(
    state: dict[str, torch.Tensor], tower: Any, vocab: int, pre: torch.Tensor, pixels: torch.Tensor, post: torch.Tensor
) -> torch.Tensor:
    """The original LLaVA-1.5 forward: features spliced in at the placeholder between `pre` and `post` ids."""
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM(_llama_config(vocab)).eval()
    language = {k: v for k, v in state.items() if not k.startswith(("model.mm_projector.", "model.vision_tower."))}
    llama.load_state_dict(language, strict=True)
    with torch.no_grad():
        patches = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        hidden = F.gelu(F.linear(patches, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"]))
        features = F.linear(hidden, state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])
        embed = llama.get_input_embeddings()
        inputs = torch.cat([embed(pre), features[0], embed(post)])[None]
        return llama(inputs_embeds=inputs).logits[0]


def _llava_v1_prompt(turns: list[tuple[str, str | None]]) -> str:
    """conv_llava_v1.get_prompt() of the original repo (SeparatorStyle.TWO, sep ' ', sep2 '</s>')."""
    seps = [" ", "</s>"]
    text = LLAVA_V1_SYSTEM + seps[0]
    for i, (role, message) in enumerate(turns):
        text += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return text


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("weights", "full_clip", "embedded", "unfreeze"),
    [("safetensors", True, True, False), ("bin", False, False, False), ("safetensors", False, True, True)],
    ids=["safetensors-clipmodel-stale-embedded-tower", "bin-clipvisionmodel", "unfrozen-tower-from-checkpoint"],
)
def test_converted_logits_match_the_original_forward(
    tmp_path: Path, weights: str, full_clip: bool, embedded: bool, unfreeze: bool
) -> None:
    """The original builder loads CLIP from mm_vision_tower and ignores tower weights saved in the checkpoint,
    unless unfreeze_mm_vision_tower was set; the embedded tower here differs, so the wrong choice shows."""
    from transformers import AutoModelForImageTextToText

    from rlaifv.reward.models import load_processor

    folder_tower = _vision_folder(tmp_path / "clip", full_clip=full_clip, seed=1)
    embedded_tower = _vision_folder(tmp_path / "unused", full_clip=False, seed=2) if embedded else None
    config = {"unfreeze_mm_vision_tower": True} if unfreeze else {}
    state = _original_folder(tmp_path / "original", weights=weights, embedded_tower=embedded_tower, **config)
    tower = embedded_tower if unfreeze else folder_tower
    out = convert_llava(tmp_path / "original", tmp_path / "clip", tmp_path / "hf")

    vocab = state["model.embed_tokens.weight"].shape[0]
    processor = load_processor(out)
    model = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.text_config.vocab_size == vocab + 1
    assert model.config.image_token_index == vocab

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red box."}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 70, 3), dtype=np.uint8))
    batch = processor(images=[image], text=[text], return_tensors="pt")
    ids = batch["input_ids"][0]
    image_positions = (ids == vocab).nonzero().flatten()
    patches = (IMAGE_PX // PATCH) ** 2
    assert image_positions.tolist() == list(range(int(image_positions[0]), int(image_positions[0]) + patches))
    assert ids[0].item() == 1
    assert ids[-1].item() == 2

    with torch.no_grad():
        converted = model(**batch).logits[0]
    start, end = int(image_positions[0]), int(image_positions[-1]) + 1
    reference = _reference_logits(state, tower, vocab, ids[:start], batch["pixel_values"], ids[end:])
    assert converted.shape == (ids.shape[0], vocab + 1)
    diff = (converted[:, :vocab] - reference).abs().max().item()
    print(f"max |logit diff| {diff:.3e}")
    assert diff <= 1e-5, diff
    assert reference.abs().max().item() > 0.1

    embedding = model.get_input_embeddings().weight.detach()
    assert torch.allclose(embedding[vocab], state["model.embed_tokens.weight"].mean(0), atol=1e-6)
    record = json.loads((out / "rlaifv_conversion.json").read_text())
    assert record["vision_weights_from"] == ("original checkpoint" if unfreeze else "vision folder")
    embedded_keys = len(embedded_tower.state_dict()) if embedded_tower is not None else 0
    assert record["dropped_keys"]["count"] == (0 if unfreeze else embedded_keys)
    assert record["tokenizer"]["add_bos_token_forced"] is True
    assert all(p.suffix != ".bin" for p in out.iterdir())


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("convert")
    _original_folder(root / "original")
    _vision_folder(root / "clip", full_clip=False)
    return convert_llava(root / "original", root / "clip", root / "hf")


def test_processor_pads_wide_images_to_a_square_of_the_mean_colour(converted: Path) -> None:
    from rlaifv.reward.models import load_processor

    processor = load_processor(converted)
    width, height = 56, 28
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8))
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0].numpy()

    background = tuple(int(m * 255) for m in CLIP_MEAN)
    square = Image.new("RGB", (width, width), background)
    square.paste(image, (0, (width - height) // 2))
    resized = np.asarray(square.resize((IMAGE_PX, IMAGE_PX), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    expected = ((resized - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)
    assert pixels.shape == (3, IMAGE_PX, IMAGE_PX)
    assert np.abs(pixels - expected).max() <= 1e-5

    mean_colour = (np.array(background) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert np.abs(pixels[:, :6, :] - mean_colour[:, None, None]).max() <= 1e-5
    assert np.abs(pixels[:, -6:, :] - mean_colour[:, None, None]).max() <= 1e-5


def test_chat_template_renders_the_llava_v1_prompt(converted: Path) -> None:
    from rlaifv.reward.models import load_processor
    from rlaifv.reward.prompt import user_message

    processor = load_processor(converted)
    one_turn = processor.apply_chat_template(
        user_message("What is this?", 1), add_generation_prompt=True, tokenize=False
    )
    original = (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nWhat is this? ASSISTANT:"
    )
    assert one_turn == original.replace("<image>\n", "<image> \n")
    # The ids the original repo's `tokenizer_image_token` gives (each text chunk tokenized alone, so the chunk after
    # the image starts with SentencePiece's "▁"): rendered "<image>\n", the converted prompt lost that token.
    tokenizer = processor.tokenizer
    chunks = [tokenizer(chunk).input_ids for chunk in original.split("<image>")]
    first, rest = chunks[0], chunks[1][1:] if chunks[1][:1] == [tokenizer.bos_token_id] else chunks[1]
    assert tokenizer(one_turn).input_ids == [*first, processor.image_token_id, *rest]
    messages = [
        *user_message("What is this?", 1),
        {"role": "assistant", "content": [{"type": "text", "text": "A box."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which colour?"}]},
    ]
    two_turns = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert two_turns == _llava_v1_prompt(
        [("USER", "<image> \nWhat is this?"), ("ASSISTANT", "A box."), ("USER", "Which colour?"), ("ASSISTANT", None)]
    )
    custom = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, *user_message("Hi?", 0)]
    rendered = processor.apply_chat_template(custom, add_generation_prompt=True, tokenize=False)
    assert rendered == "Be brief. USER: Hi? ASSISTANT:"
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert tokenizer.pad_token == "<unk>"


def test_a_folder_without_projector_weights_is_refused(tmp_path: Path) -> None:
    _original_folder(tmp_path / "original", projector=False)
    _vision_folder(tmp_path / "clip", full_clip=False)
    with pytest.raises(ModelLoadError, match=r"no projector weights \(model\.mm_projector\.0\.weight"):
        convert_llava(tmp_path / "original", tmp_path / "clip", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"mm_projector_type": "linear"}, "unsupported mm_projector_type 'linear'"),
        ({"mm_hidden_size": 48}, "hidden_size 32 but the checkpoint's projector expects mm_hidden_size 48"),
        ({"image_aspect_ratio": "anyres"}, "unsupported image_aspect_ratio 'anyres'"),
        ({"unfreeze_mm_vision_tower": True}, "no model.vision_tower.vision_tower.* weights"),
    ],
)
def test_unconvertible_configs_are_refused(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    _original_folder(tmp_path / "original", **config)
    _vision_folder(tmp_path / "clip", full_clip=False)
    with pytest.raises(ModelLoadError, match=message.replace("(", r"\(").replace("*", r"\*")):
        convert_llava(tmp_path / "original", tmp_path / "clip", tmp_path / "hf")


def test_a_slow_only_tokenizer_names_the_missing_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without sentencepiece (a dev dependency, so faked missing here), converting tokenizer.model names it."""
    monkeypatch.setattr("rlaifv.convert.llava._has_module", lambda util, name: name != "sentencepiece")
    _original_folder(tmp_path / "original")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "original" / name).unlink(missing_ok=True)
    (tmp_path / "original" / "tokenizer.model").write_bytes(b"\x00")
    _vision_folder(tmp_path / "clip", full_clip=False)
    with pytest.raises(ModelLoadError, match="needs the sentencepiece"):
        convert_llava(tmp_path / "original", tmp_path / "clip", tmp_path / "hf")


def test_cli_converts_and_names_the_next_step(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rlaifv.convert.cli import convert_app

    _original_folder(tmp_path / "original")
    (tmp_path / "original" / "generation_config.json").write_text('{"eos_token_id": 2, "max_length": 4096}')
    _vision_folder(tmp_path / "clip", full_clip=False)
    args = ["llava", str(tmp_path / "original"), "--vision", str(tmp_path / "clip"), "-o", str(tmp_path / "hf")]
    result = CliRunner().invoke(convert_app, [*args, "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["max_length"] == 4096  # was dropped
    assert "rlaifv bundle create --policy" in result.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    again = CliRunner().invoke(convert_app, args)
    assert again.exit_code == 1
    assert "not empty" in again.output


def test_an_output_holding_the_current_folder_is_refused_and_nothing_is_deleted(tmp_path: Path, monkeypatch) -> None:
    """`-o . --force` deleted the current folder's contents and wrote nothing (the partial folder was inside it)."""
    from typer.testing import CliRunner

    from rlaifv.convert.cli import convert_app

    _original_folder(tmp_path / "original")
    _vision_folder(tmp_path / "clip", full_clip=False)
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work / "sub")
    for output in (".", "..", "../sub/."):
        args = ["llava", str(tmp_path / "original"), "--vision", str(tmp_path / "clip"), "-o", output, "--force"]
        result = CliRunner().invoke(convert_app, args)
        assert result.exit_code == 1, result.output
        assert "holds the current folder" in result.output, result.output
    assert (work / "notes.txt").read_text() == "keep me" and (work / "sub").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "original", "work"]
    out = convert_llava(tmp_path / "original", tmp_path / "clip", Path("../hf"))  # relative, beside the cwd
    assert out == work / "hf" and (out / "config.json").is_file()
    assert not list(work.glob(".*partial"))


def test_cli_hints_name_the_flag_and_quote_paths(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rlaifv.convert.cli import convert_app

    _original_folder(tmp_path / "original")
    _vision_folder(tmp_path / "clip", full_clip=False)
    output = tmp_path / "hf llava"
    args = ["llava", str(tmp_path / "original"), "--vision", str(tmp_path / "clip"), "-o", str(output)]
    result = CliRunner().invoke(convert_app, args)
    assert result.exit_code == 0, result.output
    assert f"rlaifv bundle create --policy '{output}' --reference" in result.output
    again = CliRunner().invoke(convert_app, args)
    assert again.exit_code == 1 and "--force" in again.output, again.output
    assert CliRunner().invoke(convert_app, [*args, "--force"]).exit_code == 0  # an earlier conversion: replaced
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "todo.txt").write_text("keep me")
    refused = CliRunner().invoke(convert_app, [*args[:-1], str(mine), "--force"])
    assert refused.exit_code == 1 and "holds other files" in refused.output, refused.output
    assert (mine / "notes" / "todo.txt").read_text() == "keep me"  # --force deleted a user's folder whole
