"""Output folders that appear complete or not at all."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import ExpoError


def check_output_dir(out: str | os.PathLike) -> None:
    """Refuse an output that exists and is not an empty folder (callers check before long work)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExpoError(f"{out} already exists and is not empty; choose another output folder or remove it")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch folder beside `out`; rename it to `out` only if the block succeeds.

    A failure (or Ctrl-C) removes the scratch folder, so no half-written output is left behind
    for a later run to mistake for a finished one. An existing non-empty `out` is refused.
    """
    check_output_dir(out)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    scratch.rename(out)
