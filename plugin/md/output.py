"""What the MD engines write: the log schema (one column list), one CSV writer, trajectory files,
progress reports.

Trajectories: ``.traj`` (ASE's binary format, float64, keeps ``atoms.info["md_state"]`` for an
exact resume) or ``.xyz`` / ``.extxyz`` (extended XYZ), appended after each chunk and closed
again, so an interrupted run keeps every frame written before it.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import ase
import ase.io
import numpy as np

from plugin import thermo

PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------------------
# the log schema


@dataclasses.dataclass(frozen=True)
class Column:
  """One log column: ``csv`` its CSV name (unit in the name), ``attr`` the :class:`MDLog` field,
  ``needs`` the observable that must exist for it (None: always there), ``value(obs, ctx)`` its
  number from one observed row (``ctx``: :class:`RowContext`)."""
  csv: str
  attr: str
  needs: Optional[str]
  value: Callable


@dataclasses.dataclass(frozen=True)
class RowContext:
  num_atoms: int
  time_fs: Callable[[int], float]  # step -> time (fs)


COLUMNS = (
    Column("step", "step", None, lambda o, c: int(o["step"])),
    Column("time_ps", "time_ps", None, lambda o, c: c.time_fs(int(o["step"])) * 1e-3),
    Column("epot_eV", "epot", None, lambda o, c: float(o["epot"])),
    Column("ekin_eV", "ekin", None, lambda o, c: float(o["ekin"])),
    Column("etot_eV", "etot", None, lambda o, c: float(o["epot"]) + float(o["ekin"])),
    Column("temperature_K", "temperature", None,
           lambda o, c: thermo.temperature_from_kinetic(float(o["ekin"]), c.num_atoms)),
    Column("conserved_eV", "conserved", "conserved", lambda o, c: float(o["conserved"])),
    Column("pressure_bar", "pressure", "pressure", lambda o, c: float(o["pressure"]) / thermo.BAR),
    Column("volume_A3", "volume", "volume", lambda o, c: float(o["volume"])),
)


def columns_for(observables: Iterable[str]) -> List[Column]:
  """The columns a run logs, given the names its observe function returns."""
  have = set(observables)
  return [c for c in COLUMNS if c.needs is None or c.needs in have]


def make_rows(columns: Sequence[Column], logs: Mapping[str, np.ndarray], count: int,
              ctx: RowContext) -> List[Dict[str, float]]:
  """Rows (dicts by CSV name) from the first ``count`` entries of observed buffers."""
  rows = []
  for i in range(count):
    obs = {k: v[i] for k, v in logs.items()}
    rows.append({c.csv: c.value(obs, ctx) for c in columns})
  return rows


@dataclasses.dataclass
class MDLog:
  """Per-row observables (one row per ``log_interval`` steps, plus the first and last step).

  Attributes (all ``(rows,)`` NumPy arrays): ``step``, ``time_ps``, ``epot``, ``ekin``,
  ``etot`` (eV), ``temperature`` (K, 3N degrees of freedom: :mod:`plugin.thermo`);
  ``conserved`` (eV): what the integrator conserves (NVE: ``etot``; Nose-Hoover NVT / NPT: the
  extended Hamiltonian; None for Langevin), the number to watch for integration errors; for
  periodic systems ``pressure`` (bar) and ``volume`` (Å^3), else None.
  """
  step: np.ndarray
  time_ps: np.ndarray
  epot: np.ndarray
  ekin: np.ndarray
  etot: np.ndarray
  temperature: np.ndarray
  conserved: Optional[np.ndarray] = None
  pressure: Optional[np.ndarray] = None
  volume: Optional[np.ndarray] = None

  @classmethod
  def from_rows(cls, columns: Sequence[Column], rows: Sequence[Mapping[str, float]]) -> "MDLog":
    return cls(**{c.attr: np.asarray([r[c.csv] for r in rows],
                                     np.int64 if c.attr == "step" else np.float64)
                  for c in columns})

  def __len__(self) -> int:
    return len(self.step)

  def as_dict(self) -> Dict[str, np.ndarray]:
    """Columns by CSV name (units in the names); the optional ones only where they exist."""
    return {c.csv: getattr(self, c.attr) for c in COLUMNS if getattr(self, c.attr) is not None}

  def to_csv(self, path: PathLike) -> None:
    """Write the log as CSV (overwrites ``path``)."""
    d = self.as_dict()
    Path(path).unlink(missing_ok=True)
    CsvLog(path, list(d)).write([dict(zip(d, r)) for r in zip(*[c.tolist() for c in d.values()])])


class CsvLog:
  """Appends log rows to a CSV file, header first (new or empty file), flushed at every write."""

  def __init__(self, path: Optional[PathLike], columns: Sequence[str]):
    self.path = None if path is None else Path(path)
    self.columns = list(columns)
    if self.path is not None and (not self.path.exists() or self.path.stat().st_size == 0):
      with open(self.path, "w", newline="") as f:
        csv.writer(f).writerow(self.columns)

  def write(self, rows: Sequence[Mapping[str, float]]) -> None:
    if self.path is None or not rows:
      return
    with open(self.path, "a", newline="") as f:
      w = csv.writer(f)
      for r in rows:
        w.writerow([r[c] for c in self.columns])


# ------------------------------------------------------------------------------------------
# trajectories


def traj_format(path: Path) -> str:
  """``"traj"`` or ``"extxyz"`` from the file name, or a clear error."""
  suffix = Path(path).suffix.lower()
  if suffix == ".traj":
    return "traj"
  if suffix in (".xyz", ".extxyz"):
    return "extxyz"
  raise ValueError(f"trajectory file {str(path)!r}: use a .traj (ASE binary, exact resume) "
                   f"or .xyz/.extxyz file name")


def append_frames(path: Path, frames: List[ase.Atoms]) -> None:
  """Append frames and close the file again, so it is complete after every chunk."""
  if not frames:
    return
  if traj_format(path) == "traj":
    from ase.io.trajectory import Trajectory
    with Trajectory(str(path), "a") as t:
      for f in frames:
        t.write(f)
  else:
    for f in frames:
      f.info.pop("md_state", None)  # nested dicts do not fit an extxyz comment line
    ase.io.write(str(path), frames, format="extxyz", append=True)


def read_last_frame(path: Path) -> Optional[ase.Atoms]:
  """The last frame of ``path`` (None: no file or no frame), or a clear error if damaged."""
  path = Path(path)
  if not path.exists() or path.stat().st_size == 0:
    return None
  fmt = traj_format(path)
  try:
    if fmt == "traj":
      from ase.io.trajectory import Trajectory
      with Trajectory(str(path)) as t:
        return t[-1] if len(t) else None
    return ase.io.read(str(path), index=-1, format="extxyz")
  except Exception as e:  # noqa: BLE001 - any parse error: say which file and what to do
    raise ValueError(f"cannot read the last frame of {str(path)!r} to resume from ({e}); "
                     f"the file may be damaged: copy the good frames to a new file "
                     f"(ase.io.read(path, ':N')) and resume from that") from e


# ------------------------------------------------------------------------------------------
# progress


@dataclasses.dataclass(frozen=True)
class Progress:
  """What a ``progress`` callback gets after each chunk (latest logged values)."""
  step: int
  total_steps: int
  time_ps: float
  temperature: float  # K, of the state at ``step``
  epot: float  # eV, of the latest log row
  ekin: float
  etot: float
  steps_per_s: float  # of this chunk (includes compilation on the first chunk)


class ProgressBar:
  """A tqdm bar showing ns/day, temperature and total energy; a ``progress`` callback of
  :func:`plugin.md.run` (``bar(progress)``) and of the ASE engine (``bar.update(...)``)."""

  def __init__(self, steps: int, dt_fs: float, desc: Optional[str] = None):
    from tqdm.auto import tqdm
    self.dt = dt_fs
    self.bar = tqdm(total=steps, unit="step", dynamic_ncols=True, mininterval=0.5, desc=desc)
    self.t0 = time.perf_counter()

  def update(self, step: int, temperature: float, energy: float) -> None:
    """``step`` steps done (counted from this bar's start)."""
    self.bar.update(step - self.bar.n)
    rate = self.bar.n / max(time.perf_counter() - self.t0, 1e-9)
    ns_day = rate * self.dt * 1e-6 * 86400
    self.bar.set_postfix_str(f"{ns_day:.3g} ns/day, T={temperature:.0f} K, E={energy:.4f} eV")

  def __call__(self, p: Progress) -> None:
    self.update(int(p.step), float(p.temperature), float(p.etot))

  def close(self) -> None:
    self.bar.close()
