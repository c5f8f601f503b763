"""Bundles: the folder the trainer exports and the service loads unchanged.

    bundle/
      rlaifv.json      manifest: policy, reference, reward settings, provenance
      policy/          full model folder, or a PEFT LoRA adapter over the reference
      reference/       full model folder (holds the processor)

Paths in the manifest are relative to the bundle folder (absolute paths work
too, for bundles that point at shared model storage).
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rlaifv.reward.errors import BundleError
from rlaifv.reward.scoring import Normalize, RewardConfig

if TYPE_CHECKING:
    from rlaifv.reward.family_check import FamilyCheck
    from rlaifv.reward.model_pair import ModelPair

MANIFEST = "rlaifv.json"


class BundleManifest(BaseModel):
    """The contents of `rlaifv.json`."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["rlaifv-bundle"] = "rlaifv-bundle"
    version: Literal[1] = 1
    name: str = Field("rlaifv", min_length=1, description="Model name the service advertises.")
    policy: str = Field(min_length=1, description="Folder of the aligned model (or its LoRA adapter).")
    policy_type: Literal["full", "lora"] = "full"
    reference: str = Field(
        min_length=1, description="Folder of the reference model (the LoRA base when policy_type=lora)."
    )
    beta: float = Field(0.1, gt=0, allow_inf_nan=False)
    normalize: Normalize = "mean"
    end_of_turn: str | None = Field(
        None, description="Token closing an assistant turn; the tokenizer's EOS when unset."
    )
    provenance: dict[str, Any] = Field(
        default_factory=dict, description="How the policy was made: data hashes, settings, metrics."
    )

    @field_validator("name")
    @classmethod
    def _printable_name(cls, name: str) -> str:
        """The name is the model id clients send back and logs show: blank or with control characters, it cannot
        be typed or read."""
        if not name.strip():
            raise ValueError("must not be blank")
        if any(unicodedata.category(c) == "Cc" for c in name):
            raise ValueError("must not contain control characters (newlines, tabs)")
        return name

    @property
    def reward(self) -> RewardConfig:
        return RewardConfig(beta=self.beta, normalize=self.normalize)


def read_manifest(folder: str | Path) -> BundleManifest:
    """Parse and validate `rlaifv.json`, naming the file and field on failure."""
    path = Path(folder) / MANIFEST
    if Path(folder).is_file():
        raise BundleError(f"{folder} is a file, not a bundle folder")
    if not Path(folder).is_dir():
        raise BundleError(f"bundle folder {folder} does not exist")
    if not path.is_file():
        raise BundleError(f"{path} is missing: a bundle folder needs an {MANIFEST} manifest")
    from rlaifv.reward.models import read_json_object

    raw = read_json_object(path, BundleError)
    try:
        return BundleManifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"field '{'.'.join(str(p) for p in e['loc'])}': {e['msg']}" for e in exc.errors())
        raise BundleError(f"{path} is invalid: {problems}") from None


def resolve(folder: str | Path, entry: str) -> Path:
    path = Path(entry).expanduser()
    return path if path.is_absolute() else Path(folder) / path


def read_tokenizer_json(folder: Path) -> dict[str, Any] | None:
    """The folder's tokenizer.json, checked for the parts the bundle compares; None if the folder has none."""
    from rlaifv.reward.models import read_json_object

    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    data = read_json_object(path, BundleError)
    model, added = data.get("model", {}), data.get("added_tokens", [])
    if not isinstance(model, dict) or not isinstance(model.get("vocab", {}), dict | list | None):
        raise BundleError(f"{path} is not a tokenizer.json: 'model' is not an object with a vocab")
    if not isinstance(added, list) or not all(
        isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("content"), str) for t in added
    ):
        raise BundleError(f"{path} is not a tokenizer.json: 'added_tokens' is not a list of {{id, content}} objects")
    return data


def _vocab_fingerprint(folder: Path) -> dict[str, Any] | None:
    """The tokenizer's vocabulary and special tokens, or None if the folder has no tokenizer."""
    data = read_tokenizer_json(folder)
    if data is None:
        return None
    added = sorted((t["id"], t["content"]) for t in data.get("added_tokens", []))
    return {"vocab": data.get("model", {}).get("vocab"), "added": added}


def check_tokenizers_match(policy: Path, reference: Path) -> None:
    """Policy and reference must tokenize identically, or their log-probs are not comparable."""
    a, b = _vocab_fingerprint(policy), _vocab_fingerprint(reference)
    if a is not None and b is not None and a != b:
        raise BundleError(
            f"tokenizers differ between policy ({policy}) and reference ({reference}): "
            "the reward compares log-probs of the same tokens, so both must share one tokenizer"
        )


def write_manifest(folder: str | Path, manifest: BundleManifest) -> Path:
    """Written whole or not at all (a temporary file renamed over it): a stop while writing left a cut-short
    manifest, or, over an earlier one, a bundle that is neither."""
    from rlaifv.reward.models import write_text_atomically

    path = Path(folder) / MANIFEST
    write_text_atomically(path, manifest.model_dump_json(indent=2) + "\n")
    return path


def check_bundle(folder: str | Path, *, weights: bool = True) -> BundleManifest:
    """Everything about a bundle that is known without loading a model: the manifest, both model folders (their
    configs and, with `weights`, their safetensors headers), the policy type, the shared tokenizer, and what the
    service's processor (the reference's) needs: an image processor for a vision-language model, a chat template,
    the manifest's end_of_turn among its tokens. `load_bundle` runs it first; `rlaifv serve` runs it before
    starting, so a broken bundle is one line, not a traceback inside the server's start-up. `weights=False` for
    engines that load no weights here (vLLM)."""
    from rlaifv.reward.bundle_create import check_served_files, end_of_turn_problem
    from rlaifv.reward.errors import ModelLoadError
    from rlaifv.reward.models import check_model_folder

    manifest = read_manifest(folder)
    policy_path = resolve(folder, manifest.policy)
    reference_path = resolve(folder, manifest.reference)
    try:
        check_model_folder(reference_path, what="reference", weights=weights)
        check_model_folder(policy_path, what="policy", weights=weights)
    except ModelLoadError as exc:
        raise BundleError(f"bundle {folder}: {exc}") from None
    has_adapter = (policy_path / "adapter_config.json").is_file()
    if manifest.policy_type == "lora" and not has_adapter:
        raise BundleError(f"bundle {folder}: policy_type is 'lora' but {policy_path} has no adapter_config.json")
    if manifest.policy_type == "full" and has_adapter:
        raise BundleError(f"bundle {folder}: {policy_path} is a LoRA adapter; set policy_type to 'lora'")
    if (reference_path / "adapter_config.json").is_file():
        raise BundleError(f"bundle {folder}: reference folder {reference_path} is a LoRA adapter, not a full model")
    check_tokenizers_match(policy_path, reference_path)
    try:
        check_served_files(policy_path, reference_path)
    except BundleError as exc:
        raise BundleError(f"bundle {folder}: {exc}") from None
    if manifest.end_of_turn is not None and (problem := end_of_turn_problem(reference_path, manifest.end_of_turn)):
        raise BundleError(f"{Path(folder) / MANIFEST} is invalid: field 'end_of_turn': {problem}")
    return manifest


def load_bundle(
    folder: str | Path,
    *,
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    family_check: FamilyCheck = "refuse",
) -> ModelPair:
    """Validate a bundle and load it as a `ModelPair` (one base in memory for LoRA policies)."""
    manifest = check_bundle(folder)
    policy_path = resolve(folder, manifest.policy)
    reference_path = resolve(folder, manifest.reference)
    return load_pair(
        policy_path,
        reference_path,
        policy_type=manifest.policy_type,
        reward=manifest.reward,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        end_of_turn=manifest.end_of_turn,
        name=manifest.name,
        metadata={"bundle": str(Path(folder).resolve()), "manifest": manifest.model_dump()},
        family_check=family_check,
    )


def load_pair(
    policy_path: str | Path,
    reference_path: str | Path,
    *,
    policy_type: str = "full",
    reward: Any = None,
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    end_of_turn: str | None = None,
    name: str | None = None,
    metadata: dict[str, Any] | None = None,
    family_check: FamilyCheck = "refuse",
) -> ModelPair:
    """The one place a `ModelPair` is built from model folders (bundles, evaluations, the trainer).

    The processor comes from the reference; a LoRA policy is an adapter over the
    reference's weights (one base in memory); a policy folder equal to the
    reference folder shares the loaded model.
    """
    from rlaifv.reward.model_pair import ModelPair
    from rlaifv.reward.models import load_adapter, load_model, load_processor

    policy_path, reference_path = Path(policy_path), Path(reference_path)
    processor = load_processor(reference_path, trust_remote_code=trust_remote_code)
    reference = load_model(reference_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    if policy_type == "lora":
        policy, reference = load_adapter(reference, policy_path), None
    elif policy_path.resolve() == reference_path.resolve():
        policy = reference
    else:
        policy = load_model(policy_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return ModelPair(
        policy,
        processor,
        reference=reference,
        reward=reward,
        end_of_turn=end_of_turn,
        metadata=metadata,
        name=name if name is not None else "rlaifv",
        family_check=family_check,
    )


def umask_modes(root: Path) -> None:
    """`root` and everything below it get the umask's modes: safetensors writes weights 0600, mkdtemp makes 0700
    folders and copytree keeps both, so a bundle made by one user was unreadable to the service's (uid 10001 in
    the images)."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_bundle(
    folder: str | Path,
    *,
    policy: str | Path,
    reference: str | Path,
    policy_type: Literal["full", "lora"] = "full",
    reward: RewardConfig | None = None,
    name: str = "rlaifv",
    end_of_turn: str | None = None,
    provenance: dict[str, Any] | None = None,
    copy: bool = True,
) -> BundleManifest:
    """Assemble a bundle folder from model folders (copied in as policy/ and reference/ by default).

    While models are copied the folder holds no manifest, written (atomically) last: an export stopped halfway
    left the earlier manifest beside the new weights, which `check_bundle` and the service took for a bundle.
    Now such a folder is refused until an export completes. Only policy/, reference/ and the manifest are
    touched: other files in the folder, a folder that is a link or a mount point, and a model already in place
    stay as they are."""
    import shutil

    folder = Path(folder)
    sources = {"policy": Path(policy), "reference": Path(reference)}
    for key, source in sources.items():
        if copy and source.is_dir() and folder.resolve().is_relative_to(source.resolve()):
            raise BundleError(  # copytree would copy the bundle into itself until the path is too long
                f"the bundle folder {folder} is inside the model folder {source} it would copy: put it elsewhere"
            )
        target = folder / key  # the copy replaces it (rmtree first): a source inside it would be deleted
        if (
            copy
            and target.exists()
            and source.resolve().is_relative_to(target.resolve())
            and target.resolve() != source.resolve()
        ):
            raise BundleError(
                f"the model folder {source} is inside {target}, which the bundle's copy replaces: put it elsewhere"
            )
    reward = reward or RewardConfig()
    manifest = BundleManifest(
        name=name,
        policy=_entry("policy", sources["policy"], copy),
        policy_type=policy_type,
        reference=_entry("reference", sources["reference"], copy),
        beta=reward.beta,
        normalize=reward.normalize,
        end_of_turn=end_of_turn,
        provenance=provenance or {},
    )
    folder.mkdir(parents=True, exist_ok=True)
    copied = [key for key, source in sources.items() if copy and (folder / key).resolve() != source.resolve()]
    if copied:
        (folder / MANIFEST).unlink(missing_ok=True)  # no bundle while its models change
    for key in copied:
        target = folder / key
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        # a git clone of a hub repository keeps a second copy of the weights under .git
        shutil.copytree(sources[key], target, ignore=shutil.ignore_patterns(".git", ".cache", ".gitattributes"))
        umask_modes(target)
    write_manifest(folder, manifest)
    return manifest


def _entry(key: str, source: Path, copy: bool) -> str:
    """A manifest entry: the copy's folder name in the bundle, or the source's absolute path."""
    return key if copy else str(source.resolve())
