"""``plugin.md.run``: composes settings, the ensembles table, system, engine and output."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import ase
import jax
import jax.numpy as jnp
import numpy as np
from jax_md import simulate

import potentials
from plugin import host, thermo
from plugin.quiet import quiet
from plugin.md import engine as eng
from plugin.md import guards, output, replicas as mrep, system as msys
from plugin.md.ensembles import TABLE, Params
from plugin.md.output import MDLog, Progress
from plugin.md.options import MDOptions
from plugin.registry import COMPILED
from plugin.md.settings import DEFAULTS, RunOptions, guard_limits

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
      trajectory's last frame are then the last good state (step ``total_steps``; in a batch
      the other systems go on without this one); or
      ``"max_uncertainty"``: the state (and frame) where the uncertainty was too high; or
      ``"max_wall_time"``: the state (and frame) at the first chunk end past that limit.
    reason: the guard's one-line reason (None when the run finished).
    uncertain: the chunk ends at which an ensemble's force uncertainty exceeded
      ``max_uncertainty``: ``{"step", "max_uncertainty" (eV/Å), "atoms" (indices, most
      uncertain first), "reason"}`` each.
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
  uncertain: List[Dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Start:
  """Where a run starts: the system, its step and time, and (resume) the last frame."""

  system: msys.System
  first_step: int = 0
  time0_fs: float = 0.0
  saved_state: Optional[Dict[str, Any]] = None  # the integrator's variables, from .traj
  last: Optional[ase.Atoms] = None


def _start(
  atoms: ase.Atoms, traj: Optional[Path], resume: bool, opts: RunOptions, potential
) -> _Start:
  """The start of a fresh run, or (``resume``) of the last frame of ``traj``."""
  cutoff = float(potential.cutoff)
  system = msys.from_atoms(atoms, cutoff, opts.dr_threshold)
  if TABLE[opts.ensemble].variable_box and not system.periodic:
    raise ValueError(f"{opts.ensemble} needs a periodic system (atoms.pbc all True and a cell)")
  last = None if traj is None else output.read_last_frame(traj)
  if last is None:
    host.check_overlaps(atoms, DEFAULTS.min_distance)  # as the ASE engine refuses them
    reach, spare = cutoff + opts.dr_threshold, opts.capacity_multiplier
    host.check_pair_memory(atoms, potential.config, reach, opts.dtype, spare)
    if traj is not None:
      output.prepare_resume(traj)  # only an incomplete frame (or nothing): drop it
    return _Start(system)
  if not resume:
    raise FileExistsError(
      f"{str(traj)!r} already holds frames; pass resume=True to "
      f"continue that run, or choose another file / delete it"
    )
  output.prepare_resume(traj)  # a frame cut short by a kill is dropped before appending
  if not np.array_equal(last.numbers, system.numbers):
    raise ValueError(
      f"cannot resume: the atoms in {str(traj)!r} are not the ones given (atomic numbers differ)"
    )
  if "md_step" not in last.info:
    raise ValueError(
      f"cannot resume: the last frame of {str(traj)!r} has no md_step (not written by plugin.md)"
    )
  first_step = int(last.info["md_step"])
  time0 = float(last.info.get("md_time_fs", first_step * opts.timestep))
  saved = last.info.get("md_state") if last.info.get("md_ensemble") == opts.ensemble else None
  last.set_masses(system.masses)
  resumed = msys.from_atoms(
    last, cutoff, opts.dr_threshold, reference=None if system.periodic else system
  )
  resumed = dataclasses.replace(resumed, charge=system.charge)  # the run's, as given
  if resumed.momenta is None:
    resumed = dataclasses.replace(resumed, momenta=np.zeros_like(resumed.R))
  return _Start(resumed, first_step, time0, saved, last)


def _engine_key(opts: RunOptions, system: msys.System) -> eng.EngineKey:
  params = Params.from_user(
    timestep=opts.timestep,
    temperature=opts.temperature,
    friction=opts.friction,
    tau_t=opts.tau_t,
    tau_p=opts.tau_p,
    pressure=opts.pressure,
  )
  return eng.EngineKey(
    ensemble=opts.ensemble,
    params=params,
    numbers=tuple(int(z) for z in system.numbers),
    periodic=system.periodic,
    box=tuple(float(x) for x in system.box.ravel()),
    dr_threshold=opts.dr_threshold,
    capacity_multiplier=opts.capacity_multiplier,
    chunk=opts.chunk,
    log_interval=opts.log_interval,
    traj_interval=opts.traj_interval,
    charge=system.charge,
  )


def _start_carry(engine: eng.Engine, start: _Start, opts: RunOptions):
  """``(carry, extra, known)``: the integrator state (saved variables restored), list and aux,
  and what the start forces computed (:func:`plugin.md.engine.start`)."""
  system = start.system
  R = jnp.asarray(system.R, opts.dtype)
  momenta = msys.start_momenta(system, opts.init_temperature, opts.seed)
  (state, nbrs, _), extra, known = eng.start(
    engine, R, system.box, system.masses, momenta, opts.seed
  )
  if start.saved_state is not None:
    state, ok = msys.restore_extended(state, start.saved_state)
    if not ok:
      warnings.warn(
        "the trajectory's saved integrator state does not match this run's "
        "settings; thermostat/barostat variables start afresh",
        stacklevel=3,
      )
    elif engine.ensemble.variable_box:
      # Positions were read back through the frame's cell; use the restored box exactly.
      nbrs, extra = eng.allocate(engine, R, np.asarray(simulate.npt_box(state), np.float64), extra)
      known = None
  elif start.last is not None and opts.ensemble != "nve":
    warnings.warn(
      f"resuming {opts.ensemble} from a frame without its integrator state (other "
      f"ensemble or extxyz file): thermostat/barostat variables start afresh",
      stacklevel=3,
    )
  return (state, nbrs, eng.initial_aux(engine, state)), extra, known


def _limits(opts: RunOptions, start: _Start) -> Dict[str, float]:
  """The guards' limits; the default temperature limit follows the thermostat's target, or in
  NVE the temperature of this call's start state."""
  reference = opts.temperature
  if not TABLE[opts.ensemble].thermostat:
    p = start.system.momenta
    reference = (
      opts.init_temperature
      if p is None or not np.any(p)
      else thermo.temperature(p, start.system.masses)
    )
  t_max, f_max = guard_limits(
    max_temperature=opts.max_temperature, max_force=opts.max_force, temperature=reference
  )
  return {"max_temperature": t_max, "max_force": f_max}


class _Recorder:
  """One system's output: log rows (kept, and appended to the CSV file) and trajectory frames.
  Engine-free: the caller hands it host data (one system of a batch, or a run alone)."""

  def __init__(
    self,
    columns,
    start: _Start,
    opts: RunOptions,
    traj: Optional[Path],
    log_file: Optional[PathLike],
  ):
    self.start, self.opts, self.traj = start, opts, traj
    self.limits = _limits(opts, start)
    self.columns = columns
    self.csv = output.CsvLog(log_file, [c.csv for c in self.columns])
    if start.last is not None:  # a resume: one row per step, whatever the cut left behind
      self.csv.drop_after(start.first_step)
    self.context = output.RowContext(len(start.system.masses), self.time_fs)
    self.rows: List[Dict[str, float]] = []
    self.last_frame = start.first_step if start.last is not None else None  # its md_step

  def time_fs(self, g: int) -> float:
    return self.start.time0_fs + (g - self.start.first_step) * self.opts.timestep

  def frame(self, state, epot, box, g, virial=None, charges=None) -> ase.Atoms:
    info = {
      "md_step": int(g),
      "md_time_fs": self.time_fs(int(g)),
      "md_ensemble": self.opts.ensemble,
      "md_state": msys.extended_state(state),
    }
    return msys.to_atoms(
      self.start.system,
      np.asarray(state.position),
      np.asarray(state.momentum),
      np.asarray(state.force),
      float(epot),
      np.asarray(box),
      info,
      None if virial is None else np.asarray(virial),
      None if charges is None else np.asarray(charges),
    )

  def logs(self, logs: Dict[str, np.ndarray], count: int) -> None:
    new = output.make_rows(self.columns, logs, count, self.context)
    self.rows += new
    self.csv.write(new)

  def first(self, state, logs: Dict[str, np.ndarray], box) -> None:
    """The start of a fresh run (``logs``: its one row): checked by the guards, logged, and
    written as the trajectory's first frame."""
    code, value = guards.check(
      np.asarray(state.position),
      np.asarray(state.momentum),
      np.asarray(state.force),
      float(logs["epot"][0]),
      self.start.system.masses,
      **self.limits,
    )
    if code != guards.OK:
      why = guards.reason(code, self.start.first_step, value, **self.limits).split(" (")[0]
      raise ValueError(
        f"the start structure fails a runaway guard: {why}; check the "
        f"structure, or raise max_temperature / max_force"
      )
    self.logs(logs, 1)
    if self.traj is not None:
      output.append_frames(
        self.traj,
        [
          self.frame(
            state,
            logs["epot"][0],
            box,
            self.start.first_step,
            logs.get("virial", [None])[0],
            logs.get("charges", [None])[0],
          )
        ],
      )
      self.last_frame = self.start.first_step

  def chunk(
    self, logs, num_logs: int, frames: Callable, stop: int, guard: int, last: Callable
  ) -> None:
    """A chunk's rows and frames (``frames()``: ``(state, epot, box, step, virial[, charges])``;
    after a guard fired, also the last good state (``last() -> (state, obs, box)``, at step
    ``stop``) unless the chunk recorded it already."""
    self.logs(logs, num_logs)
    atoms = [self.frame(*f) for f in frames()] if self.traj is not None else []
    last_step = atoms[-1].info["md_step"] if atoms else self.last_frame
    if guard:
      state, obs, box = last()
      if not self.rows or self.rows[-1]["step"] != stop:
        self.logs(dict(jax.tree.map(lambda x: np.asarray(x)[None], obs), step=np.array([stop])), 1)
      if self.traj is not None and last_step != stop:
        atoms.append(
          self.frame(state, obs["epot"], box, stop, obs.get("virial"), obs.get("charges"))
        )
    if atoms:
      output.append_frames(self.traj, atoms)
      self.last_frame = atoms[-1].info["md_step"]

  def final(self, g: int, last: Callable) -> ase.Atoms:
    if g == self.start.first_step and self.start.last is not None:
      final = self.start.last.copy()
      final.calc = self.start.last.calc
      return final
    state, obs, box = last()
    final = self.frame(state, obs["epot"], box, g, obs.get("virial"), obs.get("charges"))
    final.info.pop("md_state")
    return final


def _observed(engine: eng.Engine, carry, known=None):
  """``(state, observables, box)`` of a carry, on the host (``known``: what its step computed,
  :attr:`plugin.md.engine.Chunk.known`; None: evaluated here)."""
  state = carry[0]
  obs = jax.device_get(engine.observe_fn(*carry, known))
  return state, obs, np.asarray(engine.box_fn(state))


def _frames(c: eng.Chunk) -> List[tuple]:
  """A chunk's recorded frames as ``(state, epot, box, step, virial, charges)``."""
  fr, n = jax.device_get(c.frames), int(c.num_frames)
  return [
    (
      jax.tree.map(lambda x: x[i], fr["state"]),
      fr["epot"][i],
      fr["box"][i],
      fr["step"][i],
      fr["virial"][i] if "virial" in fr else None,
      fr["charges"][i] if "charges" in fr else None,
    )
    for i in range(n)
  ]


def _reporter(progress, opts: RunOptions, start: _Start) -> Callable:
  """``report(step, state, rows, seconds)`` after each chunk, from ``run``'s ``progress``; its
  ``close`` attribute ends a bar."""
  first, masses = start.first_step, start.system.masses
  bar = (
    output.ProgressBar(opts.total_steps - first, opts.timestep, desc=f"MD {opts.ensemble}")
    if progress is True
    else None
  )

  def report(g: int, n: int, state, rows, seconds: float) -> None:
    if not rows:
      return
    r = rows[-1]
    temperature = thermo.temperature(np.asarray(state.momentum), masses)
    if bar is not None:
      bar.update(g - first, temperature, r["etot_eV"])
    if callable(progress):
      time_ps = (start.time0_fs + (g - first) * opts.timestep) * 1e-3
      progress(
        Progress(
          step=g,
          total_steps=opts.total_steps,
          time_ps=time_ps,
          temperature=temperature,
          epot=r["epot_eV"],
          ekin=r["ekin_eV"],
          etot=r["etot_eV"],
          steps_per_s=n / seconds,
        )
      )

  report.close = bar.close if bar is not None else (lambda: None)
  return report


# jax-md's thermostats sum kinetic energies with an explicit float64 accumulator, which JAX
# truncates to float32 in float32 runs with a UserWarning at every trace; the sum is the same,
# so the warning is noise to users.
_quiet_float64_requests = quiet("Explicitly requested dtype float64", UserWarning)


@_quiet_float64_requests
def run(
  atoms: Union[ase.Atoms, Sequence[ase.Atoms]],
  potential: potentials.Potential,
  options: Optional[MDOptions] = None,
  **overrides,
) -> Union[MDResult, List[MDResult]]:
  """Run molecular dynamics of ``atoms`` with ``potential``; see :mod:`plugin.md`.

  Args:
    atoms: the start structure (positions Å, masses amu, cell, pbc all or none; momenta are
      used if any is non-zero). Not modified. A list of structures (any sizes, species and
      cells) runs them together in one compiled program (:mod:`plugin.md.replicas`) and returns
      a list of results; ``temperature`` and ``seed`` may then be one per system, and
      ``traj`` / ``log_file`` one path per system or one path from which they are named.
      NPT runs one system at a time.
    potential: the :class:`potentials.Potential`.
    options: the run's :class:`MDOptions` (default ``MDOptions()``: :data:`plugin.md.DEFAULTS`).
    **overrides: any of :class:`MDOptions`' fields, replacing ``options``' (the keywords ``run``
      has always taken: ``ensemble=``, ``temperature=``, ``timestep=``, ``total_steps=``,
      ``traj=``, ``resume=``, ``max_uncertainty=``, ...).

  Returns:
    :class:`MDResult`, or a list of them for a list of structures.
  """
  opts = MDOptions.make(options, **overrides)
  late = _deadline(opts.max_wall_time)  # from the call: compilation included
  check = _uncertainty_check(potential, opts)
  if not isinstance(atoms, ase.Atoms) and isinstance(atoms, (list, tuple)):
    return _run_many(list(atoms), potential, opts, check, late)
  if isinstance(opts.temperature, tuple) or isinstance(opts.seed, tuple):
    raise ValueError("one temperature or seed per system is for a list of systems")
  if isinstance(opts.traj, tuple) or isinstance(opts.log_file, tuple):
    raise ValueError("one traj or log_file per system is for a list of systems")
  return _run_one(atoms, potential, opts, check, late)


def _run_one(atoms: ase.Atoms, potential, options: MDOptions, check_uncertain, late) -> MDResult:
  """One system in one compiled program, chunk by chunk."""
  opts = options.for_system(0, 1)
  traj_path = None if options.traj is None else Path(options.traj)
  if traj_path is not None:
    output.traj_format(traj_path)
  start = _start(atoms, traj_path, options.resume, opts, potential)
  engine = eng.engine(potential, _engine_key(opts, start.system))
  traces0 = engine.traces[0]
  carry, extra, known = _start_carry(engine, start, opts)
  columns = output.columns_for(eng.observables(engine.key))
  rec = _Recorder(columns, start, opts, traj_path, options.log_file)
  if start.last is None:
    first = eng.start_logs(engine, carry, start.first_step, known)
    rec.first(carry[0], first, engine.box_fn(carry[0]))
  report = _reporter(options.progress, opts, start)
  g, reallocations, chunk_times, stopped, reason = start.first_step, 0, [], None, None
  limits = jnp.asarray([rec.limits["max_temperature"], rec.limits["max_force"]], opts.dtype)
  uncertain = []
  try:
    for c in eng.simulate_chunks(engine, carry, start.first_step, opts.total_steps, extra, limits):
      code = c.guard
      if not code and check_uncertain is not None:
        state, nbrs, _ = c.carry
        event = check_uncertain(eng.force_uncertainty_fn(engine)(state, nbrs), c.stop)
        if event is not None:
          uncertain.append(event)
          code = guards.UNCERTAIN if options.uncertainty_action == "stop" else 0
      limit = None if code or c.stop >= opts.total_steps else late()
      code = guards.WALL_TIME if limit is not None else code
      rec.chunk(
        c.logs,
        c.num_logs,
        lambda: _frames(c),
        c.stop,
        code,
        lambda: _observed(engine, c.carry, c.known),
      )
      carry, g, known = c.carry, c.stop, c.known
      reallocations += c.reallocations
      chunk_times.append(time.perf_counter() - c.t_start)
      report(g, max(c.stop - c.start, 1), carry[0], rec.rows, chunk_times[-1])
      if c.guard:
        stopped = guards.NAMES[c.guard]
        reason = guards.reason(c.guard, g + 1, c.value, **rec.limits)
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
      elif code:
        why = guards.wall_time_reason(g, limit) if limit else uncertain[-1]["reason"]
        stopped, reason = guards.NAMES[code], why
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
        break
  finally:
    report.close()
  return MDResult(
    atoms=rec.final(g, lambda: _observed(engine, carry, known)),
    log=MDLog.from_rows(rec.columns, rec.rows),
    steps=g - start.first_step,
    first_step=start.first_step,
    total_steps=g,
    num_compilations=engine.traces[0] - traces0,
    num_reallocations=reallocations,
    wall_time_s=float(sum(chunk_times)),
    chunk_times_s=chunk_times,
    stopped=stopped,
    reason=reason,
    uncertain=uncertain,
  )


def _uncertainty_check(potential, options: MDOptions) -> Optional[Callable]:
  """``check(u, step, label="") -> event or None`` for ``max_uncertainty`` (None: off); a
  flagged event warns here, a stopping one is worded by the caller."""
  limit, action = options.max_uncertainty, options.uncertainty_action
  if limit is None:
    return None
  if potential.num_members == 1:
    raise ValueError(
      "max_uncertainty needs an ensemble potential (several members); this one is a single "
      "model. Train one with `eqattn train ... --readout-heads 4` (shallow) or `--committee 4` "
      "(committee), or stack models with potentials.Potential.stack([...])"
    )

  def check(u, step: int, label: str = "") -> Optional[Dict[str, Any]]:
    """The event of per-atom uncertainties ``u`` at ``step`` (None: within the limit); a
    flagged one warns (``label`` names the system of a batch)."""
    u = np.asarray(u, np.float64)
    if not u.max() > limit:
      return None
    why = guards.uncertainty_reason(step, u, limit, stop=action == "stop")
    if action == "flag":
      warnings.warn(label + why, RuntimeWarning, stacklevel=5)
    atoms = guards.uncertain_atoms(u, limit).tolist()
    return {
      "step": step,
      "max_uncertainty": float(u.max()),
      "atoms": atoms,
      "reason": why,
    }

  return check


def temperature_of(state, masses: np.ndarray) -> float:
  """Temperature (K) of a JAX-MD state's momenta (:func:`plugin.thermo.temperature`)."""
  return thermo.temperature(np.asarray(state.momentum), masses)


# ------------------------------------------------------------------------------------------
# many systems in one program (plugin.md.replicas)


def _per_system(name: str, value, count: int, one: Callable) -> list:
  """``value`` for each of ``count`` systems: a sequence of that length, or one value that
  ``one(value, i)`` spreads."""
  if isinstance(value, (list, tuple, np.ndarray)):
    if len(value) != count:
      raise ValueError(
        f"{name} has {len(value)} entries for {count} systems; give one per "
        f"system or a single value"
      )
    return list(value)
  return [one(value, i) for i in range(count)]


def replica_path(path: Optional[PathLike], i: int) -> Optional[Path]:
  """System ``i``'s file of a batch named from one path: ``md.traj`` -> ``md.i.traj``."""
  if path is None:
    return None
  path = Path(path)
  return path.with_name(f"{path.stem}.{i}{path.suffix}")


def _batch_key(opts: List[RunOptions], systems: List[msys.System]) -> mrep.BatchKey:
  o = opts[0]
  single = _engine_key(o, systems[0])
  return mrep.BatchKey(
    ensemble=o.ensemble,
    params=single.params,
    systems=tuple(
      (
        tuple(int(z) for z in s.numbers),
        bool(s.periodic),
        tuple(float(x) for x in s.box.ravel()),
        s.charge,
      )
      for s in systems
    ),
    temperatures=tuple(x.temperature for x in opts),
    dr_threshold=o.dr_threshold,
    capacity_multiplier=o.capacity_multiplier,
    chunk=o.chunk,
    log_interval=o.log_interval,
    traj_interval=o.traj_interval,
  )


def _batch_engine(potential, key: mrep.BatchKey, batch: mrep.Batch) -> eng.Engine:
  """One engine per model shape and key (the key fixes every system's geometry; the
  parameters travel in the carry, so a retrained model of the same shape compiles nothing)."""
  make = lambda: mrep.make_engine(potential, key, batch)
  return COMPILED.get("batch-engine", (mrep.model_key(potential), key), make)


def _replica_uncertainty(potential) -> Callable:
  """``(R, nbrs, params) -> (B, N)``: every replica's force uncertainty (one program per
  model shape, as the batch engine)."""
  make = lambda: mrep.force_uncertainty_fn(potential)
  fn = COMPILED.get("replica-uncertainty", mrep.model_key(potential), make)
  return lambda R, nbrs, params: fn(R, nbrs, params, potential.uncertainty_scales[1])


def _restore_replicas(state, starts: List[_Start]):
  """The batched state with each resumed replica's saved integrator variables put back."""
  for i, st in enumerate(starts):
    if st.saved_state is None:
      continue
    one = mrep.replica(state, i, len(st.system.numbers))
    restored, ok = msys.restore_extended(one, st.saved_state)
    if not ok:
      warnings.warn(
        f"system {i}: the trajectory's saved integrator state does not match this "
        f"run's settings; thermostat variables start afresh",
        stacklevel=4,
      )
      continue
    saved = {
      jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]
    }

    def put(path, leaf):
      if getattr(path[0], "name", None) in msys.PARTICLE_FIELDS:
        return leaf
      return leaf.at[i].set(jnp.asarray(saved[jax.tree_util.keystr(path)], leaf.dtype))

    state = jax.tree_util.tree_map_with_path(put, state)
  return state


def _replica_view(batch: mrep.Batch, i: int):
  """Functions slicing system ``i`` out of the batch's host data."""
  n = int(batch.sizes[i])
  logs = lambda lg: {k: (v if k == "step" else np.asarray(v)[:, i]) for k, v in lg.items()}

  def frames(fr, count):
    state = mrep.replica(fr["state"], i, n, lead=1)
    return [
      (
        jax.tree.map(lambda x: x[j], state),
        fr["epot"][j, i],
        fr["box"][j, i],
        fr["step"][j],
        fr["virial"][j, i],
        fr["charges"][j, i, :n] if "charges" in fr else None,
      )
      for j in range(count)
    ]

  def observed(state, obs, boxes):
    mine = {k: np.asarray(v)[i] for k, v in obs.items()}
    if "charges" in mine:
      mine["charges"] = mine["charges"][:n]
    return mrep.replica(state, i, n), mine, boxes[i]

  return logs, frames, observed


@dataclasses.dataclass
class _Member:
  """One system of a batch run: where it (re)starts, its options, seed, output and result."""

  index: int
  start: _Start
  opts: RunOptions
  seed: int
  rec: "_Recorder"
  first_step: int
  result: Optional[MDResult] = None
  uncertain: List[Dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Tally:
  """What every segment of a batch run adds up: compilations, reallocations, chunk times."""

  compilations: int = 0
  reallocations: int = 0
  chunk_times: List[float] = dataclasses.field(default_factory=list)


@_quiet_float64_requests
def _run_many(
  systems: List[ase.Atoms], potential, options: MDOptions, check, late
) -> List[MDResult]:
  """Systems in one compiled program; a system that runs away (or, with ``check`` and
  ``uncertainty_action="stop"``, whose force uncertainty is too high) leaves the batch (its
  result names the guard, its last good frame is written) and is parked
  (:func:`plugin.md.replicas.park`): the others go on in the same program, each as it runs
  alone."""
  opts, trajs, logs, starts, first = _batch_plan(systems, potential, options)
  uncertainty = None if check is None else (check, options.uncertainty_action)
  members = [
    _Member(i, st, o, o.seed, _Recorder(_columns(o, st), st, o, t, lf), first)
    for i, (st, o, t, lf) in enumerate(zip(starts, opts, trajs, logs))
  ]
  report = _batch_reporter(options.progress, opts[0], first, [len(a) for a in systems])
  try:
    _batch(potential, members, first, report, uncertainty, late)
  finally:
    report.close()
  return [m.result for m in members]


def _deadline(limit: Optional[float]) -> Callable[[], Optional[float]]:
  """``late()``: ``limit`` once ``limit`` seconds have passed since now, else None (always
  None for ``limit`` None)."""
  end = None if limit is None else time.perf_counter() + float(limit)
  return lambda: limit if end is not None and time.perf_counter() >= end else None


def _columns(opts: RunOptions, start: _Start):
  return output.columns_for(eng.observables(_engine_key(opts, start.system)))


def _batch(potential, members: List[_Member], g: int, report, uncertainty, late) -> None:
  """Runs ``members`` in one batch from step ``g`` and sets each one's result: at the end,
  or where it leaves (:func:`_leaving`; then it is parked and the rest go on)."""
  starts, opts = [m.start for m in members], [m.opts for m in members]
  momenta = [
    msys.start_momenta(st.system, o.init_temperature, m.seed)
    for st, o, m in zip(starts, opts, members)
  ]
  batch = mrep.stack([st.system for st in starts], momenta, potential)
  engine = _batch_engine(potential, _batch_key(opts, [st.system for st in starts]), batch)
  tally, traces0 = _Tally(), engine.traces[0]
  seeds = [m.seed for m in members]
  carry, extra, known = mrep.start(engine, batch, seeds, opts[0].dtype, potential.params)
  carry = (_restore_replicas(carry[0], starts),) + carry[1:]
  views = [_replica_view(batch, i) for i in range(len(members))]  # (logs, frames, observed)

  def at(carry, known):  # view(k): system k's (state, observables, box) in ``carry``
    state, obs, boxes = _observed(engine, carry, known)
    state = jax.device_get(state)
    return lambda k: views[k][2](state, obs, boxes)

  if all(st.last is None for st in starts):
    view = at(carry, known)
    for k, m in enumerate(members):
      s_k, o_k, b_k = view(k)
      m.rec.first(
        s_k, dict(jax.tree.map(lambda x: np.asarray(x)[None], o_k), step=np.array([g])), b_k
      )
  lim = [m.rec.limits for m in members]  # the third column 0: a parked system
  limits = np.array([[x["max_temperature"], x["max_force"], 1.0] for x in lim])
  try:
    while True:
      leaving, lim = [], jnp.asarray(limits, opts[0].dtype)
      for c in eng.simulate_chunks(engine, carry, g, opts[0].total_steps, extra, lim):
        leaving = _leaving(c, members, batch, uncertainty, potential, late)
        _record(c, members, views, leaving, at)
        carry, g, extra, known = c.carry, c.stop, c.extra, c.known
        tally.reallocations += c.reallocations
        tally.chunk_times.append(time.perf_counter() - c.t_start)
        report(g, max(c.stop - c.start, 1), tally.chunk_times[-1], _running(members))
        if leaving:
          break
      tally.compilations = engine.traces[0] - traces0
      view = at(carry, known)
      for k, code, reason in leaving:
        _drop(members[k], code, reason, g, tally, view(k))
      if not leaving or not _running(members):
        break
      carry = mrep.park(carry, [k for k, _, _ in leaving])
      limits[[k for k, _, _ in leaving], 2] = 0.0
  finally:
    tally.compilations = engine.traces[0] - traces0
  for k, m in enumerate(members):
    if m.result is None:
      m.result = _member_result(m, g, tally, view(k))


def _running(members: List[_Member]) -> List["_Recorder"]:
  return [m.rec for m in members if m.result is None]


def _record(c: eng.Chunk, members: List[_Member], views, leaving, at) -> None:
  """Chunk ``c``'s rows and frames for each running system (and the last good state of
  those ``leaving``; ``at(carry, known)(k)``: system ``k``'s state there)."""
  codes = {k: code for k, code, _ in leaving}
  write = any(m.rec.traj is not None for m in members if m.result is None)
  fr = jax.device_get(c.frames) if write else None
  last = functools.lru_cache(maxsize=1)(lambda: at(c.carry, c.known))  # once, if needed
  for k, m in enumerate(members):
    if m.result is not None:
      continue
    lg, frames, _ = views[k]
    m.rec.chunk(
      lg(c.logs),
      c.num_logs,
      lambda frames=frames: frames(fr, int(c.num_frames)),
      c.stop,
      codes.get(k, 0),
      lambda k=k: last()(k),
    )


def _leaving(c: eng.Chunk, members: List[_Member], batch, uncertainty, potential, late):
  """``(k, guard code, reason)`` of the systems that leave the batch after chunk ``c``: the
  one whose runaway guard fired, else (``uncertainty = (check, action)``) those whose force
  uncertainty exceeds the limit when the action is "stop" (flagged ones are recorded), else
  all of them once ``late()`` gives the wall-time limit before the end."""
  if c.guard:
    if members[c.where].result is not None:  # a parked system cannot fire: a defect, not a loop
      raise RuntimeError(f"a guard fired for system {c.where}, which had left the batch")
    limits = members[c.where].rec.limits
    return [(c.where, c.guard, guards.reason(c.guard, c.stop + 1, c.value, **limits))]
  running = [k for k, m in enumerate(members) if m.result is None]
  out = []
  if uncertainty is not None:
    check, action = uncertainty
    state, nbrs, params = c.carry
    u = np.asarray(_replica_uncertainty(potential)(state.position, nbrs, params))
    for k in running:
      m = members[k]
      event = check(u[k, : int(batch.sizes[k])], c.stop, f"system {m.index}: ")
      if event is not None:
        m.uncertain.append(event)
        if action == "stop":
          out.append((k, guards.UNCERTAIN, event["reason"]))
  limit = None if out or c.stop >= members[0].opts.total_steps else late()
  if limit is not None:
    out = [(k, guards.WALL_TIME, guards.wall_time_reason(c.stop, limit)) for k in running]
  return out


def _drop(m: _Member, code: int, reason: str, g: int, tally: _Tally, observed) -> None:
  """A system leaves the batch with its result (a warning names it)."""
  warnings.warn(f"system {m.index}: {reason}", RuntimeWarning, stacklevel=5)
  m.result = _member_result(m, g, tally, observed, stopped=guards.NAMES[code], reason=reason)


def _member_result(m: _Member, g: int, tally: _Tally, observed, **stop) -> MDResult:
  return MDResult(
    atoms=m.rec.final(g, lambda: observed),
    log=MDLog.from_rows(m.rec.columns, m.rec.rows),
    steps=g - m.first_step,
    first_step=m.first_step,
    total_steps=g,
    num_compilations=tally.compilations,
    num_reallocations=tally.reallocations,
    wall_time_s=float(sum(tally.chunk_times)),
    chunk_times_s=list(tally.chunk_times),
    uncertain=m.uncertain,
    **stop,
  )


def _batch_plan(systems, potential, options: MDOptions):
  """Per-system options, output paths and starting points of a batch run."""
  if not systems:
    raise ValueError("the list of systems is empty")
  B = len(systems)
  opts = [options.for_system(i, B) for i in range(B)]
  trajs = _per_system("traj", options.traj, B, replica_path)
  logs = _per_system("log_file", options.log_file, B, replica_path)
  trajs = [None if t is None else Path(t) for t in trajs]
  for t in trajs:
    if t is not None:
      output.traj_format(t)
  if len({str(t) for t in trajs if t is not None}) < sum(t is not None for t in trajs):
    raise ValueError("two systems would write the same trajectory file; give one path each")
  starts = [_start(a, t, options.resume, o, potential) for a, t, o in zip(systems, trajs, opts)]
  first = {st.first_step for st in starts}
  if len(first) > 1:
    raise ValueError(
      f"cannot resume systems that stopped at different steps {sorted(first)}; "
      f"resume them one at a time"
    )
  return opts, trajs, logs, starts, first.pop()


def _batch_reporter(progress, opts: RunOptions, first: int, sizes: List[int]) -> Callable:
  """``report(step, steps, seconds, recorders)`` after each chunk of a batch (mean
  temperature and energies over the running systems' latest rows); ``close`` ends a bar."""
  bar = (
    output.ProgressBar(
      opts.total_steps - first,
      opts.timestep,
      desc=f"MD {opts.ensemble} x{len(sizes)}",
      atoms=sum(sizes),
    )
    if progress is True
    else None
  )

  def report(g: int, n: int, seconds: float, recs: List[_Recorder]) -> None:
    rows = [r.rows[-1] for r in recs if r.rows]
    if not rows:
      return
    mean = lambda key: float(np.mean([r[key] for r in rows]))
    if bar is not None:
      bar.update(g - first, mean("temperature_K"), mean("etot_eV"))
    if callable(progress):
      atoms = sum(len(r.start.system.masses) for r in recs)
      progress(
        Progress(
          step=g,
          total_steps=opts.total_steps,
          time_ps=recs[0].time_fs(g) * 1e-3,
          temperature=mean("temperature_K"),
          epot=mean("epot_eV"),
          ekin=mean("ekin_eV"),
          etot=mean("etot_eV"),
          steps_per_s=n / seconds,
          systems=len(recs),
          atom_steps_per_s=atoms * n / seconds,
        )
      )

  report.close = bar.close if bar is not None else (lambda: None)
  return report
