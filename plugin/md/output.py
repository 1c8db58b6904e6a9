"""What the MD engines write: the log schema (one column list), one CSV writer, trajectory files,
progress reports.

Trajectories (:data:`FORMATS`, chosen by the file's extension; adding a format is one entry):
``.traj`` (ASE's binary format, float64), ``.xyz`` / ``.extxyz`` (extended XYZ text) and
``.h5`` / ``.h5md`` (H5MD 1.1 through the optional h5py). Frames are appended one at a time, each
complete and flushed before the next (SIGINT/SIGTERM are held while one is written), and the
file is closed between chunks; a frame cut short by ``kill -9`` is never read back
(:func:`read_trajectory`) and is cut off before a resume appends (:func:`prepare_resume`). Every
format keeps ``md_step``, ``md_time_fs``, ``md_ensemble`` and the integrator's variables
(``md_state``), so ``resume=True`` continues any of them.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import io
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import ase
import ase.io
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

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
  Column(
    "temperature_K",
    "temperature",
    None,
    lambda o, c: thermo.temperature_from_kinetic(float(o["ekin"]), c.num_atoms),
  ),
  Column("conserved_eV", "conserved", "conserved", lambda o, c: float(o["conserved"])),
  Column("pressure_bar", "pressure", "pressure", lambda o, c: float(o["pressure"]) / thermo.BAR),
  Column("volume_A3", "volume", "volume", lambda o, c: float(o["volume"])),
)


def columns_for(observables: Iterable[str]) -> List[Column]:
  """The columns a run logs, given the names its observe function returns."""
  have = set(observables)
  return [c for c in COLUMNS if c.needs is None or c.needs in have]


def make_rows(
  columns: Sequence[Column], logs: Mapping[str, np.ndarray], count: int, ctx: RowContext
) -> List[Dict[str, float]]:
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
    return cls(
      **{
        c.attr: np.asarray([r[c.csv] for r in rows], np.int64 if c.attr == "step" else np.float64)
        for c in columns
      }
    )

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

  def drop_after(self, step: int) -> None:
    """Keeps the rows up to ``step`` (a resume continues from that frame: rows logged after
    it, and a row cut mid-write, would be written twice or be garbage), atomically."""
    if self.path is None or not self.path.exists():
      return
    with open(self.path, newline="") as f:
      rows = list(csv.reader(f))
    keep = [r for r in rows[1:] if _row_step(r, len(self.columns)) <= step]
    if len(keep) == len(rows) - 1:
      return
    tmp = self.path.with_name(self.path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
      csv.writer(f).writerows(rows[:1] + keep)
    os.replace(tmp, self.path)

  def write(self, rows: Sequence[Mapping[str, float]]) -> None:
    if self.path is None or not rows:
      return
    with open(self.path, "a", newline="") as f:
      w = csv.writer(f)
      for r in rows:
        w.writerow([r[c] for c in self.columns])


def _row_step(row: Sequence[str], width: int) -> float:
  """A CSV row's step (its first column); ``inf`` for a row cut short or unreadable."""
  try:
    return float(row[0]) if len(row) == width else np.inf
  except (ValueError, IndexError):
    return np.inf


# ------------------------------------------------------------------------------------------
# trajectories: one entry per format in FORMATS (a writer, a reader, a repair for resume)


@contextlib.contextmanager
def _signals_held():
  """Holds SIGINT/SIGTERM while one frame is written: Ctrl-C or a ``kill`` lands between frames
  (delivered when the frame is complete), never inside one.

  Python runs signal handlers in the main thread whichever OS thread the kernel picked (JAX and
  test runners start threads), so the main thread swaps in a handler that only records the signal
  and re-raises it afterwards; a thread mask alone would not hold it. Other threads, which cannot
  set handlers, block the signals in their own mask.
  """
  if threading.current_thread() is not threading.main_thread():
    with _signals_masked():
      yield
    return
  pending: List[int] = []
  previous = {}
  for s in (signal.SIGINT, signal.SIGTERM):
    handler = signal.getsignal(s)
    if handler is None or handler == signal.SIG_IGN:  # set outside Python, or ignored: leave it
      continue
    previous[s] = signal.signal(s, lambda signum, frame: pending.append(signum))
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for s in dict.fromkeys(pending):
      signal.raise_signal(s)  # now that the frame is complete


@contextlib.contextmanager
def _signals_masked():
  held = {signal.SIGINT, signal.SIGTERM}
  try:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
  except (AttributeError, OSError, ValueError):  # no pthread_sigmask on this platform
    yield
    return
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, old)


def encode_state(state: Optional[Mapping[str, np.ndarray]]) -> str:
  """``atoms.info["md_state"]`` (integrator variables by key path) as one token (npz, base64
  without padding), for formats that hold only strings; '' for None."""
  if not state:
    return ""
  buf = io.BytesIO()
  np.savez(
    buf,
    **{f"a{i}": np.asarray(v) for i, v in enumerate(state.values())},
    keys=np.array(list(state), dtype=str),
  )
  return base64.urlsafe_b64encode(buf.getvalue()).decode().rstrip("=")


def decode_state(token: str) -> Optional[Dict[str, np.ndarray]]:
  """The inverse of :func:`encode_state` (None for '')."""
  if not token:
    return None
  data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
  with np.load(io.BytesIO(data), allow_pickle=False) as z:
    return {str(k): z[f"a{i}"] for i, k in enumerate(z["keys"])}


# .traj: ASE's binary format. ASE's writer records a frame's offset in the header only after the
# frame's data, so a frame cut short by a kill is not counted and appending continues cleanly.
# A file cut at its end (disk full, a copy cut short) loses the tail of its counted last frame:
# reading stops at the first frame that cannot be read, and a resume rewrites the good ones.


def _traj_append(path: Path, frames: List[ase.Atoms]) -> None:
  from ase.io.trajectory import Trajectory

  with Trajectory(str(path), "a") as t:
    for f in frames:
      with _signals_held():
        t.write(f)


def _traj_read(path: Path, last_only: bool) -> List[ase.Atoms]:
  from ase.io.trajectory import Trajectory

  with Trajectory(str(path)) as t:
    if last_only:  # the last frame that reads, from the end
      for i in range(len(t) - 1, -1, -1):
        frame = _traj_frame(t, i)
        if frame is not None:
          return [frame]
      return []
    frames = []
    for i in range(len(t)):
      frame = _traj_frame(t, i)
      if frame is None:
        break
      frames.append(frame)
    return frames


def _traj_frame(t, i: int) -> Optional[ase.Atoms]:
  """Frame ``i`` of an open ``Trajectory``, or None where it is cut short."""
  try:
    return t[i]
  except Exception:  # noqa: BLE001 - a torn frame fails in ASE's JSON or array reader
    return None


def _traj_repair(path: Path) -> None:
  """Rewrites the file with its good frames when some counted frame cannot be read."""
  from ase.io.trajectory import Trajectory

  with Trajectory(str(path)) as t:
    counted = len(t)
  good = _traj_read(path, False)
  if len(good) == counted:
    return
  tmp = path.with_name(path.name + ".tmp")
  tmp.unlink(missing_ok=True)
  _traj_append(tmp, good)
  os.replace(tmp, path)


# .extxyz / .xyz: text, one frame written and flushed at a time; a frame cut short (kill -9
# inside a write) is found by counting lines, ignored when reading and cut off before a resume.


def _xyz_frames(path: Path) -> List[Tuple[int, int]]:
  """Byte ranges ``(start, end)`` of the complete frames of an extended XYZ file."""
  spans, pos = [], 0
  with open(path, "rb") as f:
    while True:
      head = f.readline()
      if not head.endswith(b"\n"):
        break
      try:
        n = int(head)
      except ValueError:
        break
      lines = [f.readline() for _ in range(n + 1)]
      if not all(line.endswith(b"\n") for line in lines):
        break
      spans.append((pos, f.tell()))
      pos = f.tell()
  return spans


def _xyz_append(path: Path, frames: List[ase.Atoms]) -> None:
  with open(path, "a") as f:
    for given in frames:
      frame = given.copy()  # with its own info: the caller's frame keeps its md_state dict
      if given.calc is not None:
        frame.calc = SinglePointCalculator(frame, **given.calc.results)
      token = encode_state(frame.info.pop("md_state", None))
      if token:  # an empty value would swallow the next key of the comment line
        frame.info["md_state"] = token
      text = io.StringIO()
      ase.io.write(text, frame, format="extxyz")
      with _signals_held():
        f.write(text.getvalue())
        f.flush()


def _xyz_read(path: Path, last_only: bool) -> List[ase.Atoms]:
  spans = _xyz_frames(path)
  if not spans:
    return []
  first = spans[-1][0] if last_only else 0
  with open(path, "rb") as f:
    f.seek(first)
    text = f.read(spans[-1][1] - first).decode()
  frames = ase.io.read(io.StringIO(text), index=":", format="extxyz")
  for frame in frames:
    if "md_state" in frame.info:
      frame.info["md_state"] = decode_state(str(frame.info["md_state"]))
  return frames


def _xyz_repair(path: Path) -> None:
  spans = _xyz_frames(path)
  end = spans[-1][1] if spans else 0
  if path.stat().st_size != end:
    with open(path, "r+b") as f:
      f.truncate(end)


# .h5 / .h5md: H5MD 1.1 (particles/all: position, velocity, force, box/edges, species, mass;
# observables), chunked, compressed, resizable, flushed per frame. The frame count is the
# length of the shared `step` dataset, grown last, so a frame cut short is not counted.

H5_UNITS = {
  "position": "angstrom",
  "velocity": "angstrom fs-1",
  "force": "eV angstrom-1",
  "edges": "angstrom",
  "potential_energy": "eV",
  "kinetic_energy": "eV",
  "total_energy": "eV",
  "temperature": "K",
  "stress": "eV angstrom-3",
}


def _h5py():
  try:
    import h5py
  except ImportError:
    raise ImportError(
      "H5MD trajectories (.h5, .h5md) need h5py: pip install h5py (or "
      "pip install 'eqattn[h5]'), or write .traj / .extxyz"
    ) from None
  return h5py


def _h5_values(frame: ase.Atoms) -> Dict[str, np.ndarray]:
  """The time-dependent H5MD elements of one frame, by path (user units: Å, fs, eV, K)."""
  calc = frame.calc.results if frame.calc is not None else {}
  epot, ekin = float(calc.get("energy", np.nan)), float(frame.get_kinetic_energy())
  values = {
    "particles/all/position": frame.positions,
    "particles/all/velocity": frame.get_velocities() * thermo.FS,
    "particles/all/force": calc.get("forces", np.full((len(frame), 3), np.nan)),
    "particles/all/box/edges": frame.cell.array,
    "observables/potential_energy": epot,
    "observables/kinetic_energy": ekin,
    "observables/total_energy": epot + ekin,
    "observables/temperature": thermo.temperature(frame.get_momenta(), frame.get_masses()),
  }
  if "stress" in calc:
    values["observables/stress"] = calc["stress"]
  return {k: np.asarray(v, np.float64) for k, v in values.items()}


def _h5_create(f, frame: ase.Atoms) -> None:
  from importlib import metadata

  try:
    version = metadata.version("eqattn")
  except metadata.PackageNotFoundError:  # run from a source tree
    version = "unknown"
  f.require_group("h5md").attrs["version"] = np.array([1, 1], np.int32)
  f["h5md"].require_group("author").attrs["name"] = "eqattn user"
  creator = f["h5md"].require_group("creator")
  creator.attrs.update(name="eqattn plugin.md", version=version)
  particles = f.require_group("particles/all")
  particles["species"] = frame.numbers.astype(np.int32)  # atomic numbers
  particles["mass"] = frame.get_masses()
  particles["mass"].attrs["unit"] = "amu"
  box = particles.require_group("box")
  box.attrs["dimension"] = np.int32(3)
  box.attrs["boundary"] = np.array([b"periodic" if p else b"none" for p in frame.pbc], "S8")
  step = time = None
  for path, value in _h5_values(frame).items():
    group = f.require_group(path)
    row = max(value.nbytes, 1)
    rows = int(max(1, min(256, 2**20 // row)))  # ~1 MiB chunks
    group.create_dataset(
      "value",
      shape=(0,) + value.shape,
      maxshape=(None,) + value.shape,
      dtype=np.float64,
      chunks=(rows,) + value.shape,
      compression="gzip",
      compression_opts=4,
      shuffle=True,
    )
    group["value"].attrs["unit"] = H5_UNITS[path.rsplit("/", 1)[-1]]
    if step is None:  # one step and one time dataset, hard-linked into every element
      step = group.create_dataset(
        "step", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,)
      )
      time = group.create_dataset(
        "time", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(1024,)
      )
      time.attrs["unit"] = "fs"
    else:
      group["step"], group["time"] = step, time
  f.require_group("parameters/eqattn")


def _h5_append(path: Path, frames: List[ase.Atoms]) -> None:
  h5py = _h5py()
  with h5py.File(path, "a") as f:
    if "h5md" not in f:
      _h5_create(f, frames[0])
    step = f["particles/all/position/step"]
    for frame in frames:
      k = step.shape[0]
      with _signals_held():
        for p, value in _h5_values(frame).items():
          ds = f[p]["value"]
          ds.resize(k + 1, axis=0)
          ds[k] = value
        f["particles/all/position/time"].resize(k + 1, axis=0)
        f["particles/all/position/time"][k] = float(frame.info.get("md_time_fs", np.nan))
        eq = f["parameters/eqattn"]
        eq.attrs.update(
          md_state=encode_state(frame.info.get("md_state")),
          md_state_step=int(frame.info.get("md_step", -1)),
          md_ensemble=str(frame.info.get("md_ensemble", "")),
        )
        step.resize(k + 1, axis=0)
        step[k] = int(frame.info.get("md_step", k))
        f.flush()


def _h5_count(f) -> int:
  """Complete frames: those whose step and every element's value were written."""
  n = f["particles/all/position/step"].shape[0]
  values = []
  f.visititems(
    lambda name, o: (
      values.append(o.shape[0]) if name.endswith("/value") and hasattr(o, "shape") else None
    )
  )
  return min([n, f["particles/all/position/time"].shape[0]] + values)


def _h5_read(path: Path, last_only: bool) -> List[ase.Atoms]:
  h5py = _h5py()
  with h5py.File(path, "r") as f:
    if "particles/all/position/step" not in f:
      return []
    n = _h5_count(f)
    part, obs, eq = f["particles/all"], f["observables"], f["parameters/eqattn"].attrs
    numbers, masses = part["species"][()], part["mass"][()]
    pbc = [b == b"periodic" for b in part["box"].attrs["boundary"]]
    frames = []
    for i in range(n - 1 if last_only else 0, n):
      step = int(part["position/step"][i])
      atoms = ase.Atoms(
        numbers=numbers,
        positions=part["position/value"][i],
        cell=part["box/edges/value"][i],
        pbc=pbc,
        masses=masses,
      )
      atoms.set_velocities(part["velocity/value"][i] / thermo.FS)
      atoms.info.update(
        md_step=step,
        md_time_fs=float(part["position/time"][i]),
        md_ensemble=str(eq.get("md_ensemble", "")),
      )
      if i == n - 1 and int(eq.get("md_state_step", -1)) == step:
        atoms.info["md_state"] = decode_state(str(eq.get("md_state", "")))
      results = dict(energy=float(obs["potential_energy/value"][i]), forces=part["force/value"][i])
      if "stress" in obs:
        results["stress"] = obs["stress/value"][i]
      atoms.calc = SinglePointCalculator(atoms, **results)
      frames.append(atoms)
  return frames


def _h5_repair(path: Path) -> None:
  h5py = _h5py()
  with h5py.File(path, "a") as f:
    if "particles/all/position/step" not in f:
      return
    n = _h5_count(f)
    f.visititems(
      lambda name, o: (
        o.resize(n, axis=0)
        if isinstance(o, h5py.Dataset) and o.maxshape and o.maxshape[0] is None and o.shape[0] > n
        else None
      )
    )


@dataclasses.dataclass(frozen=True)
class TrajFormat:
  """One trajectory format: ``append(path, frames)`` (frame by frame, each complete before the
  next), ``read(path, last_only)`` (the complete frames), ``repair(path)`` (before a resume
  appends: drop an incomplete last frame); ``needs``: an optional package, named in errors."""

  name: str
  suffixes: Tuple[str, ...]
  append: Callable[[Path, List[ase.Atoms]], None]
  read: Callable[[Path, bool], List[ase.Atoms]]
  repair: Callable[[Path], None] = lambda path: None
  needs: Optional[Callable[[], Any]] = None


FORMATS = {
  f.name: f
  for f in (
    TrajFormat("traj", (".traj",), _traj_append, _traj_read, _traj_repair),
    TrajFormat("extxyz", (".extxyz", ".xyz"), _xyz_append, _xyz_read, _xyz_repair),
    TrajFormat("h5md", (".h5", ".h5md"), _h5_append, _h5_read, _h5_repair, _h5py),
  )
}


def traj_format(path: PathLike) -> TrajFormat:
  """The format of ``path`` by its extension (its optional package checked), or a clear error."""
  suffix = Path(path).suffix.lower()
  for f in FORMATS.values():
    if suffix in f.suffixes:
      if f.needs is not None:
        f.needs()
      return f
  names = ", ".join(s for f in FORMATS.values() for s in f.suffixes)
  raise ValueError(f"trajectory file {str(path)!r}: use a file name ending in one of {names}")


def append_frames(path: PathLike, frames: List[ase.Atoms]) -> None:
  """Append frames, each complete (flushed) before the next; the file is closed afterwards."""
  if frames:
    traj_format(path).append(Path(path), frames)


def read_trajectory(
  path: PathLike, index: Union[int, slice, str] = ":"
) -> Union[ase.Atoms, List[ase.Atoms]]:
  """The complete frames of a trajectory written by :mod:`plugin.md` (any format in
  :data:`FORMATS`), as ``Atoms`` with energy, forces (stress where periodic) and momenta;
  ``index`` as ASE's (an int gives one frame). An incomplete last frame is left out."""
  fmt, path = traj_format(path), Path(path)
  if isinstance(index, int) and index == -1:
    frames = _read(fmt, path, True)
    if not frames:
      raise IndexError(f"{str(path)!r} holds no complete frame")
    return frames[0]
  frames = _read(fmt, path, False)
  if isinstance(index, str):
    index = (
      slice(None) if index == ":" else slice(*[int(x) if x else None for x in index.split(":")])
    )
  return frames[index]


def _read(fmt, path: Path, last_only: bool) -> List[ase.Atoms]:
  """``fmt.read``, a damaged file reported as one ``ValueError`` naming it."""
  if not path.exists():
    raise FileNotFoundError(f"{str(path)!r} does not exist")
  try:
    return fmt.read(path, last_only)
  except Exception as e:  # noqa: BLE001 - any parse error: say which file and what happened
    raise ValueError(
      f"cannot read {str(path)!r} as {fmt.name} ({type(e).__name__}: {e}); the file is damaged "
      "beyond the torn last frame eqattn repairs"
    ) from e


def read_last_frame(path: PathLike) -> Optional[ase.Atoms]:
  """The last complete frame of ``path`` (None: no file or no frame), or a clear error."""
  path = Path(path)
  if not path.exists() or path.stat().st_size == 0:
    return None
  fmt = traj_format(path)
  try:
    frames = fmt.read(path, True)
  except Exception as e:  # noqa: BLE001 - any parse error: say which file and what to do
    raise ValueError(
      f"cannot read the last frame of {str(path)!r} to resume from ({e}); "
      f"the file may be damaged: copy the good frames to a new file "
      f"(plugin.md.read_trajectory(path)) and resume from that"
    ) from e
  return frames[-1] if frames else None


def prepare_resume(path: PathLike) -> None:
  """Before a resumed run appends to ``path``: drop an incomplete last frame."""
  path = Path(path)
  if path.exists() and path.stat().st_size:
    traj_format(path).repair(path)


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
  systems: int = 1  # systems run together (plugin.md.run on a list: temperatures and energies
  # are then means over them)
  atom_steps_per_s: float = 0.0  # all systems' atoms times steps per second (0: not given)


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
  """A tqdm bar showing ns/day, temperature and total energy; a ``progress`` callback of
  :func:`plugin.md.run` (``bar(progress)``) and of the ASE engine (``bar.update(...)``)."""

  def __init__(
    self,
    steps: int,
    dt_fs: float,
    desc: Optional[str] = None,
    atoms: int = 0,
    clock: Callable[[], float] = time.perf_counter,
  ):
    from tqdm.auto import tqdm

    self.dt, self.atoms = dt_fs, atoms  # atoms: of all systems together (atom-steps/s shown)
    # tqdm's own rate and ETA would count the compilation of the first chunk: both are ours,
    # from the steady rate after it, shown once a second chunk has run
    fmt = "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
    self.bar = tqdm(
      total=steps, unit="step", dynamic_ncols=True, mininterval=0.5, desc=desc, bar_format=fmt
    )
    self.first: Optional[Tuple[int, float]] = None  # (steps, time) after the first chunk
    self.clock = clock

  def update(self, step: int, temperature: float, energy: float) -> None:
    """``step`` steps done (counted from this bar's start)."""
    self.bar.update(step - self.bar.n)
    now = self.clock()
    if self.first is None:
      self.first = (self.bar.n, now)
    done, t = self.bar.n - self.first[0], now - self.first[1]
    speed = ""
    if done > 0 and t > 0:
      rate = done / t
      eta = (self.bar.total - self.bar.n) / rate
      atoms = f", {rate * self.atoms:.3g} atom-steps/s" if self.atoms else ""
      speed = f", {rate * self.dt * 1e-6 * 86400:.3g} ns/day{atoms}, ETA {_clock(eta)}"
    self.bar.set_postfix_str(f"T={temperature:.0f} K, E={energy:.4f} eV{speed}")

  def __call__(self, p: Progress) -> None:
    self.update(int(p.step), float(p.temperature), float(p.etot))

  def close(self) -> None:
    self.bar.close()
