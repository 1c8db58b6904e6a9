"""The one check of an output path before any work: its folder exists and is writable.

Cheap to import (no JAX): the command line, ``plugin.md.MDOptions`` and ``plugin.learn`` call
it before anything is computed, so a run never finds out at its first write.
"""

from __future__ import annotations

import os
from pathlib import Path


def check_writable_folder(path, label: str) -> None:
  """``ValueError`` (one line naming ``label`` and the fix) if the folder ``path`` would be
  written into is missing or not writable."""
  folder = Path(path).parent if str(Path(path).parent) else Path(".")
  if not folder.is_dir():
    raise ValueError(f"{label} {path}: folder {folder} does not exist (create it first)")
  if not os.access(folder, os.W_OK):
    raise ValueError(f"{label} {path}: folder {folder} is not writable")
