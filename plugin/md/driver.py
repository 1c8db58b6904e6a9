"""``plugin.md.run``: composes settings, the ensembles table, system, engine and output."""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import ase
import jax
import jax.numpy as jnp
import numpy as np
from jax_md import simulate

import potentials
from plugin import thermo
from plugin.quiet import quiet
from plugin.md import engine as eng
from plugin.md import guards, output, system as msys
from plugin.md.ensembles import TABLE, Params
from plugin.md.output import MDLog, Progress
from plugin.md.settings import DEFAULTS, RunOptions, guard_limits, run_options

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass
class MDResult:
  """What :func:`run` returns.

  Attributes:
    atoms: final structure: positions, momenta, cell; a ``SinglePointCalculator`` holds the
      final energy (eV) and forces (eV/Å); ``info`` has ``md_step`` and ``md_time_fs``.
    log: the rows logged by this call (:class:`MDLog`).
    steps: steps run by this call (``total_steps - first_step``).
    first_step, total_steps: step numbers at which this call started and ended.
    num_compilations: traces of the chunk function during this call (one per neighbour-list
      capacity; 0 when an earlier call with the same settings compiled it already).
    num_reallocations: neighbour-list reallocations (each followed by a chunk replay).
    wall_time_s: seconds spent in chunks (including compilation);
    chunk_times_s: seconds per chunk (including replays), for benchmarks.
    stopped: None, or the guard that stopped the run early (``"non_finite"``,
      ``"max_temperature"``, ``"max_force"``; :mod:`plugin.md.guards`); ``atoms`` and the
      trajectory's last frame are then the last good state (step ``total_steps``).
    reason: the guard's one-line reason (None when the run finished).
  """
  atoms: ase.Atoms
  log: MDLog
  steps: int
  first_step: int
  total_steps: int
  num_compilations: int
  num_reallocations: int
  wall_time_s: float
  chunk_times_s: List[float]
  stopped: Optional[str] = None
  reason: Optional[str] = None


@dataclasses.dataclass
class _Start:
  """Where a run starts: the system, its step and time, and (resume) the last frame."""
  system: msys.System
  first_step: int = 0
  time0_fs: float = 0.0
  saved_state: Optional[Dict[str, Any]] = None  # the integrator's variables, from .traj
  last: Optional[ase.Atoms] = None


def _start(atoms: ase.Atoms, traj: Optional[Path], resume: bool, opts: RunOptions,
           cutoff: float) -> _Start:
  """The start of a fresh run, or (``resume``) of the last frame of ``traj``."""
  system = msys.from_atoms(atoms, cutoff, opts.dr_threshold)
  if TABLE[opts.ensemble].variable_box and not system.periodic:
    raise ValueError(f"{opts.ensemble} needs a periodic system (atoms.pbc all True and a cell)")
  last = None if traj is None else output.read_last_frame(traj)
  if last is None:
    if traj is not None:
      output.prepare_resume(traj)  # only an incomplete frame (or nothing): drop it
    return _Start(system)
  if not resume:
    raise FileExistsError(f"{str(traj)!r} already holds frames; pass resume=True to "
                          f"continue that run, or choose another file / delete it")
  output.prepare_resume(traj)  # a frame cut short by a kill is dropped before appending
  if not np.array_equal(last.numbers, system.numbers):
    raise ValueError(f"cannot resume: the atoms in {str(traj)!r} are not the ones given "
                     f"(atomic numbers differ)")
  if "md_step" not in last.info:
    raise ValueError(f"cannot resume: the last frame of {str(traj)!r} has no md_step "
                     f"(not written by plugin.md)")
  first_step = int(last.info["md_step"])
  time0 = float(last.info.get("md_time_fs", first_step * opts.timestep))
  saved = last.info.get("md_state") if last.info.get("md_ensemble") == opts.ensemble else None
  last.set_masses(system.masses)
  resumed = msys.from_atoms(last, cutoff, opts.dr_threshold,
                            reference=None if system.periodic else system)
  if resumed.momenta is None:
    resumed = dataclasses.replace(resumed, momenta=np.zeros_like(resumed.R))
  return _Start(resumed, first_step, time0, saved, last)


def _engine_key(opts: RunOptions, system: msys.System) -> eng.EngineKey:
  params = Params.from_user(timestep=opts.timestep, temperature=opts.temperature,
                            friction=opts.friction, tau_t=opts.tau_t, tau_p=opts.tau_p,
                            pressure=opts.pressure)
  return eng.EngineKey(
      ensemble=opts.ensemble, params=params, numbers=tuple(int(z) for z in system.numbers),
      periodic=system.periodic, box=tuple(float(x) for x in system.box.ravel()),
      dr_threshold=opts.dr_threshold, capacity_multiplier=opts.capacity_multiplier,
      chunk=opts.chunk, log_interval=opts.log_interval, traj_interval=opts.traj_interval)


def _start_carry(engine: eng.Engine, start: _Start, opts: RunOptions):
  """``(carry, extra)``: the integrator state (saved variables restored), list and aux."""
  system = start.system
  R = jnp.asarray(system.R, opts.dtype)
  momenta = msys.start_momenta(system, opts.init_temperature, opts.seed)
  (state, nbrs, _), extra = eng.start(engine, R, system.box, system.masses, momenta, opts.seed)
  if start.saved_state is not None:
    state, ok = msys.restore_extended(state, start.saved_state)
    if not ok:
      warnings.warn("the trajectory's saved integrator state does not match this run's "
                    "settings; thermostat/barostat variables start afresh", stacklevel=3)
    elif engine.ensemble.variable_box:
      # Positions were read back through the frame's cell; use the restored box exactly.
      nbrs, extra = eng.allocate(engine, R, np.asarray(simulate.npt_box(state), np.float64),
                                 extra)
  elif start.last is not None and opts.ensemble != "nve":
    warnings.warn(f"resuming {opts.ensemble} from a frame without its integrator state (other "
                  f"ensemble or extxyz file): thermostat/barostat variables start afresh",
                  stacklevel=3)
  return (state, nbrs, eng.initial_aux(engine, state)), extra


def _limits(opts: RunOptions, start: _Start) -> Dict[str, float]:
  """The guards' limits; the default temperature limit follows the thermostat's target, or in
  NVE the temperature of this call's start state."""
  reference = opts.temperature
  if not TABLE[opts.ensemble].thermostat:
    p = start.system.momenta
    reference = (opts.init_temperature if p is None or not np.any(p)
                 else thermo.temperature(p, start.system.masses))
  t_max, f_max = guard_limits(max_temperature=opts.max_temperature, max_force=opts.max_force,
                              temperature=reference)
  return {"max_temperature": t_max, "max_force": f_max}


class _Recorder:
  """A run's output: log rows (kept, and appended to the CSV file), trajectory frames."""

  def __init__(self, engine: eng.Engine, start: _Start, opts: RunOptions,
               traj: Optional[Path], log_file: Optional[PathLike]):
    self.engine, self.start, self.opts, self.traj = engine, start, opts, traj
    self.limits = _limits(opts, start)
    self.columns = output.columns_for(eng.observables(engine.key))
    self.csv = output.CsvLog(log_file, [c.csv for c in self.columns])
    self.context = output.RowContext(len(start.system.masses), self.time_fs)
    self.rows: List[Dict[str, float]] = []
    self.last_frame = start.first_step if start.last is not None else None  # its md_step

  def time_fs(self, g: int) -> float:
    return self.start.time0_fs + (g - self.start.first_step) * self.opts.timestep

  def frame(self, state, epot, box, g, virial=None) -> ase.Atoms:
    info = {"md_step": int(g), "md_time_fs": self.time_fs(int(g)),
            "md_ensemble": self.opts.ensemble, "md_state": msys.extended_state(state)}
    return msys.to_atoms(self.start.system, np.asarray(state.position),
                         np.asarray(state.momentum), np.asarray(state.force), float(epot),
                         np.asarray(box), info, None if virial is None else np.asarray(virial))

  def logs(self, logs: Dict[str, np.ndarray], count: int) -> None:
    new = output.make_rows(self.columns, logs, count, self.context)
    self.rows += new
    self.csv.write(new)

  def first(self, carry) -> None:
    """The start of a fresh run: checked by the guards, logged, and written as the
    trajectory's first frame."""
    logs = eng.start_logs(self.engine, carry, self.start.first_step)
    state = carry[0]
    code, value = guards.check(np.asarray(state.position), np.asarray(state.momentum),
                               np.asarray(state.force), float(logs["epot"][0]),
                               self.start.system.masses, **self.limits)
    if code != guards.OK:
      why = guards.reason(code, self.start.first_step, value, **self.limits).split(" (")[0]
      raise ValueError(f"the start structure fails a runaway guard: {why}; check the "
                       f"structure, or raise max_temperature / max_force")
    self.logs(logs, 1)
    if self.traj is not None:
      output.append_frames(self.traj, [self.frame(state, logs["epot"][0],
                                                  self.engine.box_fn(state),
                                                  self.start.first_step,
                                                  logs.get("virial", [None])[0])])
      self.last_frame = self.start.first_step

  def chunk(self, c: eng.Chunk) -> None:
    """A chunk's rows and frames; after a guard fired, also the last good state (row and
    frame) unless the chunk recorded it already."""
    self.logs(c.logs, c.num_logs)
    frames = []
    if self.traj is not None:
      fr, n = jax.device_get(c.frames), int(c.num_frames)
      frames = [self.frame(jax.tree.map(lambda x: x[i], fr["state"]), fr["epot"][i],
                           fr["box"][i], fr["step"][i], fr["virial"][i] if "virial" in fr
                           else None) for i in range(n)]
    last = frames[-1].info["md_step"] if frames else self.last_frame
    if c.guard:
      state, nbrs, _ = c.carry
      obs = jax.device_get(self.engine.observe_fn(state, nbrs))
      if not self.rows or self.rows[-1]["step"] != c.stop:
        self.logs(dict(jax.tree.map(lambda x: np.asarray(x)[None], obs),
                       step=np.array([c.stop])), 1)
      if self.traj is not None and last != c.stop:
        frames.append(self.frame(state, obs["epot"], self.engine.box_fn(state), c.stop,
                                 obs.get("virial")))
    if frames:
      output.append_frames(self.traj, frames)
      self.last_frame = frames[-1].info["md_step"]

  def final(self, carry, g: int) -> ase.Atoms:
    if g == self.start.first_step and self.start.last is not None:
      final = self.start.last.copy()
      final.calc = self.start.last.calc
      return final
    state, nbrs, _ = carry
    obs = jax.device_get(self.engine.observe_fn(state, nbrs))
    final = self.frame(state, obs["epot"], self.engine.box_fn(state), g, obs.get("virial"))
    final.info.pop("md_state")
    return final


def _reporter(progress, opts: RunOptions, start: _Start) -> Callable:
  """``report(step, state, rows, seconds)`` after each chunk, from ``run``'s ``progress``; its
  ``close`` attribute ends a bar."""
  first, masses = start.first_step, start.system.masses
  bar = (output.ProgressBar(opts.steps - first, opts.timestep, desc=f"MD {opts.ensemble}")
         if progress is True else None)

  def report(g: int, n: int, state, rows, seconds: float) -> None:
    if not rows:
      return
    r = rows[-1]
    temperature = thermo.temperature(np.asarray(state.momentum), masses)
    if bar is not None:
      bar.update(g - first, temperature, r["etot_eV"])
    if callable(progress):
      time_ps = (start.time0_fs + (g - first) * opts.timestep) * 1e-3
      progress(Progress(step=g, total_steps=opts.steps, time_ps=time_ps,
                        temperature=temperature,
                        epot=r["epot_eV"], ekin=r["ekin_eV"], etot=r["etot_eV"],
                        steps_per_s=n / seconds))
  report.close = bar.close if bar is not None else (lambda: None)
  return report


# jax-md's thermostats sum kinetic energies with an explicit float64 accumulator, which JAX
# truncates to float32 in float32 runs with a UserWarning at every trace; the sum is the same,
# so the warning is noise to users.
_quiet_float64_requests = quiet("Explicitly requested dtype float64", UserWarning)


@_quiet_float64_requests
def run(
    atoms: ase.Atoms,
    potential: potentials.Potential,
    *,
    ensemble: str = DEFAULTS.ensemble,
    temperature: float = DEFAULTS.temperature,
    timestep: float = DEFAULTS.timestep,
    steps: int = DEFAULTS.steps,
    pressure: float = DEFAULTS.pressure,
    friction: float = DEFAULTS.friction,
    tau_t: Optional[float] = None,
    tau_p: Optional[float] = None,
    init_temperature: Optional[float] = None,
    chunk: int = DEFAULTS.chunk,
    log_interval: Optional[int] = None,
    traj: Optional[PathLike] = None,
    traj_interval: Optional[int] = None,
    resume: bool = False,
    log_file: Optional[PathLike] = None,
    seed: int = DEFAULTS.seed,
    dr_threshold: float = DEFAULTS.dr_threshold,
    capacity_multiplier: float = DEFAULTS.capacity_multiplier,
    dtype: Any = DEFAULTS.dtype,
    progress: Union[bool, Callable[[Progress], None]] = False,
    max_temperature: Optional[float] = None,
    max_force: Optional[float] = DEFAULTS.max_force,
) -> MDResult:
  """Run molecular dynamics of ``atoms`` with ``potential``; see :mod:`plugin.md`.

  Args:
    atoms: the start structure (positions Å, masses amu, cell, pbc all or none; momenta are
      used if any is non-zero). Not modified.
    potential: the :class:`potentials.Potential`.
    ensemble: a name in :data:`plugin.md.ENSEMBLES` (``"nve"``, ``"nvt_langevin"``,
      ``"nvt_nose_hoover"``, ``"npt"``).
    temperature: thermostat target (K); also the initial temperature unless
      ``init_temperature`` is given or the atoms have momenta.
    timestep: fs.
    steps: the step number at which the run ends (a fresh run runs ``steps`` steps; a resumed
      one continues from the last frame's ``md_step``).
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
      frames. Read any of them back with :func:`plugin.md.read_trajectory`.
    traj_interval: steps between frames (default ``log_interval``); the first (fresh runs) and
      the last step are always written.
    resume: continue from the last complete frame of ``traj`` if it exists (else start from
      ``atoms``); any format.
      Without it an existing non-empty ``traj`` is an error, never overwritten.
    log_file: CSV file for the log rows (appended to; a header is written to a new file).
    seed: seeds the Maxwell-Boltzmann velocities and the Langevin noise.
    dr_threshold: neighbour-list skin (Å).
    capacity_multiplier: initial neighbour-list headroom (JAX-MD's); it grows on overflow.
    dtype: ``jnp.float32`` (default) or ``jnp.float64`` (needs ``jax_enable_x64``).
    progress: True for a tqdm bar, or a callable taking a :class:`Progress` after each chunk.
    max_temperature: K; the run stops (``MDResult.stopped``, last good frame written) when the
      temperature exceeds it; None: ``max(10 x reference, 5000 K)`` (``DEFAULTS``; reference:
      the thermostat target, or in NVE the start temperature); ``inf``: off.
    max_force: eV/Å; the run stops when a force exceeds it; None (default): off. Non-finite
      positions, momenta, forces or energies always stop a run. Checked at every step.

  Returns:
    :class:`MDResult`.
  """
  opts = run_options(
      ensembles=TABLE, ensemble=ensemble, temperature=temperature, timestep=timestep,
      steps=steps, pressure=pressure, friction=friction, tau_t=tau_t, tau_p=tau_p,
      init_temperature=init_temperature, chunk=chunk, log_interval=log_interval,
      has_traj=traj is not None, traj_interval=traj_interval, seed=seed,
      dr_threshold=dr_threshold, capacity_multiplier=capacity_multiplier, dtype=dtype,
      max_temperature=max_temperature, max_force=max_force)
  traj_path = None if traj is None else Path(traj)
  if traj_path is not None:
    output.traj_format(traj_path)
  start = _start(atoms, traj_path, resume, opts, float(potential.cutoff))
  engine = eng.engine(potential, _engine_key(opts, start.system))
  traces0 = engine.traces[0]
  carry, extra = _start_carry(engine, start, opts)
  rec = _Recorder(engine, start, opts, traj_path, log_file)
  if start.last is None:
    rec.first(carry)
  report = _reporter(progress, opts, start)
  g, reallocations, chunk_times, stopped, reason = start.first_step, 0, [], None, None
  limits = jnp.asarray([rec.limits["max_temperature"], rec.limits["max_force"]], opts.dtype)
  try:
    for c in eng.simulate_chunks(engine, carry, start.first_step, opts.steps, extra, limits):
      rec.chunk(c)
      carry, g = c.carry, c.stop
      reallocations += c.reallocations
      chunk_times.append(time.perf_counter() - c.t_start)
      report(g, max(c.stop - c.start, 1), carry[0], rec.rows, chunk_times[-1])
      if c.guard:
        stopped = guards.NAMES[c.guard]
        reason = guards.reason(c.guard, g + 1, c.value, **rec.limits)
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
  finally:
    report.close()
  return MDResult(atoms=rec.final(carry, g), log=MDLog.from_rows(rec.columns, rec.rows),
                  steps=g - start.first_step, first_step=start.first_step, total_steps=g,
                  num_compilations=engine.traces[0] - traces0,
                  num_reallocations=reallocations, wall_time_s=float(sum(chunk_times)),
                  chunk_times_s=chunk_times, stopped=stopped, reason=reason)


def temperature_of(state, masses: np.ndarray) -> float:
  """Temperature (K) of a JAX-MD state's momenta (:func:`plugin.thermo.temperature`)."""
  return thermo.temperature(np.asarray(state.momentum), masses)
