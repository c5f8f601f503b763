"""Loading vision-language models and processors through the standard auto classes.

Only safetensors weights are accepted (a pickle checkpoint can run code on
load), and `trust_remote_code` stays off unless the operator turns it on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from rlaifv.reward.errors import ModelLoadError

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin", "model.ckpt")


def pick_device(device: str | None = None) -> str:
    """'cuda' when a GPU is visible, else 'cpu', unless the caller chose."""
    if device and device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str, dtype: DTypeName | str = "auto") -> Any:
    """float32 on CPU (exact, and CPU bf16 matmuls are slow), bfloat16 on CUDA."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise ModelLoadError(f"unknown dtype {dtype!r}") from None


def check_model_folder(path: Path, *, what: str = "model") -> None:
    """Fail early, naming the problem, for folders from_pretrained would reject obscurely."""
    if not path.is_dir():
        raise ModelLoadError(f"{what} folder {path} does not exist")
    files = {p.name for p in path.iterdir()}
    if not files & {"config.json", "adapter_config.json"}:
        raise ModelLoadError(f"{what} folder {path} has no config.json")
    if not files & set(SAFETENSORS_FILES) and not any(name.endswith(".safetensors") for name in files):
        pickles = sorted(files & set(PICKLE_FILES))
        hint = f" (found {', '.join(pickles)}; convert it to safetensors)" if pickles else ""
        raise ModelLoadError(f"{what} folder {path} has no safetensors weights{hint}")


def is_local(name_or_path: str | Path) -> bool:
    return Path(name_or_path).exists() or str(name_or_path).startswith((".", "/", "~"))


def load_processor(name_or_path: str | Path, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load processor from {name_or_path}: {exc}") from exc


def load_model(
    name_or_path: str | Path,
    *,
    device: str | None = None,
    dtype: DTypeName | str = "auto",
    trust_remote_code: bool = False,
) -> Any:
    """An image-text-to-text model in eval mode on `device`, safetensors only."""
    from transformers import AutoModelForImageTextToText

    device = pick_device(device)
    if is_local(name_or_path):
        check_model_folder(Path(name_or_path).expanduser())
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            str(name_or_path),
            dtype=pick_dtype(device, dtype),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model from {name_or_path}: {exc}") from exc
    return model.to(device).eval()


def load_adapter(base: Any, adapter_path: str | Path) -> Any:
    """Wrap `base` with a PEFT LoRA adapter; disabling the adapter gives back the base (the reference)."""
    try:
        from peft import PeftModel
    except ImportError as exc:  # pragma: no cover - peft is a core dependency
        raise ModelLoadError("a LoRA policy needs the 'peft' package") from exc
    path = Path(adapter_path)
    if is_local(path):
        check_model_folder(path, what="adapter")
    try:
        return PeftModel.from_pretrained(base, str(path), is_trainable=False).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load adapter from {adapter_path}: {exc}") from exc
