"""``MDOptions``: every option of :func:`plugin.md.run` in one frozen, checked object.

Made once (by ``run`` from its keywords, or by the caller: the ``eqattn`` command builds one
from its arguments) and passed whole; each system's completed options
(:class:`plugin.md.settings.RunOptions`, from which the engine keys are derived) come from
:meth:`MDOptions.for_system`. Cheap to import (no JAX): the CLI's parser reads the defaults.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Optional, Tuple, Union

import numpy as np

from plugin.md.ensembles import TABLE
from plugin.paths import check_writable_folder
from plugin.md.settings import DEFAULTS, RunOptions, guard_limits, resolve_dtype

PathLike = Union[str, os.PathLike]
UNCERTAINTY_ACTIONS = ("stop", "flag")
RENAMED = {"steps": "total_steps"}  # run()'s old keywords (a count it was not, after a resume)


@dataclasses.dataclass(frozen=True)
class MDOptions:
  """The options of :func:`plugin.md.run` (user units: Å, eV, amu, fs, K, bar), checked when
  made: a bad value raises one ``ValueError`` naming it. Defaults: :data:`plugin.md.DEFAULTS`.

  Attributes:
    ensemble: a name in :data:`plugin.md.ENSEMBLES` (``"nve"``, ``"nvt_langevin"``,
      ``"nvt_nose_hoover"``, ``"npt"``).
    temperature: thermostat target (K); also the initial temperature unless
      ``init_temperature`` is given or the atoms have momenta. With a list of systems, one
      per system (a tuple) or one for all.
    timestep: fs.
    total_steps: the run's length in steps, counting those done before a resume: a fresh run
      runs ``total_steps`` steps, a resumed one continues from its last frame's ``md_step`` up
      to it. Its old keyword ``steps=`` (in :func:`plugin.md.run` and :meth:`make`) still
      works, deprecated.
    pressure: NPT target (bar).
    friction: Langevin friction (1/fs).
    tau_t, tau_p: Nose-Hoover thermostat / barostat times (fs); defaults ``100 * timestep`` and
      ``1000 * timestep`` (JAX-MD's).
    init_temperature: temperature (K) of the Maxwell-Boltzmann start velocities.
    chunk: steps per compiled call; between chunks the host checks the neighbour list, writes
      the log and frames, and calls ``progress``.
    log_interval: steps between log rows (default ``chunk``); the first and last steps are
      always logged.
    traj: trajectory file, its format by extension (:data:`plugin.md.output.FORMATS`):
      ``.traj`` (ASE), ``.xyz``/``.extxyz``, ``.h5``/``.h5md`` (H5MD, needs h5py); None: no
      frames. With a list of systems, one path per system or one path from which they are
      named (``md.traj`` -> ``md.0.traj``, ``md.1.traj``, ...).
    traj_interval: steps between frames (default ``log_interval``); the first (fresh runs) and
      the last step are always written.
    resume: continue from the last complete frame of ``traj`` if it exists (else start from
      the atoms); any format. Without it an existing non-empty ``traj`` is an error, never
      overwritten.
    log_file: CSV file for the log rows (appended to; a header is written to a new file);
      named per system like ``traj``.
    seed: seeds the Maxwell-Boltzmann velocities and the Langevin noise; with a list of
      systems one per system, or one that gives system ``i`` the seed ``seed + i``.
    dr_threshold: neighbour-list skin (Å).
    capacity_multiplier: initial neighbour-list headroom (JAX-MD's); it grows on overflow.
    dtype: float32 (default) or float64 (needs ``jax_enable_x64``).
    progress: True for a tqdm bar, or a callable taking a :class:`plugin.md.Progress` after
      each chunk.
    max_temperature: K; a run stops (``MDResult.stopped``, last good frame written) when the
      temperature exceeds it; None: ``max(10 x reference, 5000 K)`` (reference: the
      thermostat target, or in NVE the start temperature); ``inf``: off.
    max_force: eV/Å; a run stops when a force exceeds it; None (default): off. Non-finite
      positions, momenta, forces or energies always stop a run. Checked at every step.
    max_uncertainty: eV/Å; for an ensemble potential, the largest calibrated per-atom force
      uncertainty (:mod:`potentials.ensemble`) allowed, checked at the end of every chunk
      (every replica of a batch). None (default): off.
    uncertainty_action: ``"stop"`` (default): a run ends there (``stopped =
      "max_uncertainty"``, that frame written, the atoms named in ``reason``; in a batch that
      system leaves and the others go on); ``"flag"``: it warns, records the step and atoms
      in ``MDResult.uncertain`` and goes on.
    max_wall_time: seconds from the call (compilation included); a run (every system of a
      batch) stops at the end of the first chunk past it (``stopped = "max_wall_time"``, that
      step's frame written, so ``resume=True`` continues there). None (default): off.
  """

  ensemble: str = DEFAULTS.ensemble
  temperature: Union[float, Tuple[float, ...]] = DEFAULTS.temperature
  timestep: float = DEFAULTS.timestep
  total_steps: int = DEFAULTS.steps
  pressure: float = DEFAULTS.pressure
  friction: float = DEFAULTS.friction
  tau_t: Optional[float] = None
  tau_p: Optional[float] = None
  init_temperature: Optional[float] = None
  chunk: int = DEFAULTS.chunk
  log_interval: Optional[int] = None
  traj: Union[None, PathLike, Tuple[PathLike, ...]] = None
  traj_interval: Optional[int] = None
  resume: bool = False
  log_file: Union[None, PathLike, Tuple[PathLike, ...]] = None
  seed: Union[int, Tuple[int, ...]] = DEFAULTS.seed
  dr_threshold: float = DEFAULTS.dr_threshold
  capacity_multiplier: float = DEFAULTS.capacity_multiplier
  dtype: Any = DEFAULTS.dtype
  progress: Union[bool, Callable[..., None]] = False
  max_temperature: Optional[float] = None
  max_force: Optional[float] = DEFAULTS.max_force
  max_uncertainty: Optional[float] = None
  uncertainty_action: str = "stop"
  max_wall_time: Optional[float] = None

  def __post_init__(self):
    for name in ("temperature", "seed", "traj", "log_file"):  # lists become tuples
      value = getattr(self, name)
      if isinstance(value, (list, np.ndarray)):
        object.__setattr__(self, name, tuple(np.asarray(value).tolist()))
    for t in _values(self.temperature):  # each system's own checks run in for_system
      _finite("temperature", t, strict=False)
    _check_uncertainty(self.max_uncertainty, self.uncertainty_action)
    if self.max_wall_time is not None:
      _finite("max_wall_time", self.max_wall_time, strict=True)
    _check_folders(self)
    _run_options(self, temperature=_values(self.temperature)[0], seed=0)  # the shared checks

  @classmethod
  def make(cls, options: Optional["MDOptions"] = None, **overrides) -> "MDOptions":
    """``options`` (default ``MDOptions()``) with ``overrides`` (any of its fields, or a
    deprecated name in :data:`RENAMED`)."""
    from potentials import deprecation  # JAX: only here, where a run is being made

    overrides = deprecation.rename_keys(overrides, RENAMED)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise TypeError(
        f"unknown MD option(s) {', '.join(unknown)}; the options are plugin.md.MDOptions' "
        f"fields: {', '.join(f.name for f in dataclasses.fields(cls))}"
      )
    return dataclasses.replace(options or cls(), **overrides)

  def for_system(self, i: int, count: int) -> RunOptions:
    """System ``i``'s (of ``count``) checked, completed options."""
    temperature = _per_system("temperature", self.temperature, i, count, lambda t: t)
    seed = _per_system("seed", self.seed, i, count, lambda s: int(s) + i)
    return _run_options(self, temperature=temperature, seed=seed)


def _values(value) -> tuple:
  return value if isinstance(value, tuple) else (value,)


def _per_system(name: str, value, i: int, count: int, spread: Callable):
  """System ``i``'s entry of a per-system tuple, or ``spread(value)`` of one value."""
  if not isinstance(value, tuple):
    return spread(value)
  if len(value) != count:
    raise ValueError(
      f"{name} has {len(value)} entries for {count} systems; give one per system or a single value"
    )
  return value[i]


def _check_folders(o: MDOptions) -> None:
  """Before any work: the folders of ``traj`` and ``log_file`` exist and are writable (a run
  found out only when its first frames were due, after compiling and running a chunk)."""
  for name in ("traj", "log_file"):
    for path in _values(getattr(o, name)):
      if path is not None:
        check_writable_folder(path, name)


def _positive_int(name: str, value: Any) -> None:
  if value is not None and (
    isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
  ):
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _finite(name: str, value: Any, strict: bool) -> None:
  try:
    ok = bool(np.isfinite(value) and (value > 0 if strict else value >= 0))
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"{name} must be a finite number {'> 0' if strict else '>= 0'}, got {value!r}")


def _check_uncertainty(limit: Optional[float], action: str) -> None:
  if limit is not None and not (
    isinstance(limit, (int, float)) and math.isfinite(limit) and limit > 0
  ):
    raise ValueError(f"max_uncertainty must be a number > 0 (eV/Å), got {limit!r}")
  if action not in UNCERTAINTY_ACTIONS:
    raise ValueError(f"uncertainty_action must be 'stop' or 'flag', got {action!r}")


def _check(o: MDOptions, temperature: float) -> None:
  """The checks of one system's options (clear errors)."""
  if o.ensemble not in TABLE:
    raise ValueError(f"unknown ensemble {o.ensemble!r}; choose one of {', '.join(TABLE)}")
  n = o.total_steps
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"total_steps must be an integer >= 0, got {n!r}")
  for name in ("chunk", "log_interval", "traj_interval"):
    _positive_int(name, getattr(o, name))
  _finite("timestep", o.timestep, strict=True)
  for name, value in (("friction", o.friction), ("dr_threshold", o.dr_threshold)):
    _finite(name, value, strict=False)
  if TABLE[o.ensemble].thermostat and temperature <= 0:
    raise ValueError(f"{o.ensemble} needs a temperature > 0 K, got {temperature}")
  if not np.isfinite(o.pressure):
    raise ValueError(f"pressure must be finite (bar), got {o.pressure}")
  if not (np.isfinite(o.capacity_multiplier) and o.capacity_multiplier > 0):
    raise ValueError(f"capacity_multiplier must be > 0, got {o.capacity_multiplier}")
  t0 = o.init_temperature
  if t0 is not None and not (np.isfinite(t0) and t0 >= 0):
    raise ValueError(f"init_temperature must be >= 0 K, got {t0}")


def _run_options(o: MDOptions, *, temperature: float, seed: int) -> RunOptions:
  """One system's options, checked and completed (the derived defaults filled in)."""
  _finite("temperature", temperature, strict=False)
  _check(o, temperature)
  dtype = resolve_dtype(o.dtype)
  init_t = float(temperature if o.init_temperature is None else o.init_temperature)
  guard_limits(max_temperature=o.max_temperature, max_force=o.max_force, temperature=init_t)
  log_interval = int(o.log_interval or o.chunk)
  tau_t = DEFAULTS.tau_t_per_timestep * o.timestep if o.tau_t is None else float(o.tau_t)
  tau_p = DEFAULTS.tau_p_per_timestep * o.timestep if o.tau_p is None else float(o.tau_p)
  if tau_t <= 0 or tau_p <= 0:
    raise ValueError(f"tau_t and tau_p must be > 0 fs, got {tau_t}, {tau_p}")
  return RunOptions(
    ensemble=o.ensemble,
    temperature=float(temperature),
    timestep=float(o.timestep),
    total_steps=int(o.total_steps),
    pressure=float(o.pressure),
    friction=float(o.friction),
    tau_t=tau_t,
    tau_p=tau_p,
    init_temperature=init_t,
    chunk=int(o.chunk),
    log_interval=log_interval,
    traj_interval=int(o.traj_interval or log_interval) if o.traj is not None else 0,
    seed=int(seed),
    dr_threshold=float(o.dr_threshold),
    capacity_multiplier=float(o.capacity_multiplier),
    dtype=dtype,
    max_temperature=o.max_temperature,
    max_force=o.max_force,
  )
