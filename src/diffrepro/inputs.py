"""Reading what another stage wrote. A missing, truncated or corrupt file stops the stage with one
line naming the file and the command that rebuilds it, never a parser's traceback."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from diffrepro.errors import UserError


def unreadable(path: str | Path, rebuild: str, err: Exception) -> UserError:
    if isinstance(err, FileNotFoundError):
        return UserError(f"{path} is missing: run `{rebuild}`")
    return UserError(f"{path} is truncated or corrupt ({type(err).__name__}): run `{rebuild}` to rebuild it")


def read_json(path: str | Path, rebuild: str):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise unreadable(path, rebuild, err) from None


def read_npz(path: str | Path, rebuild: str) -> dict[str, np.ndarray]:
    """Every array of an .npz, in memory."""
    try:
        with np.load(path) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise unreadable(path, rebuild, err) from None


def read_safetensors(path: str | Path, rebuild: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise unreadable(path, rebuild, err) from None
