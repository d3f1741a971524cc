"""Where shipped things are: the bundled assets (`builtin:NAME`) and the recipes' folder, and how a config's
path names a folder; an atomic write for results files."""

from __future__ import annotations

import os
import re
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
#: the recipes' modules and YAML configs (`distill/recipes`, a link to the repository's top-level `recipes/`).
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
BUILTIN_PREFIX = "builtin:"


def resolve_path(path: str) -> Path:
    """`builtin:NAME` -> the shipped asset folder; a Hugging Face model id (`org/name`, not a folder here) -> its
    snapshot in the local Hugging Face cache, if downloaded (never fetched); anything else is a filesystem path."""
    if path.startswith(BUILTIN_PREFIX):
        return ASSETS / path[len(BUILTIN_PREFIX):]
    local = Path(path).expanduser()
    if not local.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(path, local_files_only=True))
        except Exception:  # not in the cache (or no huggingface_hub): reported as a missing folder
            return local
    return local


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and one rename, so a crash mid-write
    leaves the previous file whole (results files that hours of measurement went into)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)
