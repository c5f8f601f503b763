"""Making a bundle from model folders one already has, and describing a bundle without loading weights.

Everything is checked before anything is written: the reward compares the policy's and the
reference's log-probs of the same tokens given the same image features, so a pair that disagrees
on tokenizer or image preprocessing yields numbers that mean nothing, with no error at serving time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from datetime import UTC, datetime
from math import prod
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlaifv.reward.bundle import (
    MANIFEST,
    BundleManifest,
    _vocab_fingerprint,
    read_manifest,
    read_tokenizer_json,
    resolve,
    umask_modes,
    write_bundle,
)
from rlaifv.reward.errors import BundleError, ModelLoadError
from rlaifv.reward.models import read_json_object
from rlaifv.reward.scoring import Normalize, RewardConfig

PolicyType = Literal["full", "lora"]
CREATED_BY = "rlaifv bundle create"

# Keys naming the class that wrote a config, not how images are prepared (a slow and a fast
# image processor with equal settings prepare images alike).
_IRRELEVANT_PROCESSOR_KEYS = frozenset(
    {"image_processor_type", "processor_class", "_processor_class", "auto_map", "transformers_version"}
)
# Parts of processor_config.json compared on their own (image_processor) or not about images at all.
_PROCESSOR_SUBCONFIGS = frozenset(
    {"image_processor", "tokenizer", "video_processor", "feature_extractor", "audio_processor", "chat_template"}
)
_SHOWN = 5
# Model-config keys that decide how many image tokens a prompt gets and where the model looks for them: the prompt
# is built once, by the reference's processor, for both models. Read from the loaded configs (defaults filled in,
# image_token_index and image_token_id one attribute); `vision_config.` keys from the vision tower's config.
_IMAGE_CONFIG_KEYS = (
    "model_type",
    "image_token_id",
    "image_seq_length",
    "vision_feature_select_strategy",
    "vision_feature_layer",
    "mm_tokens_per_image",
    "spatial_merge_size",
    "downsample_ratio",
    "scale_factor",
    "vision_start_token_id",
    "im_start_token_id",
    "im_end_token_id",
    "im_patch_token_id",
    "num_query",
    "vision_config.image_size",
    "vision_config.patch_size",
    "vision_config.spatial_merge_size",
    "vision_config.temporal_patch_size",
)


class TokenizerFacts(BaseModel):
    """What decides how text becomes token ids: vocabulary, added tokens, merges and special-token roles."""

    model_config = ConfigDict(frozen=True)

    vocab: dict[str, int]
    added: list[tuple[int, str]]
    merges_sha256: str | None = None
    special: dict[str, str] = Field(default_factory=dict)

    @property
    def tokens(self) -> set[str]:
        return set(self.vocab) | {content for _, content in self.added}

    @property
    def size(self) -> int:
        return len(self.tokens)


def detect_policy_type(folder: Path) -> PolicyType:
    """A PEFT adapter folder is recognised by its adapter_config.json, as `load_bundle` does."""
    return "lora" if (folder / "adapter_config.json").is_file() else "full"


def _special_tokens(folder: Path) -> dict[str, str]:
    """Special-token roles. The list of extra special tokens is one entry, compared as a set: transformers 4
    wrote it as `additional_special_tokens`, transformers 5 as `extra_special_tokens` (a list or a name -> token
    map), and a tokenizer re-saved by either is the same tokenizer."""
    special: dict[str, str] = {}
    extra: set[str] = set()
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        for key, value in read_json_object(path, BundleError).items():
            if key in ("additional_special_tokens", "extra_special_tokens"):
                items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
                extra |= {str(t.get("content", t)) if isinstance(t, dict) else str(t) for t in items}
            elif key.endswith("_token"):
                content = value.get("content") if isinstance(value, dict) else value
                if isinstance(content, str):
                    special[key] = content
    if extra:
        special["extra_special_tokens"] = json.dumps(sorted(extra))
    return special


def tokenizer_facts(folder: Path) -> TokenizerFacts | None:
    """The tokenizer in `folder` read from tokenizer.json, or None if the folder has none."""
    fingerprint = _vocab_fingerprint(folder)
    data = read_tokenizer_json(folder)
    if fingerprint is None or data is None:
        return None
    raw_vocab = fingerprint["vocab"] or {}
    # Unigram models store [piece, score] pairs whose index is the id.
    vocab = {p[0]: i for i, p in enumerate(raw_vocab)} if isinstance(raw_vocab, list) else dict(raw_vocab)
    merges = data.get("model", {}).get("merges")
    # tokenizers < 0.20 wrote a merge as "a b", later ones as ["a", "b"]: the same merge either way.
    pairs = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges or []]
    digest = hashlib.sha256(json.dumps(pairs).encode()).hexdigest() if pairs else None
    return TokenizerFacts(
        vocab=vocab,
        added=[tuple(a) for a in fingerprint["added"]],
        merges_sha256=digest,
        special=_special_tokens(folder),
    )


def _sample(items: set[str] | list[str]) -> str:
    shown = sorted(items)[:_SHOWN]
    more = f" (+{len(items) - len(shown)} more)" if len(items) > len(shown) else ""
    return ", ".join(repr(s) for s in shown) + more


def tokenizer_differences(policy: TokenizerFacts, reference: TokenizerFacts) -> list[str]:
    """Each way the two tokenizers differ, in words; empty when they tokenize alike."""
    problems: list[str] = []
    only_policy, only_reference = set(policy.vocab) - set(reference.vocab), set(reference.vocab) - set(policy.vocab)
    if only_policy or only_reference:
        problems.append(
            f"vocabulary: policy has {len(policy.vocab)} tokens, reference {len(reference.vocab)}"
            + (f"; only in policy: {_sample(only_policy)}" if only_policy else "")
            + (f"; only in reference: {_sample(only_reference)}" if only_reference else "")
        )
    moved = sorted(t for t in set(policy.vocab) & set(reference.vocab) if policy.vocab[t] != reference.vocab[t])
    if moved:
        examples = ", ".join(f"{t!r}: {policy.vocab[t]} vs {reference.vocab[t]}" for t in moved[:_SHOWN])
        problems.append(f"vocabulary: {len(moved)} tokens have different ids (policy vs reference: {examples})")
    if policy.added != reference.added:
        a, b = set(policy.added), set(reference.added)
        problems.append(
            f"added tokens: only in policy {sorted(a - b)[:_SHOWN]}, only in reference {sorted(b - a)[:_SHOWN]}"
        )
    if policy.merges_sha256 != reference.merges_sha256:
        problems.append("BPE merges differ")
    for key in sorted(set(policy.special) | set(reference.special)):
        mine, theirs = policy.special.get(key), reference.special.get(key)
        if mine != theirs:
            problems.append(f"special token {key}: policy {mine!r}, reference {theirs!r}")
    return problems


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}", inner, out)
    else:
        out[prefix] = value


def image_settings(folder: Path) -> dict[str, Any] | None:
    """How `folder` turns images into model inputs, flattened to dotted keys; None without an image processor.

    transformers 5 keeps the image processor inside processor_config.json; older
    checkpoints have preprocessor_config.json. Processor-level settings (patch size,
    image token, feature strategy) decide how many image tokens the prompt gets, so
    they are compared too.
    """
    image: dict[str, Any] | None = None
    processor: dict[str, Any] = {}
    if (folder / "processor_config.json").is_file():
        processor = read_json_object(folder / "processor_config.json", BundleError)
        if isinstance(processor.get("image_processor"), dict):
            image = processor["image_processor"]
    if image is None and (folder / "preprocessor_config.json").is_file():
        image = read_json_object(folder / "preprocessor_config.json", BundleError)
    return None if image is None else _settings(image, processor)


def loaded_image_settings(folder: Path) -> dict[str, Any] | None:
    """`image_settings` as the loaded processor has them (defaults filled in, old keys such as Qwen-VL's
    min_pixels/max_pixels read into today's `size`), so a processor re-saved by another transformers version
    compares equal; None when the folder's processor does not load here."""
    from rlaifv.reward.models import load_processor

    try:
        processor = load_processor(folder)
        image = processor.image_processor.to_dict()
        outer = processor.to_dict()
    except Exception:
        return None
    return _settings(image, outer)


def _settings(image: dict[str, Any], processor: dict[str, Any]) -> dict[str, Any]:
    """Image-processor and processor-level settings, flattened to dotted keys (what is compared)."""
    settings: dict[str, Any] = {}
    for key, value in image.items():
        if key not in _IRRELEVANT_PROCESSOR_KEYS:
            _flatten(f"image_processor.{key}", value, settings)
    for key, value in processor.items():
        if key not in _IRRELEVANT_PROCESSOR_KEYS and key not in _PROCESSOR_SUBCONFIGS:
            _flatten(f"processor.{key}", value, settings)
    return settings


def settings_differences(policy: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    return [
        f"{key}: policy {policy.get(key, '(unset)')!r}, reference {reference.get(key, '(unset)')!r}"
        for key in sorted(set(policy) | set(reference))
        if policy.get(key) != reference.get(key)
    ]


def safetensors_headers(folder: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {dtype, shape} from every safetensors file's header (the index's shards): no weights are read."""
    from rlaifv.reward.models import safetensors_headers as headers

    try:
        return headers(folder)
    except ModelLoadError as exc:
        raise BundleError(str(exc)) from None


def _module_key(name: str) -> str:
    """A module path without the `model` / `base_model` wrappers whose nesting changes between
    transformers versions (saved `language_model.model.layers` vs loaded `model.language_model.layers`)."""
    return ".".join(part for part in name.split(".") if part not in ("model", "base_model"))


def lora_shape_problems(adapter: Path, reference: Path) -> list[str]:
    """LoRA matrices whose sizes do not fit the reference module they adapt (the adapter was made on another base).

    Modules that cannot be matched by name are left to PEFT at load time.
    """
    base: dict[str, list[int] | None] = {}
    for name, info in safetensors_headers(reference).items():
        if name.endswith(".weight"):
            key = _module_key(name.removesuffix(".weight"))
            base[key] = None if key in base else info.get("shape")
    problems = []
    for name, info in sorted(safetensors_headers(adapter).items()):
        # lora_A is (rank, in_features) and lora_B (out_features, rank); the base weight is (out, in).
        for part, axis, side in ((".lora_A.weight", 1, "input"), (".lora_B.weight", 0, "output")):
            if not name.endswith(part):
                continue
            module = name.removesuffix(part)
            target = base.get(_module_key(module))
            shape = info.get("shape") or []
            if target is None or len(target) != 2 or len(shape) != 2 or shape[axis] == target[axis]:
                continue
            problems.append(
                f"{module.removeprefix('base_model.model.')}: the adapter's {side} size is {shape[axis]}, "
                f"the reference's is {target[axis]}"
            )
    if len(problems) > _SHOWN:
        problems = [*problems[:_SHOWN], f"... and {len(problems) - _SHOWN} more LoRA matrices"]
    return problems


def _check_model(folder: Path, what: str) -> None:
    from rlaifv.reward.models import check_model_folder

    try:
        check_model_folder(folder, what=what)
    except ModelLoadError as exc:
        raise BundleError(str(exc)) from None


def _check_weights_complete(folder: Path, what: str) -> None:
    from rlaifv.reward.models import check_weights_complete

    try:
        check_weights_complete(folder, what=what)
    except ModelLoadError as exc:
        raise BundleError(str(exc)) from None


def _needs_remote_code(folder: Path) -> bool:
    """The folder's model or processor is code shipped with it: only a service with trust_remote_code loads it."""
    names = ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
    return any(
        (folder / name).is_file() and "auto_map" in read_json_object(folder / name, BundleError) for name in names
    )


def _check_processor(reference: Path) -> None:
    """The service's processor is the reference's: one that does not load here (no chat template, a broken
    image-processor config) makes a bundle that never serves. Processors that run their own code are left to the
    service, which may trust it."""
    from rlaifv.reward.models import load_processor

    try:
        load_processor(reference)
    except ModelLoadError as exc:
        if not _needs_remote_code(reference):
            raise BundleError(f"the reference's processor, which the service uses, does not load: {exc}") from None


def model_config_image_settings(folder: Path) -> dict[str, Any]:
    """`_IMAGE_CONFIG_KEYS` as the loaded config has them (the raw config.json where it does not load here)."""
    from transformers import AutoConfig

    from rlaifv.reward.models import register_native_families

    register_native_families()
    raw = read_json_object(folder / "config.json", BundleError)
    try:
        config: Any = AutoConfig.from_pretrained(str(folder))
    except Exception:  # remote code or a config this transformers cannot read: compare the files
        config = None

    def value(source: Any, key: str) -> Any:
        for part in key.split("."):
            if source is None:
                return None
            source = source.get(part) if isinstance(source, dict) else getattr(source, part, None)
        return source

    settings = {}
    for key in _IMAGE_CONFIG_KEYS:
        found = value(config, key) if config is not None else value(raw, key)
        if found is None and key == "image_token_id" and config is None:
            found = raw.get("image_token_index")
        if found is not None:
            settings[key] = found.to_dict() if hasattr(found, "to_dict") else found
    return settings


def lora_base_class_problem(adapter: Path, reference: Path) -> str | None:
    """The model class PEFT recorded the adapter was made on, when the reference is not one (an adapter of another
    model whose matrices happen to fit). An adapter naming no class is left to the shape check."""
    mapping = read_json_object(adapter / "adapter_config.json", BundleError).get("auto_mapping")
    recorded = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    architectures = read_json_object(reference / "config.json", BundleError).get("architectures")
    if not isinstance(recorded, str) or not isinstance(architectures, list) or not architectures:
        return None
    if recorded in architectures:
        return None
    return f"the adapter was made for {recorded}; the reference is {', '.join(map(str, architectures))}"


def _weights_sample(folder: Path) -> list[tuple[str, int, str]]:
    """(file, size, hash of three 1 MiB samples) of each safetensors file: two folders of one model's weights (a copy)
    agree, two models of one architecture (a fine-tune and its base) differ, without reading gigabytes."""
    import hashlib

    chunk = 1 << 20
    out = []
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for offset in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
                f.seek(offset)
                digest.update(f.read(chunk))
        out.append((path.name, size, digest.hexdigest()))
    return out


def lora_base_mismatch(adapter: Path, reference: Path) -> str | None:
    """Why the adapter was not trained over `reference`, when its adapter_config.json names a base folder found here
    whose weights differ (the served policy would be the adapter over another model than it was trained on); None
    when they agree or the base cannot be checked (a hub id, a folder moved away)."""
    recorded = read_json_object(adapter / "adapter_config.json", BundleError).get("base_model_name_or_path")
    if not isinstance(recorded, str) or not recorded:
        return None
    base = Path(recorded).expanduser()
    if not base.is_dir() or base.resolve() == reference.resolve():
        return None
    if _weights_sample(base) == _weights_sample(reference):
        return None
    # PEFT (AutoPeftModel) hands the recorded path to from_pretrained as it is: a relative one is read from the
    # current folder, not the adapter's, so it is read here the same way, and the warning says so.
    where = (
        ""
        if base.is_absolute()
        else f", a relative path read from the current folder {Path.cwd()} as PEFT reads it, i.e. {base.resolve()}"
    )
    return (
        f"the LoRA adapter {adapter} was trained over {recorded} (its adapter_config.json{where}), whose weights"
        f" differ from the reference {reference}: the bundle's policy is the adapter over the reference, not the"
        " model trained"
    )


def has_chat_template(folder: Path) -> bool:
    """Whether the folder's files hold a chat template where transformers reads one (chat_template.jinja,
    chat_template.json, additional_chat_templates/, or the chat_template of processor_config.json or
    tokenizer_config.json), without loading the processor."""
    jinja, extra = folder / "chat_template.jinja", folder / "additional_chat_templates"
    if jinja.is_file() and jinja.read_text(errors="replace").strip():
        return True
    if extra.is_dir() and any(extra.glob("*.jinja")):
        return True
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file() and read_json_object(path, BundleError).get("chat_template"):
            return True
    return False


def check_served_files(policy: Path, reference: Path) -> None:
    """What the service's processor (the reference's) needs, read from the files without loading anything: an
    image processor for a vision-language model, a chat template. `check_compatible` runs it before making a
    bundle, `reward.bundle.check_bundle` before serving one. Processors that run their own code are left to the
    service, which may trust it."""
    from rlaifv.reward.models import is_text_only

    remote = _needs_remote_code(reference)
    ref_images = image_settings(reference)
    if ref_images is None and image_settings(policy) is not None:  # both without one: a text-only pair, served too
        raise BundleError(
            f"reference folder {reference} has no image processor (processor_config.json or "
            "preprocessor_config.json) but the policy has one: the bundle's processor comes from the reference"
        )
    config = reference / "config.json"
    model_type = read_json_object(config, BundleError).get("model_type") if config.is_file() else None
    if ref_images is None and not is_text_only(model_type) and not remote:
        raise BundleError(
            f"reference folder {reference} holds a vision-language model (model_type {model_type!r}) but has no "
            "image processor (processor_config.json or preprocessor_config.json): copy the processor files of the "
            "model it was trained from"
        )
    if not remote and not has_chat_template(reference):
        raise BundleError(
            f"reference folder {reference} has no chat template (chat_template.jinja, chat_template.json, or "
            "chat_template in processor_config.json or tokenizer_config.json): prompts cannot be rendered"
        )


def end_of_turn_problem(reference: Path, token: str) -> str | None:
    """Why `token` cannot close an answer with the reference's tokenizer (not one of its tokens); None when it can
    or the folder has no tokenizer.json to tell (the load decides)."""
    facts = tokenizer_facts(reference)
    if facts is None or token in facts.tokens:
        return None
    special = {v for k, v in facts.special.items() if k != "extra_special_tokens"}
    special |= set(json.loads(facts.special.get("extra_special_tokens", "[]")))
    return (
        f"end-of-turn token {token!r} is not in the reference's vocabulary of {facts.size} tokens "
        f"({reference / 'tokenizer.json'}; its special tokens: {', '.join(sorted(special))})"
    )


def _refuse_unservable_source(folder: Path, what: str) -> None:
    """Folders `bundle create` is given by mistake, named with the fix: a bundle (its model folders are the
    sources) and checkpoints in their authors' layout, which `rlaifv convert` turns into servable folders."""
    if (folder / MANIFEST).is_file():
        try:
            manifest = read_manifest(folder)
            inner = f"its {what} folder, {resolve(folder, getattr(manifest, what))}"
        except BundleError:
            inner = "the model folders its manifest names"
        raise BundleError(f"{what} folder {folder} is a bundle (it holds {MANIFEST}), not a model folder: use {inner}")
    if not (folder / "config.json").is_file():
        return
    config = read_json_object(folder / "config.json", BundleError)
    model_type = config.get("model_type")
    original_llava = model_type == "llava_llama" or (
        model_type == "llava" and "text_config" not in config and "mm_vision_tower" in config
    )
    if original_llava:
        raise BundleError(
            f"{what} folder {folder} is a LLaVA checkpoint in the original repository's format (model_type "
            f"{model_type!r}), which transformers does not load: convert it first with "
            f"`rlaifv convert llava {folder} --vision CLIP_FOLDER -o OUTPUT` and use OUTPUT"
        )
    if model_type == "omnilmm" and config.get("im_patch_token_id") is None:
        raise BundleError(
            f"{what} folder {folder} is a published OmniLMM folder (its config.json has no im_patch_token_id): "
            f"convert it first with `rlaifv convert omnilmm {folder} -o OUTPUT` and use OUTPUT"
        )


def check_compatible(policy: Path, reference: Path, *, end_of_turn: str | None = None) -> PolicyType:
    """Refuse a policy/reference pair the reward cannot compare, naming every difference; return the policy type.

    Everything here reads the source folders (configs, tokenizers, safetensors headers) before anything is copied,
    and refuses what the service would refuse on loading the bundle."""
    _refuse_unservable_source(reference, "reference")
    _refuse_unservable_source(policy, "policy")
    _check_model(reference, "reference")
    _check_model(policy, "policy")
    if detect_policy_type(reference) == "lora":
        raise BundleError(f"reference folder {reference} is a LoRA adapter: the reference must be a full model")
    policy_type = detect_policy_type(policy)
    ref_tok = tokenizer_facts(reference)
    if ref_tok is None:
        raise BundleError(
            f"reference folder {reference} has no tokenizer.json: the bundle's tokenizer comes from the reference "
            "(re-save it with AutoTokenizer.from_pretrained(path).save_pretrained(path) to write one)"
        )
    check_served_files(policy, reference)
    ref_images = image_settings(reference)
    _check_processor(reference)
    problems: list[str] = []
    policy_tok = tokenizer_facts(policy)
    if policy_tok is not None:
        problems += [f"tokenizer {p}" for p in tokenizer_differences(policy_tok, ref_tok)]
    policy_images = image_settings(policy)
    if policy_images is not None and ref_images is not None:
        loaded_policy, loaded_reference = loaded_image_settings(policy), loaded_image_settings(reference)
        if loaded_policy is not None and loaded_reference is not None:  # as the service will use them
            policy_images, ref_images = loaded_policy, loaded_reference
        problems += [f"image preprocessing {p}" for p in settings_differences(policy_images, ref_images)]
    if policy_type == "full" and ref_images is not None:
        policy_config, reference_config = model_config_image_settings(policy), model_config_image_settings(reference)
        problems += [f"model config {p}" for p in settings_differences(policy_config, reference_config)]
    if policy_type == "lora":
        base_problem = lora_base_class_problem(policy, reference)
        problems += [f"LoRA base: {base_problem}"] if base_problem else []
        problems += [f"LoRA base {p}" for p in lora_shape_problems(policy, reference)]
    if problems:
        kind = "LoRA adapter" if policy_type == "lora" else "model"
        raise BundleError(
            f"policy {kind} {policy} and reference {reference} are not compatible: the reward compares log-probs "
            "of the same tokens for the same image features, so both must share tokenizer and image preprocessing "
            "(and a LoRA adapter must fit the reference's weights)\n  - " + "\n  - ".join(problems)
        )
    if end_of_turn is None and not _eos_token(reference):
        raise BundleError(
            f"the reference's tokenizer ({reference}) has no eos_token, so nothing marks the end of an answer:"
            " name the end-of-turn token with --end-of-turn"
        )
    if end_of_turn is not None and (problem := end_of_turn_problem(reference, end_of_turn)):
        raise BundleError(problem)
    _check_weights_complete(reference, "reference")
    if policy_type == "full" and policy != reference:
        _check_weights_complete(policy, "policy")
    return policy_type


def _eos_token(folder: Path) -> str | None:
    """The loaded tokenizer's eos_token (where the config files put it is the tokenizer's business)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder)).eos_token  # type: ignore[no-any-return]
    except (OSError, ValueError, KeyError, TypeError):
        return "?"  # not loadable here: the load names the problem


def _inside(child: Path, parent: Path) -> bool:
    """Whether `child` is `parent` or below it, as folders on disk (links followed, `..` collapsed), not as text."""
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def _prepare_output(output: Path, sources: list[Path], *, force: bool) -> None:
    """Refuse, before anything is read, written or removed, an output the bundle cannot take the place of: one that
    overlaps a source (the copy would go into itself, or replacing the output would delete the source), one that
    holds the current folder, and, even with `force`, a non-empty folder that is not a bundle (`--force` on a
    project folder deleted the project). A link as output is replaced, never followed."""
    for parent in output.parents:
        if parent.is_symlink() and not parent.exists():
            raise BundleError(f"output {output}: {parent} is a broken link")
        if parent.exists():
            if not parent.is_dir():
                raise BundleError(f"output {output}: {parent} is a file, not a folder")
            break
    if output.exists() and _inside(Path.cwd(), output):
        raise BundleError(
            f"output folder {output} holds the current folder, which replacing it would delete: "
            "choose another output or run from elsewhere"
        )
    for source in sources:
        if _inside(output, source):
            raise BundleError(
                f"output folder {output} is inside the model folder {source} (they overlap): choose another output"
            )
        if _inside(source, output):
            raise BundleError(
                f"output folder {output} overlaps the model folder {source}, which is inside it: writing the bundle"
                " there would replace the folder it is made from; choose another output"
            )
    if output.is_symlink():
        if not force:
            raise BundleError(
                f"output {output} is a link: pass --force to replace the link (what it points to is kept) or choose"
                " another output"
            )
        return
    if output.exists() and not output.is_dir():
        raise BundleError(f"output {output} exists and is not a folder")
    held = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
    if held and not (output / MANIFEST).is_file():
        raise BundleError(
            f"output folder {output} is not empty and is not a bundle (no {MANIFEST}; it holds {_sample(held)}): "
            "--force replaces only a bundle folder; choose another output or empty this one yourself"
        )
    if held and not force:
        raise BundleError(
            f"output folder {output} is not empty (it holds a bundle): choose another output or pass --force to "
            "replace it"
        )


def _rlaifv_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rlaifv")
    except PackageNotFoundError:
        return "0+unknown"


def create_bundle(
    output: str | Path,
    *,
    policy: str | Path,
    reference: str | Path,
    beta: float = 0.1,
    normalize: Normalize = "mean",
    end_of_turn: str | None = None,
    name: str = "rlaifv",
    copy: bool = True,
    force: bool = False,
) -> BundleManifest:
    """Validate a policy/reference pair and write it as a bundle, or write nothing and raise `BundleError`.

    The bundle is assembled in a temporary sibling folder and moved into place only
    when complete, so a failed copy never leaves a half-written bundle (or, with
    `force`, destroys the old one). `force` replaces only a bundle (a folder holding
    rlaifv.json) or a link, never a folder of other files or one holding a source.
    `copy=False` records absolute paths instead, for models kept on shared storage.
    """
    output = Path(os.path.abspath(Path(output).expanduser()))  # `..` collapsed; a link as output stays one
    policy_path, reference_path = Path(policy).expanduser().resolve(), Path(reference).expanduser().resolve()
    try:
        BundleManifest(
            name=name, policy="policy", reference="reference", beta=beta, normalize=normalize, end_of_turn=end_of_turn
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise BundleError(f"invalid bundle settings: {problems}") from None
    _prepare_output(output, [policy_path, reference_path], force=force)
    policy_type = check_compatible(policy_path, reference_path, end_of_turn=end_of_turn)
    if policy_path == reference_path:
        warnings.warn(
            f"the policy and the reference are the same folder ({policy_path}): every reward will be 0",
            UserWarning,
            stacklevel=2,
        )
    if policy_type == "lora" and (mismatch := lora_base_mismatch(policy_path, reference_path)):
        warnings.warn(mismatch, UserWarning, stacklevel=2)
    provenance = {
        "created_by": CREATED_BY,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "policy_source": str(policy_path),
        "reference_source": str(reference_path),
        "rlaifv_version": _rlaifv_version(),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    umask_modes(staging)  # mkdtemp's 0700 would stay the bundle's
    try:
        write_bundle(
            staging,
            policy=policy_path,
            reference=reference_path,
            policy_type=policy_type,
            reward=RewardConfig(beta=beta, normalize=normalize),
            name=name,
            end_of_turn=end_of_turn,
            provenance=provenance,
            copy=copy,
        )
        manifest = read_manifest(staging)
        try:  # the sources were read before copying: a copy that does not read back was cut short
            describe_bundle(staging)
        except BundleError as exc:
            raise BundleError(
                f"cannot write bundle {output}: the copy does not read back ("
                + str(exc).replace(str(staging), str(output))
                + "); nothing was written"
            ) from None
        _prepare_output(output, [policy_path, reference_path], force=force)  # again: the copy may have taken long
        if output.is_symlink():  # replaced, not followed: what it points to is kept
            target = os.readlink(output)
            output.unlink()
            try:
                staging.rename(output)
            except OSError:
                output.symlink_to(target)
                raise
        elif output.exists():
            retired = output.with_name(staging.name + ".old")
            output.rename(retired)
            try:
                staging.rename(output)
            except OSError:
                retired.rename(output)
                raise
            shutil.rmtree(retired)
        else:
            staging.rename(output)
    except OSError as exc:
        raise BundleError(f"cannot write bundle {output}: {exc}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


class ModelSummary(BaseModel):
    """One model folder of a bundle, from its configs and safetensors headers."""

    path: str
    stored: Literal["copied", "linked"] = Field(
        description="'copied': inside the bundle folder; 'linked': outside it (an absolute path, `..` or a link)."
    )
    kind: PolicyType
    model_type: str | None = None
    architecture: str | None = None
    parameters: int | None = Field(
        None, description="Tensor elements in the safetensors files (adapter only for LoRA)."
    )
    dtypes: list[str] = Field(default_factory=list)
    tokenizer_vocab_size: int | None = None
    lora_rank: int | None = None
    lora_base: str | None = Field(None, description="base_model_name_or_path recorded by PEFT.")


class BundleDescription(BaseModel):
    """What `rlaifv bundle inspect` shows."""

    folder: str
    name: str
    policy_type: PolicyType
    beta: float
    normalize: Normalize
    end_of_turn: str | None
    policy: ModelSummary
    reference: ModelSummary
    provenance: dict[str, Any]


def summarize_model(folder: Path, *, linked: bool) -> ModelSummary:
    kind = detect_policy_type(folder)
    tensors = safetensors_headers(folder)
    summary = ModelSummary(
        path=str(folder),
        stored="linked" if linked else "copied",
        kind=kind,
        parameters=sum(prod(t.get("shape") or []) for t in tensors.values()) if tensors else None,
        dtypes=sorted({str(t.get("dtype")) for t in tensors.values()}),
    )
    if kind == "lora":
        adapter = read_json_object(folder / "adapter_config.json", BundleError)
        mapping = adapter.get("auto_mapping")
        base_class = mapping.get("base_model_class") if isinstance(mapping, dict) else None
        rank, base = adapter.get("r"), adapter.get("base_model_name_or_path")
        summary.model_type = f"{str(adapter.get('peft_type', 'LORA')).lower()} adapter"
        summary.architecture = f"LoRA over {base_class}" if base_class else "LoRA"
        summary.lora_rank = rank if isinstance(rank, int) else None
        summary.lora_base = str(base) if base is not None else None
    elif (folder / "config.json").is_file():
        config = read_json_object(folder / "config.json", BundleError)
        model_type, architectures = config.get("model_type"), config.get("architectures")
        summary.model_type = str(model_type) if model_type is not None else None
        summary.architecture = ", ".join(map(str, architectures)) if isinstance(architectures, list) else None
        summary.architecture = summary.architecture or None
    facts = tokenizer_facts(folder)
    summary.tokenizer_vocab_size = facts.size if facts else None
    return summary


def describe_bundle(folder: str | Path) -> BundleDescription:
    """A bundle's settings, models and provenance, without loading any weights."""
    manifest = read_manifest(folder)
    models: dict[str, ModelSummary] = {}
    for role, entry in (("policy", manifest.policy), ("reference", manifest.reference)):
        path = resolve(folder, entry)
        if not path.is_dir():
            raise BundleError(f"bundle {folder}: {role} folder {path} does not exist")
        # linked: what the bundle does not hold, however the manifest reaches it (an absolute path, `..`, a link)
        models[role] = summarize_model(path.resolve(), linked=not _inside(path, Path(folder)))
    if models["policy"].kind != manifest.policy_type:  # what loading the bundle refuses: say so here too
        raise BundleError(
            f"bundle {folder}: the manifest says policy_type {manifest.policy_type!r} but the policy folder holds"
            f" a {'LoRA adapter' if models['policy'].kind == 'lora' else 'full model'}"
        )
    return BundleDescription(
        folder=str(Path(folder).resolve()),
        name=manifest.name,
        policy_type=manifest.policy_type,
        beta=manifest.beta,
        normalize=manifest.normalize,
        end_of_turn=manifest.end_of_turn,
        policy=models["policy"],
        reference=models["reference"],
        provenance=manifest.provenance,
    )
