"""`rlaifv convert llava|omnilmm`: checkpoints in their authors' layout (RLAIF-V-7B, RLAIF-V-12B) to servable folders.

The logic lives in `rlaifv.convert.llava` and `rlaifv.convert.omnilmm`; this module only parses options and prints.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

convert_app = typer.Typer(
    help="Convert checkpoints published in their authors' own layout into folders the reward service loads.",
    no_args_is_help=True,
    add_completion=False,
)


@convert_app.callback()
def _group() -> None:
    """Keep `convert` a command group even while it has a single subcommand."""


@convert_app.command("llava")
def llava(
    original: Annotated[
        Path, typer.Argument(help="Original LLaVA-repo folder (config.json with model_type llava_llama and mm_* keys).")
    ],
    vision: Annotated[
        Path,
        typer.Option(help="CLIP folder named by mm_vision_tower (openai/clip-vit-large-patch14-336), with its config."),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the converted model to.")],
    dtype: Annotated[
        str, typer.Option(help="auto (keep the checkpoint's dtype), float32, float16 or bfloat16.")
    ] = "auto",
    force: Annotated[bool, typer.Option(help="Replace an earlier conversion (never a folder of other files).")] = False,
) -> None:
    """Write a LlavaForConditionalGeneration folder with the llava_v1 chat template and pad-to-square images."""
    import json

    from rlaifv.convert.llava import CONVERSION_FILE, convert_llava
    from rlaifv.reward.errors import ModelLoadError

    try:
        written = convert_llava(original, vision, output, dtype=dtype, force=force)
    except ModelLoadError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    record = json.loads((written / CONVERSION_FILE).read_text())
    typer.secho(f"wrote {written}", fg=typer.colors.GREEN)
    typer.echo(
        f"  {record['dtype']} weights, image token {record['image_token']} = id {record['image_token_index']}, "
        f"vocabulary {record['vocab_size']['original']} -> {record['vocab_size']['converted']}, "
        f"CLIP weights from the {record['vision_weights_from']}"
    )
    typer.echo(f"  conversion record: {written / CONVERSION_FILE}")
    typer.echo("next: convert the reference the same way, then make a bundle:")
    typer.echo(
        f"  rlaifv bundle create --policy {shlex.quote(str(written))} --reference <converted llava-v1.5-7b> -o <bundle>"
    )


@convert_app.command("omnilmm")
def omnilmm(
    original: Annotated[
        Path, typer.Argument(help="Published OmniLMM folder (RLAIF-V-12B, OmniLMM-12B; model_type omnilmm).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the servable model to.")],
    force: Annotated[bool, typer.Option(help="Replace an earlier conversion (never a folder of other files).")] = False,
) -> None:
    """Add a fast tokenizer, the processor and the image-token ids; re-write the weights as safetensors shards."""
    import json

    from rlaifv.convert.omnilmm import CONVERSION_FILE, convert_omnilmm
    from rlaifv.reward.errors import ModelLoadError

    try:
        written = convert_omnilmm(original, output, force=force)
    except ModelLoadError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    record = json.loads((written / CONVERSION_FILE).read_text())
    typer.secho(f"wrote {written}", fg=typer.colors.GREEN)
    typer.echo(f"  {record['weights']['tensors']} tensors, image token ids {record['image_token_ids']}")
    typer.echo("next: convert the reference (OmniLMM-12B) the same way, then make a bundle:")
    typer.echo(
        f"  rlaifv bundle create --policy {shlex.quote(str(written))} --reference <converted OmniLMM-12B> -o <bundle>"
    )
