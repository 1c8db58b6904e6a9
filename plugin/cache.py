"""JAX's persistent compilation cache, set up for eqattn: compile once per machine, not per run.

XLA compilation dominates the start of a run (tens of seconds for the shipped models on a small
CPU, against milliseconds per step). JAX can keep compiled programs on disk and reuse them in
later processes whose programs are identical (same model architecture, shapes, dtype, JAX
version and device). The library never turns this on by itself (it is a global JAX setting);
the ``eqattn`` command does, unless ``--no-cache`` is given.

Where: ``$EQATTN_CACHE_DIR`` if set (empty, ``0``, ``off``, ``false`` or ``no`` disables the
cache), else ``$XDG_CACHE_HOME/eqattn``, else ``~/.cache/eqattn``. Deleting the folder is always
safe: it only costs the compilations again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

__all__ = ["ENV_VAR", "current_folder", "default_cache_dir", "enable_compilation_cache"]

ENV_VAR = "EQATTN_CACHE_DIR"
_OFF = frozenset({"", "0", "off", "false", "no"})
_FOLDER: Optional[Path] = None  # set by enable_compilation_cache


def default_cache_dir() -> Optional[Path]:
  """The cache folder the environment asks for (see the module docstring); None: disabled."""
  value = os.environ.get(ENV_VAR)
  if value is not None:
    return None if value.strip().lower() in _OFF else Path(value).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base).expanduser() / "eqattn"


def enable_compilation_cache(path: Union[str, os.PathLike, None] = None) -> Optional[Path]:
  """Turn on JAX's persistent compilation cache in ``path`` for this process.

  ``path=None`` takes :func:`default_cache_dir` (and does nothing if ``$EQATTN_CACHE_DIR``
  disables the cache). Every program is cached, however small or quick to compile: JAX's
  defaults skip programs that compile in under a second, which are most of an MD run's.
  Call it once at start-up, before the first computation; calling it again with another folder
  moves the cache. Returns the folder used, or None when disabled.
  """
  import jax

  global _FOLDER
  folder = default_cache_dir() if path is None else Path(path).expanduser()
  if folder is None:
    return None
  folder.mkdir(parents=True, exist_ok=True)
  folder = folder.resolve()
  previous = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  # -1: no size floor and no per-filesystem override (0 lets JAX pick one).
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  _FOLDER = folder
  if previous and previous != str(folder):
    # JAX opens the cache once per process; a new folder needs it reopened.
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()
  return folder


def current_folder() -> Optional[Path]:
  """The folder :func:`enable_compilation_cache` set, while JAX's cache still points there
  (None if it was never enabled, or was moved or turned off since); :mod:`plugin.exported`
  keeps traced programs under it."""
  if _FOLDER is None:
    return None
  import jax

  return _FOLDER if jax.config.jax_compilation_cache_dir == str(_FOLDER) else None
