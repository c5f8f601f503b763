"""Published OmniLMM folders (RLAIF-V-12B, OmniLMM-12B) -> folders the reward service loads.

The weights need no conversion: `rlaifv.reward.omnilmm` implements the architecture with the
published parameter names. What the published folders lack is everything around them:

* a fast tokenizer (`tokenizer.json`): they ship only the sentencepiece `tokenizer.model`, which
  transformers converts with the `sentencepiece` and `protobuf` packages, keeping the "▁" rule of the
  conversion the original code ran (transformers 4.36: a "▁" before the text after every special token);
* a processor (the 448 px image transform, the image-token block, OmniLMM's chat template), which
  the original code built in Python (`chat.py`);
* the ids of `<im_start>`, `<im_end>` and `<im_patch>` in config.json (the original looked them up
  in the tokenizer at run time);
* safetensors for OmniLMM-12B, which is one pickled `pytorch_model.bin` (read here with the
  tensors-only unpickler and re-written as safetensors shards).

Before anything is written, the checkpoint's tensor names and shapes are checked against the
architecture the config describes (no missing, unexpected or mis-shaped tensor). Run it as
`rlaifv convert omnilmm ORIGINAL -o OUTPUT`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rlaifv.convert.llava import (
    _absolute,
    _check_output,
    _keep_prefix_rule,
    _list_tensors,
    _read_json,
    _replace,
    _Source,
    _weight_files,
    fast_tokenizer,
)
from rlaifv.reward.errors import ModelLoadError

CONVERSION_FILE = "rlaifv_conversion.json"
IMAGE_TOKENS = {"im_start_token_id": "<im_start>", "im_end_token_id": "<im_end>", "im_patch_token_id": "<im_patch>"}
SHARD_BYTES = 5_000_000_000
_ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "F32": 4, "F16": 2, "BF16": 2}


def convert_omnilmm(original: str | Path, output: str | Path, *, force: bool = False) -> Path:
    """Write a servable OmniLMM folder to `output`: safetensors, fast tokenizer, processor, image token ids.

    The folder is assembled beside `output` and moved in place at the end, so a failed run leaves nothing.
    """
    from rlaifv.reward.omnilmm import register
    from rlaifv.reward.omnilmm.configuration import OmniLMMConfig
    from rlaifv.reward.omnilmm.modeling import published_layout
    from rlaifv.reward.omnilmm.processing import OmniLMMImageProcessor, OmniLMMProcessor

    original, output = Path(original), _absolute(output)
    _check_output(output, sources=(original,), force=force)
    raw = _read_json(original / "config.json", what="original")
    if raw.get("model_type") != "omnilmm":
        raise ModelLoadError(f"{original}/config.json has model_type {raw.get('model_type')!r}, not 'omnilmm'")
    register()
    try:
        config = OmniLMMConfig.from_dict(raw)
        expected = published_layout(config)
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{original}/config.json does not describe an OmniLMM model: {exc}") from exc
    tokenizer, tokenizer_notes = _load_tokenizer(original)
    ids = _image_token_ids(tokenizer, config.vocab_size, original)
    sources = _list_tensors(_weight_files(original, what="original"))
    _check_layout(sources, expected, original)

    partial = output.parent / f".{output.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        total, shards = _write_shards(sources, partial)
        (partial / "config.json").write_text(json.dumps({**raw, **ids}, indent=2, sort_keys=True) + "\n")
        if (original / "generation_config.json").is_file():
            shutil.copyfile(original / "generation_config.json", partial / "generation_config.json")
        processor = OmniLMMProcessor(
            image_processor=OmniLMMImageProcessor(image_size=config.image_size),
            tokenizer=tokenizer,
            num_query=config.num_query,
        )
        processor.save_pretrained(str(partial))
        _keep_prefix_rule(partial, legacy=True)
        record = {
            "converter": "rlaifv.convert.omnilmm",
            "source_format": "published OmniLMM folder (OmniLMMForCausalLM, timm EVA tower)",
            "target_format": "the same weights and names, safetensors, with a transformers processor",
            "original": str(original.resolve()),
            "weights": {"tensors": len(sources), "bytes": total, "shards": shards},
            "image_token_ids": ids,
            "tokenizer": tokenizer_notes,
            "processor": {"image_size": config.image_size, "num_query": config.num_query, "chat_template": "omnilmm"},
        }
        (partial / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _replace(output, partial)
    return output


def _load_tokenizer(original: Path) -> tuple[Any, dict[str, Any]]:
    """The folder's tokenizer as a fast tokenizer, unchanged (the original code added nothing to the published one).
    OmniLMM's code had transformers 4.36 convert tokenizer.model, whose fast Llama tokenizer puts SentencePiece's "▁"
    before the text after every special token, whatever the folder's `legacy` says: legacy, then."""
    tokenizer, source = fast_tokenizer(original, legacy=True)
    if tokenizer.eos_token != "</s>":
        raise ModelLoadError(
            f"the tokenizer of {original} has EOS {tokenizer.eos_token!r}; OmniLMM turns end with </s>"
        )
    if tokenizer("a")["input_ids"][:1] != [tokenizer.bos_token_id]:
        raise ModelLoadError(f"the tokenizer of {original} does not add <s>; OmniLMM prompts start with it")
    return tokenizer, {"source": source, "size": len(tokenizer)}


def _image_token_ids(tokenizer: Any, vocab_size: int, original: Path) -> dict[str, int]:
    ids: dict[str, int] = {}
    for key, token in IMAGE_TOKENS.items():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ModelLoadError(f"the tokenizer of {original} has no {token} token; OmniLMM prompts need it")
        if token_id >= vocab_size:
            raise ModelLoadError(f"{token} is id {token_id}, past the model's {vocab_size} embedding rows")
        ids[key] = int(token_id)
    if len(tokenizer) > vocab_size:
        raise ModelLoadError(f"the tokenizer of {original} has {len(tokenizer)} tokens, the model {vocab_size} rows")
    return ids


def _check_layout(sources: dict[str, _Source], expected: dict[str, tuple[int, ...]], original: Path) -> None:
    """Refuse a checkpoint whose tensors are not exactly those of the architecture its config describes."""
    missing = sorted(set(expected) - set(sources))
    unexpected = sorted(set(sources) - set(expected))
    mis_shaped = sorted(k for k in set(expected) & set(sources) if tuple(sources[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if mis_shaped:
        examples = ", ".join(f"{k} {sources[k].shape} != {expected[k]}" for k in mis_shaped[:3])
        problems.append(f"{len(mis_shaped)} of another shape ({examples})")
    if problems:
        raise ModelLoadError(f"the checkpoint in {original} does not match its config.json: " + "; ".join(problems))


def _write_shards(sources: dict[str, _Source], folder: Path) -> tuple[int, int]:
    """Every tensor, unchanged, into safetensors shards of about 5 GB plus the index, one source file at a time."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from rlaifv.convert.llava import _load_file

    ordered = sorted(sources.items(), key=lambda item: (str(item[1].file), item[0]))
    plan: list[list[str]] = [[]]
    size = 0
    for key, source in ordered:
        nbytes = _ELEMENT_SIZE.get(source.dtype, 4) * _numel(source.shape)
        if plan[-1] and size + nbytes > SHARD_BYTES:
            plan.append([])
            size = 0
        plan[-1].append(key)
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    loaded: tuple[Path, Any] | None = None
    for number, keys in enumerate(plan, start=1):
        name = f"model-{number:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for key in keys:
            source = sources[key]
            if loaded is None or loaded[0] != source.file:
                loaded = (source.file, None if source.file.suffix == ".safetensors" else _load_file(source.file))
            if loaded[1] is None:
                with safe_open(str(source.file), "pt") as handle:
                    tensor = handle.get_tensor(source.key)
            else:
                tensor = loaded[1][source.key]
            tensors[key] = tensor.contiguous().clone() if source.file.suffix != ".safetensors" else tensor
            total += tensors[key].numel() * tensors[key].element_size()
            weight_map[key] = name
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index_file = folder / "model.safetensors.index.json"
    index_file.write_text(json.dumps(index, indent=2) + "\n")
    mode = index_file.stat().st_mode & 0o777
    for shard in set(weight_map.values()):
        (folder / shard).chmod(mode)
    return total, len(plan)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
