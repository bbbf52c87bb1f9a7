"""``respctl convert``: write a model (e.g. a GGUF file, dequantized) as a safetensors folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import RespError
from .common import console, user_errors


@user_errors
def convert_model(source: str = typer.Argument(..., help="A GGUF file, a model folder or a hub id."),
                  out: Path = typer.Argument(..., help="Output folder (must not exist)."),
                  gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="The GGUF file inside SOURCE "
                                                          "(a folder or hub id)."),
                  dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16 (GGUF weights "
                                            "are dequantized to this)."),
                  revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision.")):
    """Write a model as a normal safetensors Hugging Face folder (e.g. a GGUF file, dequantized)."""
    from pydantic import ValidationError

    from ..loading import convert
    from ..recipe import ModelSection

    try:
        section = ModelSection(path=source, gguf_file=gguf_file, dtype=dtype, revision=revision)
    except ValidationError as exc:
        from ..validation import error_message

        err = exc.errors()[0]
        raise RespError(f"--{'-'.join(str(x) for x in err['loc']).replace('_', '-')}: {error_message(err)}") from None
    with console.status(f"Loading {source}"):
        res = convert(section, out)
    console.print(f"{res['model_type']} model, {res['parameters'] / 1e6:.1f}M parameters ({res['dtype']}), loaded "
                  f"in {res['load_seconds']:.1f}s, written to {res['out']} ({res['bytes'] / 1e6:.1f} MB)",
                  highlight=False, soft_wrap=True)
