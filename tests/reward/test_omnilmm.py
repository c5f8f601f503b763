"""OmniLMM (RLAIF-V-12B): the native implementation against the published layout and an independent forward.

The per-family exactness tests (shared prefix == full forward in scoring, sampling, the judge's
continuations and a LoRA pair) run on the tiny OmniLMM through `tests/reward/test_families.py`.
Here: the architecture the published config describes has the published checkpoint's tensors;
a tiny random instance built from the same config keys loads through the project's loading path
and equals a forward written from the original sources (timm's Eva, OmniLMM's resampler and
splice, transformers' own Mistral); the prompt renders as OmniLMM renders it; published-style
folders convert, pair into a bundle and serve best-of-n.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rlaifv.reward.errors import ModelLoadError
from rlaifv.reward.models import load_model, load_processor
from rlaifv.reward.omnilmm import register
from rlaifv.reward.omnilmm.configuration import OmniLMMConfig
from rlaifv.reward.omnilmm.modeling import published_layout
from rlaifv.reward.omnilmm.processing import DEFAULT_SYSTEM, OMNILMM_CHAT_TEMPLATE
from rlaifv.reward.omnilmm.resampler import sincos_table
from rlaifv.reward.prompt import encode_answer, encode_prompt, end_of_turn_id
from rlaifv.testing.tiny_families import (
    OMNILMM_PUBLISHED_CONFIG,
    ZEPHYR_TEMPLATE,
    build_tiny_family,
    build_tiny_omnilmm_original,
)

QUESTION = "Describe the image."

# Names and shapes in RLAIF-V-12B's model.safetensors.index.json, derived from the original module tree
# (OmniLMMModel = MistralModel + timm Eva with blocks[-1] = Identity + Resampler; lm_head). The hub lists
# the index at 1137 lines: 1130 entries plus 7 lines of JSON structure.
PUBLISHED_TENSORS = {
    "model.embed_tokens.weight": (32009, 4096),
    "model.layers.0.self_attn.q_proj.weight": (4096, 4096),
    "model.layers.0.self_attn.k_proj.weight": (1024, 4096),
    "model.layers.31.mlp.down_proj.weight": (4096, 14336),
    "model.layers.31.post_attention_layernorm.weight": (4096,),
    "model.norm.weight": (4096,),
    "lm_head.weight": (32009, 4096),
    "model.vision_tower.cls_token": (1, 1, 1792),
    "model.vision_tower.pos_embed": (1, 257, 1792),
    "model.vision_tower.patch_embed.proj.weight": (1792, 3, 14, 14),
    "model.vision_tower.blocks.0.attn.qkv.weight": (5376, 1792),
    "model.vision_tower.blocks.0.attn.q_bias": (1792,),
    "model.vision_tower.blocks.0.attn.v_bias": (1792,),
    "model.vision_tower.blocks.62.mlp.fc1.weight": (15360, 1792),
    "model.vision_tower.blocks.62.norm2.bias": (1792,),
    "model.vision_tower.norm.weight": (1792,),
    "model.resampler.query": (256, 4096),
    "model.resampler.pos_embed": (256, 4096),
    "model.resampler.kv_proj.weight": (4096, 1792),
    "model.resampler.attn.in_proj_weight": (12288, 4096),
    "model.resampler.attn.out_proj.weight": (4096, 4096),
    "model.resampler.ln_post.bias": (4096,),
    "model.resampler.proj": (4096, 4096),
}
# The five safetensors shards of RLAIF-V-12B as the hub lists them (GB, two decimals): 23.23 GB of bfloat16.
PUBLISHED_SHARD_GB = (4.94, 5.0, 4.96, 4.97, 3.36)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.set_num_threads(1)
    folder = build_tiny_family("omnilmm", tmp_path_factory.mktemp("omnilmm"))
    return {"folder": folder, "model": load_model(folder, device="cpu"), "processor": load_processor(folder)}


def _pattern(key: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", key)


def test_the_published_config_describes_the_published_checkpoint() -> None:
    from rlaifv.reward.omnilmm.modeling import OmniLMMForCausalLM

    register()
    config = OmniLMMConfig.from_dict(OMNILMM_PUBLISHED_CONFIG)
    layout = published_layout(config)
    assert len(layout) == 1130
    for key, shape in PUBLISHED_TENSORS.items():
        assert layout.get(key) == shape, key
    assert not [k for k in layout if "blocks.63." in k or "k_bias" in k or "rotary" in k]  # last block removed
    total = sum(2 * math.prod(shape) for shape in layout.values())
    assert abs(total - sum(PUBLISHED_SHARD_GB) * 1e9) < 0.03e9, total
    with torch.device("meta"):  # shapes only: a 448 px image through 63 EVA-E blocks -> 256 tokens of width 4096
        features = OmniLMMForCausalLM(config).model.get_image_features(torch.empty(2, 3, 448, 448))
    assert tuple(features.shape) == (2, 256, 4096)


def test_the_tiny_instance_has_the_published_keys_and_layout(tiny: dict[str, Any]) -> None:
    from safetensors import safe_open

    folder = tiny["folder"]
    saved = json.loads((folder / "config.json").read_text())
    renamed = {"rope_theta": "rope_parameters", "torch_dtype": "dtype", "_name_or_path": None}  # transformers 5
    for key in OMNILMM_PUBLISHED_CONFIG:
        assert renamed.get(key, key) is None or renamed.get(key, key) in saved, key
    ours = {"im_start_token_id", "im_end_token_id", "im_patch_token_id", "mm_vision_config", "head_dim"}
    assert set(saved) - {renamed.get(k, k) for k in OMNILMM_PUBLISHED_CONFIG} == ours
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        stored = set(handle.keys())
    full = published_layout(OmniLMMConfig.from_dict(OMNILMM_PUBLISHED_CONFIG))
    assert {_pattern(k) for k in stored} == {_pattern(k) for k in full}
    from transformers import AutoModelForImageTextToText

    _, info = AutoModelForImageTextToText.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def _independent_logits(folder: Path, input_ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """OmniLMM's forward written from the sources and the published weights, not from `reward.omnilmm`."""
    from safetensors.torch import load_file
    from transformers import MistralConfig, MistralForCausalLM

    raw = json.loads((folder / "config.json").read_text())
    w = load_file(str(folder / "model.safetensors"))
    tower = raw["mm_vision_config"]
    dim, heads, patch = tower["embed_dim"], tower["num_heads"], tower["patch_size"]
    grid0 = tower["img_size"] // patch

    def norm(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], w[prefix + ".weight"], w[prefix + ".bias"], 1e-6)

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int) -> torch.Tensor:
        split = [t.reshape(t.shape[0], t.shape[1], n_heads, -1).transpose(1, 2) for t in (q, k, v)]
        scores = split[0] @ split[1].transpose(-1, -2) / math.sqrt(split[0].shape[-1])
        return (scores.softmax(-1) @ split[2]).transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)

    # timm Eva (eva02_enormous): conv patches, class token, bicubic-antialiased pos embed, post-norm blocks.
    x = F.conv2d(
        pixels,
        w["model.vision_tower.patch_embed.proj.weight"],
        w["model.vision_tower.patch_embed.proj.bias"],
        stride=patch,
    )
    batch, _, h, wd = x.shape
    x = x.flatten(2).transpose(1, 2)
    pos = w["model.vision_tower.pos_embed"]
    grid_pos = F.interpolate(
        pos[:, 1:].reshape(1, grid0, grid0, dim).permute(0, 3, 1, 2), size=(h, wd), mode="bicubic", antialias=True
    )
    pos = torch.cat([pos[:, :1], grid_pos.permute(0, 2, 3, 1).reshape(1, h * wd, dim)], dim=1)
    x = torch.cat([w["model.vision_tower.cls_token"].expand(batch, -1, -1), x], dim=1) + pos
    for i in range(tower["depth"] - 1):
        b = f"model.vision_tower.blocks.{i}."
        qkv = x @ w[b + "attn.qkv.weight"].T
        q, k, v = qkv.chunk(3, dim=-1)
        a = attention(q + w[b + "attn.q_bias"], k, v + w[b + "attn.v_bias"], heads)
        x = x + norm(a @ w[b + "attn.proj.weight"].T + w[b + "attn.proj.bias"], b + "norm1")
        m = F.gelu(x @ w[b + "mlp.fc1.weight"].T + w[b + "mlp.fc1.bias"])
        x = x + norm(m @ w[b + "mlp.fc2.weight"].T + w[b + "mlp.fc2.bias"], b + "norm2")
    patches = norm(x, "model.vision_tower.norm")[:, 1:]
    # OmniLMM's resampler: sin-cos table on the queries, bicubically resized (no antialias) on the keys.
    r = "model.resampler."
    table = w[r + "pos_embed"]
    q_side, k_side = int(math.sqrt(table.shape[0])), int(math.sqrt(patches.shape[1]))
    key_pos = F.interpolate(
        table.reshape(1, q_side, q_side, -1).permute(0, 3, 1, 2), size=(k_side, k_side), mode="bicubic"
    )
    key_pos = key_pos.permute(0, 2, 3, 1).reshape(k_side * k_side, -1)
    kv = norm(patches @ w[r + "kv_proj.weight"].T, r + "ln_kv")
    query = (norm(w[r + "query"], r + "ln_q") + table).expand(batch, -1, -1)
    wq, wk, wv = w[r + "attn.in_proj_weight"].chunk(3)
    bq, bk, bv = w[r + "attn.in_proj_bias"].chunk(3)
    out = attention(query @ wq.T + bq, (kv + key_pos) @ wk.T + bk, kv @ wv.T + bv, raw["hidden_size"] // 128)
    out = out @ w[r + "attn.out_proj.weight"].T + w[r + "attn.out_proj.bias"]
    features = norm(out, r + "ln_post") @ w[r + "proj"]
    # The splice of OmniLMMModel.forward: features replace the num_query embeddings after each <im_start>.
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    text = MistralConfig(
        **{k: raw[k] for k in keys},
        num_key_value_heads=raw["num_key_value_heads"],
        rms_norm_eps=raw["rms_norm_eps"],
        sliding_window=raw["sliding_window"],
        max_position_embeddings=raw["max_position_embeddings"],
    )
    lm = MistralForCausalLM(text).eval()
    lm.load_state_dict(
        {k: v for k, v in w.items() if k.startswith(("model.embed_tokens", "model.layers", "model.norm", "lm_head"))}
    )
    embeds = lm.get_input_embeddings()(input_ids)[0]
    starts = (input_ids[0] == raw["im_start_token_id"]).nonzero().flatten().tolist()
    for image, start in enumerate(starts):
        n = features.shape[1]
        assert int(input_ids[0, start + n + 1]) == raw["im_end_token_id"]
        embeds = torch.cat([embeds[: start + 1], features[image], embeds[start + n + 1 :]])
    return lm(inputs_embeds=embeds.unsqueeze(0)).logits


def _redrawn_copy(folder: Path, target: Path) -> Path:
    """The tiny folder with every tensor redrawn at scales that make each one matter.

    Fresh initialisation leaves the q/v biases at zero, the norms at identity and attention nearly uniform,
    which would hide a misplaced bias or norm; here biases and norm gains are random and attention is peaked.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, target)
    generator = torch.Generator().manual_seed(5)
    redrawn = {}
    for key, value in load_file(str(folder / "model.safetensors")).items():
        noise = torch.randn(value.shape, generator=generator)
        if value.dim() == 1 and re.search(r"(norm|ln_)[^.]*\.weight$|layernorm\.weight$", key):
            redrawn[key] = 1.0 + 0.3 * noise
        elif value.dim() == 1:
            redrawn[key] = 0.3 * noise
        else:
            redrawn[key] = 2.0 * noise / math.sqrt(value.shape[-1])
    save_file(redrawn, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@torch.no_grad()
def test_the_model_equals_a_forward_written_from_the_original_sources(tiny: dict[str, Any], tmp_path: Path) -> None:
    folder = _redrawn_copy(tiny["folder"], tmp_path / "redrawn")
    model = load_model(folder, device="cpu")
    images = [Image.new("RGB", (48, 48), (200, 30, 30)), Image.new("RGB", (96, 40), (30, 180, 60))]
    prompt = encode_prompt(tiny["processor"], images, QUESTION)
    ids = prompt.input_ids.unsqueeze(0)
    ours = model(input_ids=ids, pixel_values=prompt.vision["pixel_values"]).logits
    truth = _independent_logits(folder, ids, prompt.vision["pixel_values"])
    worst, scale = float((ours - truth).abs().max()), float(truth.abs().max())
    print(f"omnilmm vs independent forward: max abs logit difference {worst:.1e} (logits up to {scale:.1f})")
    assert worst < 1e-4 * scale, worst


def test_the_prompt_renders_as_omnilmm_renders_it(tiny: dict[str, Any]) -> None:
    """OmniLMM (chat.py + omni_preprocess): image block + "\\n" + question, its system turn, Zephyr's template."""
    from jinja2 import Environment

    processor = tiny["processor"]
    assert processor.chat_template == OMNILMM_CHAT_TEMPLATE
    block = "<im_start>" + "<im_patch>" * 16 + "<im_end>"
    zephyr = Environment(trim_blocks=True, lstrip_blocks=True).from_string(ZEPHYR_TEMPLATE)  # transformers 4.36's
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a red circle."}]},
            {"role": "user", "content": [{"type": "text", "text": "Is it red?"}]},
        ],
    ]
    for messages in conversations:
        original = [{"role": "system", "content": DEFAULT_SYSTEM}]
        for message in messages:
            text = "".join(p["text"] for p in message["content"] if p["type"] == "text")
            has_image = any(p["type"] == "image" for p in message["content"])
            original.append({"role": message["role"], "content": block + "\n" + text if has_image else text})
        expected = zephyr.render(messages=original, eos_token="</s>", add_generation_prompt=True)
        ours = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert processor.expand(ours) == expected
    prompt = encode_prompt(processor, [Image.new("RGB", (40, 40))], QUESTION)
    tokens = processor.tokenizer.convert_ids_to_tokens(prompt.input_ids.tolist())
    assert tokens[:2] == ["<s>", "<|system|>"] and tokens.count("<im_patch>") == 16
    assert tokens[-4:] == ["</s>", "\n", "<|assistant|>", "\n"]


def test_images_get_the_omnilmm_evaluation_transform(tiny: dict[str, Any]) -> None:
    """Resize((448, 448), bicubic) on the PIL image, ToTensor, Normalize(OpenAI CLIP): whatever the aspect ratio."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 70, 3), dtype=np.uint8))
    pixels = tiny["processor"].image_processor([image])["pixel_values"]
    resized = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    expected = ((resized - mean) / std).transpose(2, 0, 1)
    assert pixels.shape == (1, 3, 32, 32)
    assert np.abs(pixels[0].numpy() - expected).max() < 1e-6


def test_the_resampler_table_is_the_original_2d_sincos() -> None:
    """The NumPy construction of omnilmm/model/resampler.py (w on the first half of the channels)."""
    dim, grid = 16, 3
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    expected = np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], axis=1)
    assert np.abs(sincos_table(dim, grid).numpy() - expected).max() < 1e-6


@torch.no_grad()
def test_published_folders_convert_pair_into_a_bundle_and_serve_best_of_n(tmp_path: Path) -> None:
    """RLAIF-V-12B ships safetensors, OmniLMM-12B (its reference) one pickled .bin; neither has a processor."""
    from rlaifv.convert.omnilmm import convert_omnilmm
    from rlaifv.reward.bundle import load_bundle
    from rlaifv.reward.bundle_create import create_bundle, describe_bundle
    from rlaifv.reward.logprobs import full_forward_logprobs

    torch.set_num_threads(1)
    policy = convert_omnilmm(build_tiny_omnilmm_original(tmp_path / "rlaifv-12b", seed=1), tmp_path / "hf-policy")
    reference = convert_omnilmm(
        build_tiny_omnilmm_original(tmp_path / "omnilmm-12b", seed=0, weights="bin"), tmp_path / "hf-reference"
    )
    config = json.loads((policy / "config.json").read_text())
    assert set(config) - set(OMNILMM_PUBLISHED_CONFIG) == {
        "mm_vision_config", "im_start_token_id", "im_end_token_id", "im_patch_token_id",
    }  # fmt: skip
    create_bundle(tmp_path / "bundle", policy=policy, reference=reference, name="rlaifv-12b-tiny")
    described = describe_bundle(tmp_path / "bundle")
    assert (described.policy.model_type, described.policy.architecture) == ("omnilmm", "OmniLMMForCausalLM")
    pair = load_bundle(tmp_path / "bundle", device="cpu")
    image = Image.new("RGB", (60, 40), (200, 30, 30))
    ranking = pair.best_of_n(image, QUESTION, n=3, max_tokens=5, seed=3)
    assert len(ranking.candidates) == 3
    prompt = encode_prompt(pair.processor, [image], QUESTION)
    eot = end_of_turn_id(pair.tokenizer)
    scored = pair.score(image, QUESTION, ["a red circle.", "two dogs"])
    for candidate in scored.candidates:
        ids = encode_answer(pair.tokenizer, candidate.text, eot_id=eot)
        assert abs(candidate.policy_logprob - float(full_forward_logprobs(pair.policy, prompt, ids).sum())) < 1e-4
        assert abs(candidate.reference_logprob - float(full_forward_logprobs(pair.reference, prompt, ids).sum())) < 1e-4


def test_the_converter_refuses_a_checkpoint_that_does_not_match_its_config(tmp_path: Path) -> None:
    from rlaifv.convert.omnilmm import convert_omnilmm

    original = build_tiny_omnilmm_original(tmp_path / "original")
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps({**config, "num_query": 64}))
    with pytest.raises(ModelLoadError, match="of another shape"):
        convert_omnilmm(original, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@torch.no_grad()
def test_images_without_image_token_ids_name_the_converter(tmp_path: Path) -> None:
    """The published config.json has no token ids: the weights load, images are refused with the fix."""
    original = build_tiny_omnilmm_original(tmp_path / "original")
    model = load_model(original, device="cpu")
    with pytest.raises(ValueError, match=r"rlaifv convert omnilmm"):
        model(input_ids=torch.tensor([[1, 2, 3]]), pixel_values=torch.zeros(1, 3, 32, 32))


def test_the_command_converts_and_names_the_next_step(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rlaifv.cli.main import app

    original = build_tiny_omnilmm_original(tmp_path / "original")
    runner = CliRunner()
    args = ["convert", "omnilmm", str(original), "-o", str(tmp_path / "out")]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "rlaifv bundle create --policy" in first.output
    again = runner.invoke(app, args)  # not empty, no --force
    assert again.exit_code == 1
    assert "exists and is not empty" in again.output


def test_a_slow_only_tokenizer_names_the_missing_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The published folders ship only tokenizer.model; converting it needs sentencepiece and protobuf (dev
    dependencies, so faked missing here)."""
    from rlaifv.convert.omnilmm import convert_omnilmm

    monkeypatch.setattr("rlaifv.convert.llava._has_module", lambda util, name: name != "sentencepiece")  # shared check
    original = build_tiny_omnilmm_original(tmp_path / "original")
    (original / "tokenizer.json").unlink()
    (original / "tokenizer.model").write_bytes(b"not read: the packages are checked first")
    with pytest.raises(ModelLoadError, match="pip install sentencepiece"):
        convert_omnilmm(original, tmp_path / "out")


def test_the_command_refuses_an_output_holding_the_current_folder(tmp_path: Path, monkeypatch) -> None:
    """`-o . --force` deleted the current folder's contents and wrote nothing (the partial folder was inside it)."""
    import shlex

    from typer.testing import CliRunner

    from rlaifv.cli.main import app

    original = build_tiny_omnilmm_original(tmp_path / "original")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)
    result = CliRunner().invoke(app, ["convert", "omnilmm", str(original), "-o", ".", "--force"])
    assert result.exit_code == 1 and "holds the current folder" in result.output, result.output
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    converted = CliRunner().invoke(app, ["convert", "omnilmm", str(original), "-o", "../omni out"])
    assert converted.exit_code == 0, converted.output
    assert (tmp_path / "omni out" / "config.json").is_file() and not list(tmp_path.glob(".*partial"))
    assert f"--policy {shlex.quote(str(tmp_path / 'omni out'))} " in converted.output
