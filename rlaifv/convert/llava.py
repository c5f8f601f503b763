"""Original LLaVA-1.5 checkpoints (`model_type: llava_llama`) -> transformers `LlavaForConditionalGeneration` folders.

RLAIF-V-7B and its reference, llava-v1.5-7b, are published in the layout of the original LLaVA repository, which
the auto classes cannot load. The converter reproduces what the original code does at inference time:

* the CLIP tower comes from the separate vision folder (`mm_vision_tower`), because the original builder loads it
  from there and ignores tower weights saved in the checkpoint, unless `unfreeze_mm_vision_tower` was set;
* `image_aspect_ratio: pad` pads to a square filled with the CLIP mean colour before the CLIP preprocessing;
* features are CLIP hidden_states[mm_vision_select_layer] without CLS, through Linear-GELU-Linear;
* prompts follow the `llava_v1` conversation template, assistant turns closed by `</s>`;
* token ids are those of the original's slow `LlamaTokenizer` (transformers 4.3x, `use_fast=False`) and
  `tokenizer_image_token`: the fast tokenizer gets the folder's `legacy` flag as 4.3x read it (absent means True;
  transformers 5 would take False) and always its "▁" prefix, and the template writes the text the fast
  tokenizer needs to give the same ids (`LLAVA_V1_CHAT_TEMPLATE`).

The original splices features at a negative placeholder id (-200); the HF format needs a real `<image>` token, so
one is appended to the vocabulary and the embedding and LM-head matrices grow by one row (the mean of the others:
the row is overwritten by image features on input and the token is never a sampling target). Its logit still
enters the log-softmax's normaliser: being the mean of the other logits, it adds at most 1/V of the sum (Jensen),
so every log-prob moves by at most log(1 + 1/V), 3e-5 nats per token for V = 32000, the same in the policy and
the reference (the reward, their difference, moves by far less; the probe of 2026-12-07 measured 2.5e-6).

Weights are streamed shard by shard, so converting a 7B model needs about one shard of memory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaifv.reward.bundle import umask_modes
from rlaifv.reward.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "float32", "float16", "bfloat16")
IMAGE_TOKEN = "<image>"
CONVERSION_FILE = "rlaifv_conversion.json"
ORIGINAL_MODEL_TYPES = ("llava_llama", "llava")

LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# Written so that the fast tokenizer gives the original's ids: `tokenizer_image_token` tokenizes the text after an
# image on its own, so it starts with SentencePiece's "▁" (written as '<image> \n'), and SentencePiece prefixes "▁"
# to a text even when it starts with a space, where the fast Metaspace prefixes nothing (a leading space is doubled).
LLAVA_V1_CHAT_TEMPLATE = (
    """{%- if messages and messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set system = messages[0]['content'] -%}
    {%- else -%}
        {%- set system = messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') -%}
        {%- set system = system | join('') -%}
    {%- endif -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system = '"""
    + LLAVA_V1_SYSTEM.replace("'", "\\'")
    + """' -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- if (system + ' ')[:1] in [' ', '\u2581'] -%}
    {{- ' ' -}}
{%- endif -%}
{{- system + ' ' -}}
{%- for message in turns -%}
    {%- if message['role'] == 'user' -%}
        {{- 'USER: ' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- 'ASSISTANT: ' -}}
    {%- else -%}
        {{- raise_exception('the llava_v1 template has only user and assistant turns after the system') -}}
    {%- endif -%}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'image' -%}
                {{- '<image> \\n' -}}
            {%- elif part['type'] == 'text' -%}
                {{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {%- if message['role'] == 'user' -%}
        {{- ' ' -}}
    {%- else -%}
        {{- '</s>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'ASSISTANT:' -}}
{%- endif -%}
"""
)

_LLAMA_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pretraining_tp",
    "tie_word_embeddings",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "head_dim",
)
_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
_CLIP_SKIPPED_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
_EMBEDDED_TOWER = "model.vision_tower.vision_tower."
_PROJECTOR = {
    "model.mm_projector.0.": "model.multi_modal_projector.linear_1.",
    "model.mm_projector.2.": "model.multi_modal_projector.linear_2.",
}
_KEY_MAPPING = [
    ["model.mm_projector.0.*", "model.multi_modal_projector.linear_1.*"],
    ["model.mm_projector.2.*", "model.multi_modal_projector.linear_2.*"],
    ["model.embed_tokens.weight", "model.language_model.embed_tokens.weight (+1 row for <image>)"],
    ["model.layers.*", "model.language_model.layers.*"],
    ["model.norm.*", "model.language_model.norm.*"],
    ["lm_head.weight", "lm_head.weight (+1 row for <image>)"],
    ["<vision folder> [vision_model.]*", "model.vision_tower.*"],
    ["model.vision_tower.vision_tower.[vision_model.]*", "model.vision_tower.* (only with unfreeze_mm_vision_tower)"],
]
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_GROWN_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class _Source:
    """Where one output tensor comes from."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str


def convert_llava(original: Path, vision: Path, output: Path, *, dtype: str = "auto", force: bool = False) -> Path:
    """Write an HF `LlavaForConditionalGeneration` folder (safetensors, processor, chat template) to `output`.

    `original` is the LLaVA-repo folder (config.json with `mm_*` keys, weights, Llama tokenizer); `vision` the
    CLIP folder named by `mm_vision_tower` (a CLIPVisionModel or CLIPModel with its preprocessor_config.json).
    The folder is assembled beside `output` and moved in place at the end, so a failed run leaves nothing behind.
    """
    original, vision, output = Path(original), Path(vision), _absolute(output)
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    _check_output(output, sources=(original, vision), force=force)
    config = _read_original_config(original)
    vision_config, image_settings = _read_vision_folder(vision, config)
    tokenizer, image_token_id, tokenizer_notes = _load_tokenizer(original)

    lm_sources = _list_tensors(_weight_files(original, what="original"))
    vision_sources = _vision_sources(config, lm_sources, vision)
    plan, dropped = _plan_language_and_projector(lm_sources, original, tower_used=_tower_in_checkpoint(config))
    plan.update(vision_sources)

    vocab_size = plan["model.language_model.embed_tokens.weight"].shape[0]
    if image_token_id > vocab_size:
        raise ModelLoadError(
            f"the tokenizer of {original} has {image_token_id} tokens before {IMAGE_TOKEN}, "
            f"more than the {vocab_size} rows of model.embed_tokens"
        )
    grow = image_token_id == vocab_size
    llava_config = _llava_config(config, vision_config, image_token_id, vocab_size + int(grow), tokenizer)
    _check_against_model(plan, llava_config, grow=grow)

    import torch

    target = _target_dtype(dtype, config, plan, torch)
    llava_config.dtype = target
    partial = output.parent / f".{output.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        _write_weights(plan, partial, target, grow=grow)
        llava_config.save_pretrained(str(partial))
        processor = _build_processor(tokenizer, image_settings, vision_config, config)
        processor.save_pretrained(str(partial))
        _keep_prefix_rule(partial, legacy=tokenizer_notes["legacy"])
        if (original / "generation_config.json").is_file():  # its eos and sampling defaults, as OmniLMM's is kept
            shutil.copyfile(original / "generation_config.json", partial / "generation_config.json")
        record = {
            "converter": "rlaifv.convert.llava",
            "source_format": "original LLaVA repo (LlavaLlamaForCausalLM)",
            "target_format": "transformers LlavaForConditionalGeneration",
            "original": str(original.resolve()),
            "vision": str(vision.resolve()),
            "vision_weights_from": "original checkpoint" if _tower_in_checkpoint(config) else "vision folder",
            "dtype": str(target).removeprefix("torch."),
            "image_token": IMAGE_TOKEN,
            "image_token_index": image_token_id,
            "vocab_size": {"original": vocab_size, "converted": vocab_size + int(grow)},
            "new_rows": "mean of the original rows" if grow else "none (the token reuses a spare row)",
            "key_mapping": _KEY_MAPPING,
            "dropped_keys": {"count": len(dropped), "examples": dropped[:10]},
            "original_mm_config": {k: v for k, v in config.items() if k.startswith("mm_") or k == "image_aspect_ratio"},
            "image_processor": {"do_pad": image_settings["do_pad"], "background": "CLIP image mean x 255 (int)"},
            "chat_template": "llava_v1",
            "tokenizer": tokenizer_notes,
        }
        (partial / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _replace(output, partial)
    return output


def _absolute(output: str | Path) -> Path:
    """The output as an absolute path with `..` collapsed: its partial folder, `.NAME.partial` beside it, must be a
    sibling (for `-o .` it was `./..partial`, inside the folder that was then deleted)."""
    return Path(os.path.abspath(Path(output).expanduser()))


def _replace(output: Path, partial: Path) -> None:
    """Put the finished `partial` folder in the output's place; an output that is a link is replaced, not followed
    (rmtree refuses links)."""
    if output.is_dir() and not output.is_symlink():
        shutil.rmtree(output)
    elif output.exists() or output.is_symlink():
        output.unlink()
    os.replace(partial, output)


def _check_output(output: Path, *, sources: Iterable[Path], force: bool) -> None:
    """Refuse an output that a replacement would delete with something in it that must stay: an input, or the
    current folder (`-o . --force` emptied the folder one stood in)."""
    resolved = output.resolve()
    for source in sources:
        source = source.resolve()
        if resolved == source or resolved in source.parents or source in resolved.parents:
            raise ModelLoadError(f"output {output} overlaps the input folder {source}")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ModelLoadError(f"output {output} holds the current folder, which writing it would delete: choose another")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not force:
            raise ModelLoadError(f"output {output} exists and is not empty (pass --force to replace it)")
        if not (output / CONVERSION_FILE).is_file():  # --force deleted any folder, a user's own files included
            raise ModelLoadError(
                f"output {output} holds other files, not an earlier conversion (no {CONVERSION_FILE}): --force"
                " replaces only a converted folder; choose another output"
            )


def _read_json(path: Path, *, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{what} {path.parent} has no {path.name}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def _read_original_config(original: Path) -> dict[str, Any]:
    """The original config, refused early where the HF Llava architecture cannot express it."""
    if not original.is_dir():
        raise ModelLoadError(f"original folder {original} does not exist")
    config = _read_json(original / "config.json", what="original folder")
    if "text_config" in config or config.get("model_type") not in ORIGINAL_MODEL_TYPES:
        hint = " (it looks like a transformers-format folder already)" if "text_config" in config else ""
        raise ModelLoadError(
            f"{original} is not an original-format LLaVA checkpoint: model_type {config.get('model_type')!r}, "
            f"expected 'llava_llama'{hint}"
        )
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        depth = re.fullmatch(r"mlp(\d+)x_gelu", str(projector))
        detail = f"{depth.group(1)} linear layers" if depth else "not Linear-GELU-Linear"
        raise ModelLoadError(
            f"unsupported mm_projector_type {projector!r} in {original} ({detail}): transformers' "
            "LlavaMultiModalProjector is Linear-GELU-Linear, i.e. only 'mlp2x_gelu' converts"
        )
    if "mm_hidden_size" not in config:
        raise ModelLoadError(f"{original}/config.json has no mm_hidden_size")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in _SELECT_FEATURE:
        raise ModelLoadError(f"unsupported mm_vision_select_feature {feature!r}; expected 'patch' or 'cls_patch'")
    aspect = config.get("image_aspect_ratio", "square")
    if aspect not in ("pad", "square", None):
        raise ModelLoadError(
            f"unsupported image_aspect_ratio {aspect!r}: only 'pad' and 'square' (LLaVA-1.5) convert to the "
            "single-image Llava format; 'anyres' checkpoints are LLaVA-NeXT"
        )
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise ModelLoadError(
            "mm_use_im_start_end / mm_use_im_patch_token checkpoints wrap the image in extra learned tokens, "
            "which the transformers Llava format has no place for"
        )
    if config.get("mm_patch_merge_type", "flat") != "flat":
        raise ModelLoadError(f"unsupported mm_patch_merge_type {config['mm_patch_merge_type']!r}; expected 'flat'")
    return config


def _read_vision_folder(vision: Path, config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The CLIP vision config and the image-processor settings, checked against the projector's input size."""
    from transformers import CLIPVisionConfig

    if not vision.is_dir():
        raise ModelLoadError(
            f"vision folder {vision} does not exist: --vision takes a local copy of the CLIP tower the checkpoint's"
            f" mm_vision_tower names ({config.get('mm_vision_tower', 'openai/clip-vit-large-patch14-336')}),"
            " downloaded beforehand (nothing is fetched here)"
        )
    raw = _read_json(vision / "config.json", what="vision folder")
    if raw.get("model_type") not in ("clip", "clip_vision_model"):
        raise ModelLoadError(
            f"vision folder {vision} holds model_type {raw.get('model_type')!r}; expected a CLIP model "
            f"({config.get('mm_vision_tower', 'openai/clip-vit-large-patch14-336')})"
        )
    try:
        vision_config = CLIPVisionConfig.from_pretrained(str(vision))
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"cannot read the CLIP vision config of {vision}: {exc}") from exc
    if vision_config.hidden_size != config["mm_hidden_size"]:
        raise ModelLoadError(
            f"vision folder {vision} has hidden_size {vision_config.hidden_size} but the checkpoint's projector "
            f"expects mm_hidden_size {config['mm_hidden_size']} (mm_vision_tower: {config.get('mm_vision_tower')})"
        )
    layer = int(config.get("mm_vision_select_layer", -2))
    if not -vision_config.num_hidden_layers - 1 <= layer <= vision_config.num_hidden_layers:
        raise ModelLoadError(
            f"mm_vision_select_layer {layer} is out of range for a {vision_config.num_hidden_layers}-layer tower"
        )
    pre = _read_json(vision / "preprocessor_config.json", what="vision folder")
    settings = _image_settings(pre)
    settings["do_pad"] = config.get("image_aspect_ratio") == "pad"
    crop = settings["crop_size"]
    if settings.get("do_center_crop", True) and (crop["height"], crop["width"]) != (vision_config.image_size,) * 2:
        raise ModelLoadError(
            f"vision folder {vision}: the image processor crops to {crop['height']}x{crop['width']} but the tower "
            f"takes {vision_config.image_size}x{vision_config.image_size} images"
        )
    return vision_config, settings


def _image_settings(pre: dict[str, Any]) -> dict[str, Any]:
    """CLIPImageProcessor settings in the dict form the Llava image processor takes (old configs use bare ints)."""
    size = pre.get("size", 224)
    crop = pre.get("crop_size", size if isinstance(size, int) else size.get("shortest_edge", 224))
    settings: dict[str, Any] = {
        "size": {"shortest_edge": size} if isinstance(size, int) else dict(size),
        "crop_size": {"height": crop, "width": crop} if isinstance(crop, int) else dict(crop),
    }
    for key in (
        "do_resize",
        "do_center_crop",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "resample",
        "do_convert_rgb",
    ):
        if key in pre:
            settings[key] = pre[key]
    return settings


def fast_tokenizer(original: Path, *, legacy: bool) -> tuple[Any, str]:
    """`original`'s tokenizer as a fast one (a SentencePiece-only folder converted, with `legacy` and the "▁" prefix
    rule of the originals' transformers), and where it came from; every load error a `ModelLoadError`."""
    import importlib.util

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    names = {p.name for p in original.iterdir()}
    if "tokenizer.json" not in names:
        if "tokenizer.model" not in names:
            raise ModelLoadError(f"original folder {original} has no tokenizer (tokenizer.json or tokenizer.model)")
        missing = [
            pkg
            for pkg, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf"))
            if not _has_module(importlib.util, module)
        ]
        if missing:
            raise ModelLoadError(
                f"{original} has only a slow sentencepiece tokenizer (tokenizer.model); converting it to a fast "
                f"tokenizer needs the {' and '.join(missing)} package(s): pip install {' '.join(missing)}"
            )
    # AutoTokenizer reads config.json and complains, harmlessly, about the original model type and rope_scaling.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            tokenizer = AutoTokenizer.from_pretrained(
                str(original), use_fast=True, legacy=legacy, add_prefix_space=True
            )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {original}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    source = "tokenizer.json" if "tokenizer.json" in names else "tokenizer.model (converted to a fast tokenizer)"
    return tokenizer, source


def _load_tokenizer(original: Path) -> tuple[Any, int, dict[str, Any]]:
    """The original tokenizer as a fast tokenizer with `<image>`, BOS and a pad token; also the id and what changed."""
    from tokenizers import AddedToken

    legacy = _slow_legacy(original)
    tokenizer, source = fast_tokenizer(original, legacy=legacy)
    if tokenizer.eos_token != "</s>" or tokenizer.convert_tokens_to_ids("</s>") in (None, tokenizer.unk_token_id):
        raise ModelLoadError(
            f"the tokenizer of {original} has EOS {tokenizer.eos_token!r}; the llava_v1 template closes answers "
            "with '</s>', a Llama tokenizer's EOS"
        )
    if tokenizer.bos_token is None:
        raise ModelLoadError(f"the tokenizer of {original} has no BOS token; LLaVA prompts start with <s>")
    notes: dict[str, Any] = {
        "source": source,
        "add_bos_token_forced": False,
        "legacy": legacy,
    }
    if tokenizer("a")["input_ids"][:1] != [tokenizer.bos_token_id]:
        tokenizer.add_bos_token = True
        notes["add_bos_token_forced"] = True
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    notes["pad_token"] = tokenizer.pad_token
    return tokenizer, int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)), notes


def _slow_legacy(original: Path) -> bool:
    """The `legacy` flag the original slow LlamaTokenizer ran with: tokenizer_config.json's, where a missing or null
    one meant True in transformers 4.3x (and False in transformers 5). It decides whether text after `</s>` (the
    next turn) starts with SentencePiece's "▁" (True) or not (False)."""
    path = original / "tokenizer_config.json"
    config = _read_json(path, what="original folder") if path.is_file() else {}
    return config.get("legacy") is not False


def _keep_prefix_rule(folder: Path, *, legacy: bool) -> None:
    """Write the converted tokenizer's "▁" rule into its tokenizer_config.json: a loader that rebuilds a Llama
    tokenizer from it (transformers 5 does for every model type it has no tokenizer class for, OmniLMM's included)
    otherwise takes legacy=False and drops the "▁" the original put before the text after a special token."""
    path = folder / "tokenizer_config.json"
    config = _read_json(path, what="converted folder")
    config.update(legacy=legacy, add_prefix_space=True)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _has_module(util: Any, name: str) -> bool:
    try:
        return util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _weight_files(folder: Path, *, what: str) -> list[Path]:
    """Weight files of a folder: safetensors preferred, pickled .bin shards accepted; index files honoured."""
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            weight_map = _read_json(index, what=what).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelLoadError(f"{index} has no weight_map")
            files = [folder / name for name in sorted(set(weight_map.values()))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise ModelLoadError(f"{index} names missing shard(s): {', '.join(absent)}")
            return files
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise ModelLoadError(f"{what} folder {folder} has no weights (*.safetensors or pytorch_model*.bin)")


def _load_file(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of one shard; .bin files only through the tensors-only unpickler (memory-mapped when possible)."""
    import torch

    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors: dict[str, torch.Tensor] = load_file(str(file))
            return tensors
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {file} as a tensors-only checkpoint: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{file} is not a flat state dict of tensors")
    return state


def _list_tensors(files: list[Path]) -> dict[str, _Source]:
    """Key -> (file, shape) without materialising safetensors data."""
    found: dict[str, _Source] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(file), "pt") as handle:
                    for key in handle.keys():  # noqa: SIM118
                        tensor = handle.get_slice(key)
                        dtype = _SAFETENSORS_DTYPES.get(tensor.get_dtype(), tensor.get_dtype())
                        found[key] = _Source(file, key, tuple(tensor.get_shape()), dtype)
            except Exception as exc:
                raise ModelLoadError(f"cannot read {file} as safetensors: {exc}") from exc
        else:
            for key, tensor in _load_file(file).items():
                found[key] = _Source(file, key, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
    return found


def _clip_key(key: str) -> str | None:
    """A CLIP key in the flat CLIPVisionModel layout of transformers 5, or None for the text half of a CLIPModel."""
    if key.startswith(_CLIP_SKIPPED_PREFIXES):
        return None
    return key.removeprefix("vision_model.")


def _tower_in_checkpoint(config: dict[str, Any]) -> bool:
    return bool(config.get("unfreeze_mm_vision_tower"))


def _vision_sources(config: dict[str, Any], lm_sources: dict[str, _Source], vision: Path) -> dict[str, _Source]:
    """CLIP tensors from wherever the original code would have loaded them."""
    if _tower_in_checkpoint(config):
        embedded = {k: s for k, s in lm_sources.items() if k.startswith(_EMBEDDED_TOWER)}
        if not embedded:
            raise ModelLoadError(
                "config sets unfreeze_mm_vision_tower, so the tuned CLIP tower must be in the checkpoint, "
                f"but there are no {_EMBEDDED_TOWER}* weights"
            )
        items = {k.removeprefix(_EMBEDDED_TOWER): s for k, s in embedded.items()}
    else:
        items = _list_tensors(_weight_files(vision, what="vision"))
    plan: dict[str, _Source] = {}
    for key, source in items.items():
        mapped = _clip_key(key)
        if mapped is not None and not mapped.endswith("position_ids"):
            plan[f"model.vision_tower.{mapped}"] = source
    return plan


def _plan_language_and_projector(
    sources: dict[str, _Source], original: Path, *, tower_used: bool
) -> tuple[dict[str, _Source], list[str]]:
    """Output key -> source tensor for the Llama and projector weights; also the original keys left out."""
    plan: dict[str, _Source] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, source in sources.items():
        projector = next((p for p in _PROJECTOR if key.startswith(p)), None)
        if projector is not None:
            plan[_PROJECTOR[projector] + key.removeprefix(projector)] = source
        elif key.startswith(_EMBEDDED_TOWER):
            if not tower_used:
                dropped.append(key)
        elif key.endswith("rotary_emb.inv_freq"):
            dropped.append(key)
        elif key == "lm_head.weight":
            plan[key] = source
        elif key.startswith(("model.layers.", "model.norm.", "model.embed_tokens.")):
            plan["model.language_model." + key.removeprefix("model.")] = source
        else:
            unknown.append(key)
    if unknown:
        raise ModelLoadError(f"{original} holds weights the LLaVA-1.5 layout does not have: {', '.join(unknown[:8])}")
    missing = [
        f"model.mm_projector.{i}.{p}"
        for i in (0, 2)
        for p in ("weight", "bias")
        if f"model.mm_projector.{i}.{p}" not in sources
    ]
    if missing:
        raise ModelLoadError(
            f"{original} has no projector weights ({', '.join(missing)} missing): this is not a full LLaVA "
            "checkpoint (a stage-1 projector is saved separately as mm_projector.bin; merge it first)"
        )
    if "model.language_model.embed_tokens.weight" not in plan:
        raise ModelLoadError(f"{original} has no model.embed_tokens.weight")
    return plan, dropped


def _llava_config(
    config: dict[str, Any], vision_config: Any, image_token_id: int, vocab_size: int, tokenizer: Any
) -> Any:
    from transformers import LlamaConfig, LlavaConfig

    text = {k: config[k] for k in _LLAMA_KEYS if config.get(k) is not None}
    text["vocab_size"] = vocab_size
    text["pad_token_id"] = tokenizer.pad_token_id
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.get("rope_theta") or 10000.0)}
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict):
        rope.update({k: v for k, v in scaling.items() if k != "type"})
        rope["rope_type"] = scaling.get("rope_type") or scaling.get("type") or "default"
    text["rope_parameters"] = rope
    try:
        text_config = LlamaConfig(**text)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"the original config does not make a valid Llama config: {exc}") from exc
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    strategy = _SELECT_FEATURE[config.get("mm_vision_select_feature", "patch")]
    llava = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
        image_seq_length=patches + (1 if strategy == "full" else 0),
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    llava.architectures = ["LlavaForConditionalGeneration"]
    return llava


def _check_against_model(plan: dict[str, _Source], llava_config: Any, *, grow: bool) -> None:
    """Compare the planned keys and shapes with a weightless (meta) LlavaForConditionalGeneration."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if llava_config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(plan))
    extra = sorted(set(plan) - set(expected))
    if missing:
        vision_missing = [k for k in missing if k.startswith("model.vision_tower.")]
        where = "the vision folder's CLIP weights" if vision_missing else "the original checkpoint"
        raise ModelLoadError(f"{where} lack {len(missing)} tensor(s) the model needs, e.g. {', '.join(missing[:5])}")
    if extra:
        raise ModelLoadError(
            f"{len(extra)} converted tensor(s) have no place in the model, e.g. {', '.join(extra[:5])}"
        )
    wrong = []
    for key, source in plan.items():
        shape = source.shape
        if grow and key in _GROWN_KEYS:
            shape = (shape[0] + 1, *shape[1:])
        if shape != expected[key]:
            wrong.append(f"{source.key} {list(source.shape)} -> {key} expects {list(expected[key])}")
    if wrong:
        raise ModelLoadError(f"shape mismatch (vision folder vs mm_hidden_size, or config vs weights): {wrong[0]}")


def _target_dtype(dtype: str, config: dict[str, Any], plan: dict[str, _Source], torch: Any) -> Any:
    """'auto' keeps the checkpoint's dtype (config torch_dtype, else the stored embedding dtype)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    named = config.get("torch_dtype") or config.get("dtype")
    if named in DTYPES[1:]:
        return getattr(torch, named)
    stored = plan["model.language_model.embed_tokens.weight"].dtype
    if stored not in DTYPES[1:]:
        raise ModelLoadError(f"the checkpoint stores {stored} weights; pass an explicit dtype")
    return getattr(torch, stored)


def _write_weights(plan: dict[str, _Source], folder: Path, dtype: Any, *, grow: bool) -> None:
    """One output shard per source file, each written from that file alone, plus the index.

    safetensors writes files 0600; they get the umask's mode, like the other files, for shared model storage.
    """
    import torch
    from safetensors.torch import save_file

    by_file: dict[Path, dict[str, _Source]] = {}
    for key, source in plan.items():
        by_file.setdefault(source.file, {})[key] = source
    weight_map: dict[str, str] = {}
    total = 0
    count = len(by_file)
    for number, (file, entries) in enumerate(by_file.items(), start=1):
        name = f"model-{number:05d}-of-{count:05d}.safetensors"
        tensors = _load_file(file)
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for key, source in sorted(entries.items()):
            tensor = tensors[source.key]
            if grow and key in _GROWN_KEYS:
                tensor = torch.cat([tensor, tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)])
            tensor = tensor.to(dtype).contiguous()
            if tensor.untyped_storage().data_ptr() in seen:
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
            out[key] = tensor
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
        save_file(out, str(folder / name), metadata={"format": "pt"})
        del tensors, out
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index_file = folder / "model.safetensors.index.json"
    index_file.write_text(json.dumps(index, indent=2) + "\n")
    umask_modes(folder)


def _build_processor(tokenizer: Any, settings: dict[str, Any], vision_config: Any, config: dict[str, Any]) -> Any:
    """LlavaProcessor: CLIP preprocessing (with the original's pad-to-square), the tokenizer and llava_v1."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    image_processor = LlavaImageProcessorPil(**settings)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=_SELECT_FEATURE[config.get("mm_vision_select_feature", "patch")],
        num_additional_image_tokens=1,
        chat_template=LLAVA_V1_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
