"""Command-line plumbing shared by the conversion scripts (and the `--dtype` names of the `mimo-audio` command).

A conversion never writes over its inputs and never leaves a half-written output: `check_output_dir` refuses an
output directory that is, lies inside or links to an input directory (also with `--force`), and `staged_output_dir`
writes everything into a temporary directory next to the target, which is moved into place only when the conversion
(and its verification) succeeded. With `--force`, moving into place replaces only the files the conversion wrote and
the weight files of an earlier conversion (`model.safetensors`, its shards and index); every other file stays.
"""

import argparse
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError


# `--dtype` names of the conversion scripts and the `mimo-audio` command.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Weight files an earlier conversion may have left: replaced as a whole, so no stale shard survives.
WEIGHT_FILE_PATTERN = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
EXIT_FAILURE = 1
EXIT_USAGE = 2


class OutputDirError(ValueError):
    """`--output_dir` is an input directory, lies inside one, or would overwrite one."""


def check_output_dir(
    output_dir: str | Path,
    inputs: dict[str, str | Path | None],
    force: bool,
    written_subdirs: tuple[str, ...] = (),
) -> None:
    """
    Checks, before any work, that a conversion may write `output_dir`.

    Args:
        output_dir: the directory the conversion writes.
        inputs: option name (e.g. `"--input_dir"`) -> directory the conversion reads (`None` entries are skipped).
        force: whether a non-empty `output_dir` may receive the conversion's files.
        written_subdirs: subdirectories of `output_dir` the conversion writes (e.g. `("audio_tokenizer",)`); an input
            directory may not be one of them either.

    Raises:
        OutputDirError: `output_dir` (symbolic links resolved) is an input directory or lies inside one, or an input
            directory is one of `written_subdirs`; `--force` does not lift this.
        FileExistsError: `output_dir` is a file, or a non-empty directory and `force` is false.
    """
    output_dir = Path(output_dir)
    target = output_dir.resolve()
    for option, directory in inputs.items():
        if directory is None:
            continue
        source = Path(directory).resolve()
        if target == source or target.is_relative_to(source):
            raise OutputDirError(
                f"--output_dir {str(output_dir)!r} is or lies inside {option} {str(directory)!r}: the conversion "
                "never writes into its input (also not with --force); choose another --output_dir."
            )
        for subdir in written_subdirs:
            if source == target / subdir or source.is_relative_to(target / subdir):
                raise OutputDirError(
                    f"{option} {str(directory)!r} lies in {str(output_dir / subdir)!r}, which the conversion writes "
                    "(also with --force); move it or choose another --output_dir."
                )
    if output_dir.exists():
        if not output_dir.is_dir():
            raise FileExistsError(f"--output_dir {str(output_dir)!r} exists and is not a directory.")
        if any(output_dir.iterdir()) and not force:
            raise FileExistsError(
                f"--output_dir {str(output_dir)!r} exists and is not empty; pass --force to replace the files the "
                "conversion writes (other files are kept)."
            )


def conversion_argument_parser(description: str, checkpoint: str) -> argparse.ArgumentParser:
    """
    The arguments every conversion script takes: `--input_dir` (the original `checkpoint` directory), `--output_dir`,
    `--dtype`, `--force` and `--verify`. A script adds its own (e.g. `--tokenizer_dir`) to the parser returned.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", required=True, help=f"original {checkpoint} checkpoint directory")
    parser.add_argument("--output_dir", required=True, help="where to write the converted checkpoint")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="cast floating-point weights (default: keep their dtype)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --output_dir, replacing only the files the conversion writes",
    )
    parser.add_argument(
        "--verify", action="store_true", help="run the original and the converted checkpoint on a sample and compare"
    )
    return parser


@contextmanager
def staged_output_dir(output_dir: str | Path) -> Iterator[Path]:
    """
    Yields a new temporary directory next to `output_dir` for the conversion to write into. When the block succeeds,
    its content is moved into `output_dir` (`move_into_place`); when it fails, the temporary directory is deleted and
    `output_dir` is untouched.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial", dir=output_dir.parent))
    try:
        yield staging
        move_into_place(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into_place(staging: Path, output_dir: Path) -> None:
    """
    Moves the files of `staging` into `output_dir`: a rename when `output_dir` does not exist, else file by file,
    replacing files of the same name and, in each directory where new weights arrive, the weight files of an earlier
    conversion (`WEIGHT_FILE_PATTERN`). Other files of `output_dir` are kept.
    """
    if not output_dir.exists():
        staging.rename(output_dir)
        return
    entries = list(staging.iterdir())
    if any(WEIGHT_FILE_PATTERN.match(entry.name) for entry in entries):
        for stale in output_dir.iterdir():
            if stale.is_file() and WEIGHT_FILE_PATTERN.match(stale.name):
                stale.unlink()
    for entry in entries:
        destination = output_dir / entry.name
        if entry.is_dir():
            move_into_place(entry, destination)
        else:
            os.replace(entry, destination)


MODEL_CARD = """---
library_name: transformers
tags:
- transformers-mimo
- {model_type}
---

# {title}

Converted with transformers-mimo from `{source}`. This directory needs the `transformers-mimo`
package: **import it before loading** (`pip install transformers-mimo`), it registers `{model_type}` with the Auto
classes. Without the import, `AutoModel` says Transformers does not recognize the architecture and `AutoProcessor`
silently returns only the text tokenizer.

```python
import transformers_mimo  # registers the MiMo-Audio classes with the Auto factories
from transformers import {auto_classes}

{usage}
```
"""


def write_model_card(staging: Path, output_dir: Path, **fields) -> bool:
    """
    Writes `README.md` (the model card, `MODEL_CARD` filled with `fields`) into `staging`, unless `output_dir` already
    has a `README.md` (a file of the user's, which the conversion never replaces). Returns whether it was written.
    """
    if (Path(output_dir) / "README.md").exists():
        return False
    (Path(staging) / "README.md").write_text(MODEL_CARD.format(**fields))
    return True


def run_conversion(convert, *args, **kwargs):
    """
    Runs a conversion for a command-line `main`: an expected failure prints one line `error: ...` to stderr, without a
    traceback, and exits with 2 for a wrong argument (a missing input, a refused `--output_dir`) or 1 for a failed
    conversion (mismatched or corrupted weights, a failed verification, a write error). Returns `convert`'s result.
    """
    try:
        return convert(*args, **kwargs)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, OutputDirError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except (ValueError, OSError, SafetensorError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_FAILURE) from None


__all__ = [
    "DTYPES",
    "OutputDirError",
    "check_output_dir",
    "conversion_argument_parser",
    "move_into_place",
    "run_conversion",
    "staged_output_dir",
    "write_model_card",
]
