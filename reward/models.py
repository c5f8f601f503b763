"""Loading vision-language models and processors through the standard auto classes.

Only safetensors weights are accepted (a pickle checkpoint can run code on
load), and `trust_remote_code` stays off unless the operator turns it on.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path
from typing import Any, Literal, get_args

from rlaifv.reward.errors import ModelLoadError, RewardError

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin", "model.ckpt")
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# Folders a bundle copy leaves out (shutil.ignore_patterns in reward.bundle.write_bundle).
_SKIPPED_FOLDERS = (".git", ".cache")
_SHOWN_MISSING = 5
# safetensors dtype names -> torch's.
_TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def pick_device(device: str | None = None) -> str:
    """'cuda' when a GPU is visible, else 'cpu', unless the caller chose: a device this machine lacks is refused
    here, by name, rather than by torch in the middle of the load."""
    import torch

    if not device or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in _DEVICE_TYPES:
        raise ModelLoadError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or xpu")
    if parsed.type == "cpu":
        return device
    backend = getattr(torch, parsed.type)
    if not backend.is_available():
        build = "" if parsed.type != "cuda" or torch.version.cuda else f" (torch {torch.__version__} is a CPU build)"
        raise ModelLoadError(f"{device!r} but {parsed.type.upper()} is not available on this machine{build}")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise ModelLoadError(f"{device!r} but this machine has {count} {parsed.type} device(s)")
    return device


def pick_dtype(device: str, dtype: DTypeName | str = "auto") -> Any:
    """float32 on CPU (exact, and CPU bf16 matmuls are slow), bfloat16 on CUDA."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in get_args(DTypeName):
        raise ModelLoadError(f"unknown dtype {dtype!r}: use {', '.join(get_args(DTypeName))}")
    return getattr(torch, dtype)


def write_text_atomically(path: str | Path, text: str) -> None:
    """`text` in `path`, whole or not at all: written beside it (a name of this process's own) and renamed over it,
    so a kill or a full disk never leaves a file cut short for the next reader."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json_object(path: Path, error: type[RewardError] = ModelLoadError) -> dict[str, Any]:
    """A JSON file that must hold an object, refused with `error` naming the file (a list or a cut-off file was a
    traceback)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path} is not a JSON object (it holds a {type(data).__name__})")
    return data


def _broken_links(folder: Path) -> list[Path]:
    """Links whose target is gone (a moved hub cache blob), anywhere a bundle copy would follow them."""
    broken = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_FOLDERS]
        for name in [*dirs, *files]:
            path = Path(root) / name
            if path.is_symlink() and not path.exists():
                broken.append(path)
    return sorted(broken)


def _weight_file(name: str) -> bool:
    return name in SAFETENSORS_FILES or name in PICKLE_FILES or name.endswith((".safetensors", ".bin"))


def check_model_folder(path: Path, *, what: str = "model", weights: bool = True) -> None:
    """Fail early, naming the file, for folders from_pretrained would reject obscurely or with a traceback: no
    folder, a broken link, a config that is not a JSON object, and (`weights`) no safetensors weights or one whose
    header is unreadable, cut short, or a shard the index names that is not there. Headers only: no weights read.
    Without `weights` (the vLLM engine: its servers load them, maybe from a volume only they mount) a weight file
    may be a link that does not resolve here."""
    if path.is_file():
        raise ModelLoadError(f"{what} folder {path} is a file, not a model folder")
    if not path.is_dir():
        raise ModelLoadError(f"{what} folder {path} does not exist")
    broken = [p for p in _broken_links(path) if weights or not _weight_file(p.name)]
    if broken:
        shown = ", ".join(f"{p.relative_to(path)} -> {os.readlink(p)}" for p in broken[:3])
        more = f" (+{len(broken) - 3} more)" if len(broken) > 3 else ""
        raise ModelLoadError(f"{what} folder {path} has a broken link: {shown}{more}")
    files = {p.name for p in path.iterdir()}
    if not files & {"config.json", "adapter_config.json"}:
        raise ModelLoadError(f"{what} folder {path} has no config.json")
    for name in ("config.json", "adapter_config.json"):
        if name in files:
            read_json_object(path / name)
    if not weights:
        return
    if not files & set(SAFETENSORS_FILES) and not any(name.endswith(".safetensors") for name in files):
        pickles = sorted(files & set(PICKLE_FILES))
        hint = f" (found {', '.join(pickles)}; convert it to safetensors)" if pickles else ""
        raise ModelLoadError(f"{what} folder {path} has no safetensors weights{hint}")
    safetensors_headers(path)


def safetensors_headers(folder: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {dtype, shape, data_offsets} from the folder's safetensors headers: no weights are read.

    As transformers loads: model.safetensors when there is one (a re-save without shards leaves the old index
    behind); else with a model.safetensors.index.json, the shards it names (every one must be there, holding the
    tensors the index puts in it); else every *.safetensors file. A header is checked as the loader would need it:
    a JSON object of tensors, each with a dtype, a shape and offsets that the file is long enough to hold."""
    index = folder / "model.safetensors.index.json"
    placement: dict[str, str] = {}
    if (folder / "model.safetensors").is_file():
        paths = [folder / "model.safetensors"]
    elif index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if (
            not isinstance(weight_map, dict)
            or not weight_map
            or not all(isinstance(v, str) for v in weight_map.values())
        ):
            raise ModelLoadError(f"{index} has no weight_map of tensor names to shard files")
        placement = weight_map
        shards = sorted(set(placement.values()))
        absent = [name for name in shards if not (folder / name).is_file()]
        if absent:
            raise ModelLoadError(f"{index} names missing shard(s): {', '.join(absent)}")
        paths = [folder / name for name in shards]
    else:
        paths = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    tensors: dict[str, dict[str, Any]] = {}
    for path in paths:
        header = _safetensors_header(path)
        lost = sorted(name for name, shard in placement.items() if shard == path.name and name not in header)
        if lost:
            raise ModelLoadError(f"{index} puts {len(lost)} tensor(s) in {path.name} that it lacks: {lost[0]}")
        tensors.update(header)
    return tensors


def _safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    def refuse(why: str) -> ModelLoadError:
        return ModelLoadError(f"{path} is not a safetensors file: {why}")

    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise refuse("too short")
        (size,) = struct.unpack("<Q", head)
        if size > _MAX_HEADER_BYTES:
            raise refuse(f"a header of {size} bytes")
        try:
            header = json.loads(handle.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise refuse(f"its header is unreadable ({exc})") from None
    if not isinstance(header, dict):
        raise refuse("its header is not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        if not isinstance(info, dict):
            raise refuse(f"tensor {name!r} is not described by an object")
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
            raise refuse(f"tensor {name!r} has no valid data_offsets")
        if not (isinstance(shape, list) and all(_count(d) for d in shape)) or not isinstance(info.get("dtype"), str):
            raise refuse(f"tensor {name!r} has no valid dtype and shape")
        end = max(end, offsets[1])
    needed = 8 + size + end
    actual = path.stat().st_size
    if actual < needed:  # a copy cut short: loading it would fail
        raise ModelLoadError(f"{path} is truncated: {actual} bytes, its header describes {needed}")
    return header


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def max_positions(model: Any) -> int | None:
    """The positions the model (its text part) was built for: what the service refuses prompt + answer past."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", config)
    return getattr(text_config, "max_position_embeddings", None)


def is_local(name_or_path: str | Path) -> bool:
    return Path(name_or_path).exists() or str(name_or_path).startswith((".", "/", "~"))


def register_native_families() -> None:
    """Make the auto classes resolve the families implemented here (OmniLMM: `reward/omnilmm/`)."""
    from rlaifv.reward.omnilmm import register

    register()


def load_processor(name_or_path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The folder's processor; without torchvision, an image-only one for processors that also handle video.

    Qwen-VL, SmolVLM, InternVL and Pixtral processors carry a video processor,
    and transformers builds video processors only with torchvision. The service
    sends images only, so where torchvision is missing the same processor class
    is built without its video part (`image_only_processor`).
    """
    from transformers import AutoProcessor, PreTrainedTokenizerBase

    register_native_families()
    try:
        processor = AutoProcessor.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
        processor = TextProcessor(processor) if isinstance(processor, PreTrainedTokenizerBase) else processor
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        if not has_torchvision() and Path(name_or_path).is_dir():
            try:
                processor = image_only_processor(Path(name_or_path))
            except ModelLoadError as inner:
                raise ModelLoadError(
                    f"cannot load processor from {name_or_path}: {exc}; without torchvision: {inner}"
                ) from exc
        else:
            raise ModelLoadError(f"cannot load processor from {name_or_path}: {exc}") from exc
    return _with_chat_template(processor, name_or_path)


# A model folder's processor files (tokenizer, image/video preprocessing, chat template, remote processor code):
# everything `AutoProcessor.from_pretrained` reads, nothing the weights or model config are in.
PROCESSOR_FILE_PREFIXES = (
    "tokenizer",
    "special_tokens_map",
    "added_tokens",
    "vocab",
    "merges",
    "spiece",
    "sentencepiece",
    "preprocessor_config",
    "processor_config",
    "video_preprocessor_config",
    "chat_template",
    "processing_",
    "image_processing_",
    "video_processing_",
    "tokenization_",
)
PROCESSOR_FILE_SUFFIXES = (".model", ".tiktoken")
PROCESSOR_FOLDERS = ("additional_chat_templates",)


def copy_processor_files(source: str | Path, target: str | Path) -> list[str]:
    """Copy the processor files of model folder `source` into `target`; returns their names.

    A trained model's processor is its starting model's: copying the files keeps what re-saving the loaded
    processor would lose (a video processor built without torchvision cannot be saved at all; file names and
    formats another transformers release reads)."""
    import shutil

    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_dir() and path.name in PROCESSOR_FOLDERS:
            shutil.copytree(path, target / path.name, dirs_exist_ok=True)
        elif path.is_file() and (
            path.name.startswith(PROCESSOR_FILE_PREFIXES) or path.suffix in PROCESSOR_FILE_SUFFIXES
        ):
            shutil.copy2(path, target / path.name)
        else:
            continue
        copied.append(path.name)
    return copied


def save_processor(processor: Any, source: str | Path, target: str | Path) -> None:
    """The processor of a model trained from `source`, written beside it in `target`: the source folder's files
    where it is a folder with them, else `processor.save_pretrained`."""
    if Path(source).is_dir() and copy_processor_files(source, target):
        return
    processor.save_pretrained(str(target))


def _with_chat_template(processor: Any, name_or_path: str | Path) -> Any:
    """Prompts are rendered with the chat template: one kept only in tokenizer_config.json (older checkpoints)
    serves the processor too; none at all is refused now rather than at the first request."""
    fallback = getattr(getattr(processor, "tokenizer", None), "chat_template", None)
    if not getattr(processor, "chat_template", None) and fallback:  # a TextProcessor reads its tokenizer's already
        processor.chat_template = fallback
    if not getattr(processor, "chat_template", None):
        raise ModelLoadError(
            f"{name_or_path} has no chat template (chat_template.jinja, chat_template.json, or chat_template in"
            " processor_config.json or tokenizer_config.json): prompts cannot be rendered"
        )
    return processor


class TextProcessor:
    """A text-only model's tokenizer in the processor's shape (`.tokenizer`, `apply_chat_template`, `__call__`).

    AutoProcessor returns the bare tokenizer for a folder without an image processor (a plain causal LM);
    this lets such a model serve as a pair whose prompts are text only. Images are refused
    (`reward.prompt.encode_prompt` names the field).
    """

    accepts_images = False

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @property
    def chat_template(self) -> Any:
        return self.tokenizer.chat_template

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(conversation, **kwargs)

    def __call__(self, *, text: Any, images: Any = None, **kwargs: Any) -> Any:
        if images:
            raise ValueError("a text-only model takes no images")
        return self.tokenizer(text, **kwargs)


def has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def image_only_processor(folder: Path) -> Any:
    """The folder's processor class built from its tokenizer, image processor and template, with no video part."""
    import inspect

    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer, ProcessorMixin

    config_path = folder / "processor_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    # A hub checkpoint saved before processor_config.json existed names its class in the other configs.
    named = [config] + [
        json.loads((folder / name).read_text())
        for name in ("preprocessor_config.json", "tokenizer_config.json")
        if (folder / name).is_file()
    ]
    class_name = next((str(c["processor_class"]) for c in named if c.get("processor_class")), "")
    if not class_name:
        raise ModelLoadError(
            f"{folder} names no processor class (processor_class in processor_config.json, "
            "preprocessor_config.json or tokenizer_config.json)"
        )
    try:
        base = getattr(transformers, class_name, None)
        attributes = set(base.get_attributes()) if base is not None else set()
    except ImportError as exc:
        raise ModelLoadError(
            f"{class_name} cannot be built without torchvision ({exc}); install the torchvision release built for"
            f" torch {_torch_version()} (on CPU: the CPU wheel from download.pytorch.org)"
        ) from exc
    if base is None:
        raise ModelLoadError(f"unknown processor class {class_name!r} in {config_path}")
    if attributes - {"image_processor", "tokenizer", "video_processor"}:
        raise ModelLoadError(f"{class_name} needs {sorted(attributes)}; only image and video parts can be left out")

    def check_argument_for_proper_class(self: Any, name: str, argument: Any) -> Any:
        if argument is None and name == "video_processor":
            return None
        return base.check_argument_for_proper_class(self, name, argument)

    def apply_chat_template(self: Any, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
        # Some families' own override reads video settings (SmolVLM: num_frames); images need only the template.
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    methods: dict[str, Any] = {"check_argument_for_proper_class": check_argument_for_proper_class}
    if "video_processor" in attributes:
        methods["apply_chat_template"] = apply_chat_template
    image_only = type(class_name, (base,), methods)  # the real name: what to_dict and logs show
    template_file, legacy = folder / "chat_template.jinja", folder / "chat_template.json"
    template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
    if template is None and legacy.is_file():
        template = json.loads(legacy.read_text()).get("chat_template")
    accepted = set(inspect.signature(base.__init__).parameters) - {"self", "image_processor", "tokenizer"}
    kwargs = {k: v for k, v in config.items() if k in accepted and k not in ("video_processor", "chat_template")}
    try:
        parts = {
            "image_processor": AutoImageProcessor.from_pretrained(str(folder)),
            "tokenizer": AutoTokenizer.from_pretrained(str(folder)),
        }
        if "video_processor" in attributes:
            parts["video_processor"] = None
        return image_only(**parts, chat_template=template, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise ModelLoadError(f"cannot build {class_name} without its video processor: {exc}") from exc


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def load_model(
    name_or_path: str | Path,
    *,
    device: str | None = None,
    dtype: DTypeName | str = "auto",
    trust_remote_code: bool = False,
) -> Any:
    """An image-text-to-text model (or a text-only causal LM) in eval mode on `device`, safetensors only."""
    from transformers import AutoConfig

    device = pick_device(device)
    if is_local(name_or_path):
        check_model_folder(Path(name_or_path).expanduser())
    register_native_families()
    try:
        config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
        auto = _auto_class(config.model_type)
        loaded = auto.from_pretrained(
            str(name_or_path),
            dtype=pick_dtype(device, dtype),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model from {name_or_path}: {exc}") from exc
    # A remote-code class whose own from_pretrained returns the model alone says nothing of missing tensors.
    model, info = loaded if isinstance(loaded, tuple) else (loaded, {"missing_keys": []})
    _refuse_missing(name_or_path, info["missing_keys"], what="model")
    return model.to(device).eval()


def is_text_only(model_type: str | None) -> bool:
    """A plain causal LM (served as a text-only pair), as `load_model` decides which auto class loads a folder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    return (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    )


def _auto_class(model_type: str | None) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForCausalLM if is_text_only(model_type) else AutoModelForImageTextToText


def _refuse_missing(folder: str | Path, missing: Any, *, what: str) -> None:
    """transformers fills the tensors a checkpoint lacks with random values and only logs it: a merged checkpoint
    saved without its vision tower would serve random image features. `missing` is what transformers reports after
    its own exceptions (tied weights, non-persistent buffers, the model's `_keys_to_ignore_on_load_missing`)."""
    names = sorted(missing)
    if names:
        shown = ", ".join(names[:_SHOWN_MISSING]) + (
            f" (+{len(names) - _SHOWN_MISSING} more)" if len(names) > _SHOWN_MISSING else ""
        )
        raise ModelLoadError(
            f"{what} folder {folder} lacks {len(names)} of the tensors its config.json describes ({shown}): "
            "they would be random. Was part of the model left out when it was saved or merged?"
        )


def missing_weights(folder: Path) -> list[str] | None:
    """The tensors `load_model` would refuse as missing, found without reading any weights: the model is built on
    the meta device and given meta tensors shaped as the safetensors headers say, so transformers' own renaming and
    exception rules decide. None when that cannot be told here (a config only remote code reads, a quantized
    checkpoint, an unknown dtype): the load itself then decides."""
    import torch
    from transformers import AutoConfig
    from transformers.models.auto.auto_factory import _get_model_class
    from transformers.utils import logging as hf_logging

    register_native_families()
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the loading report lists what is missing again, in a table
    hf_logging.disable_progress_bar()
    try:
        state = {
            name: torch.empty(info["shape"], dtype=getattr(torch, _TORCH_DTYPES[info["dtype"]]), device="meta")
            for name, info in safetensors_headers(folder).items()
        }
        config = AutoConfig.from_pretrained(str(folder))
        auto = _auto_class(config.model_type)
        model_class = _get_model_class(config, auto._model_mapping)
        _, info = model_class.from_pretrained(
            None, config=config, state_dict=state, device_map="meta", output_loading_info=True
        )
    except ModelLoadError:
        raise
    except Exception:  # an early check only; the load names whatever this could not read
        return None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return sorted(info["missing_keys"])


def check_weights_complete(folder: Path, *, what: str = "model") -> None:
    """Refuse, before any load, a full model folder whose safetensors lack tensors its config describes."""
    missing = missing_weights(folder)
    if missing:
        _refuse_missing(folder, missing, what=what)


def load_adapter(base: Any, adapter_path: str | Path) -> Any:
    """Wrap `base` with a PEFT LoRA adapter; disabling the adapter gives back the base (the reference).

    Every LoRA weight the adapter's modules need must come from the file: PEFT only warns about missing ones and
    leaves them at their initial values (B = 0: a policy equal to its reference, every reward 0). An adapter saved
    under an older transformers' module names (Qwen2-VL's `model.layers` before `model.language_model.layers`) is
    read through the model's own checkpoint renamings; one that still does not fit is refused."""
    try:
        from peft import PeftConfig, PeftModel
    except ImportError as exc:  # pragma: no cover - peft is a core dependency
        raise ModelLoadError("a LoRA policy needs the 'peft' package") from exc
    path = Path(adapter_path)
    if is_local(path):
        check_model_folder(path, what="adapter")
    try:
        config = PeftConfig.from_pretrained(str(path))
        config.inference_mode = True
        with warnings.catch_warnings():  # peft asks transformers 5 a deprecated property: nothing a user can change
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            model = PeftModel(base, config)
        missing = model.load_adapter(str(path), adapter_name="default", is_trainable=False).missing_keys
        if missing and (renamings := _checkpoint_renamings(base)):
            missing = model.load_adapter(
                str(path), adapter_name="default", is_trainable=False, key_mapping=renamings
            ).missing_keys
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load adapter from {adapter_path}: {exc}") from exc
    if missing:
        raise ModelLoadError(
            f"adapter {adapter_path} lacks {len(missing)} of the LoRA weights its config asks for (e.g."
            f" {', '.join(missing[:3])}): its module names do not match this model's (saved with another"
            " transformers version or for another model?)"
        )
    return model.eval()


def _checkpoint_renamings(model: Any) -> dict[str, str]:
    """The model's renamings of old checkpoint keys (transformers' conversion mapping) as regex -> replacement,
    for PEFT's `key_mapping`; only plain one-to-one renamings (weight merges and splits have no LoRA meaning)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # an older transformers: nothing to rename with
        return {}
    out: dict[str, str] = {}
    for rule in get_model_conversion_mapping(model) or []:
        sources, targets = getattr(rule, "source_patterns", None), getattr(rule, "target_patterns", None)
        if type(rule).__name__ in ("WeightRenaming", "PrefixChange") and sources and targets and len(targets) == 1:
            out |= {str(source): str(targets[0]) for source in sources}
    return out
