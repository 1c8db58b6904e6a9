"""The ASE engine: the ensembles of :mod:`plugin.md.ensembles` with ASE's integrators and any ASE
calculator, logged with the same schema as :func:`plugin.md.run` (temperature by
:mod:`plugin.thermo`'s one rule). ``eqattn md --engine ase`` and :mod:`plugin.testing` run on it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import ase
import numpy as np

from plugin import thermo
from plugin.md import guards, output
from plugin.md.ensembles import TABLE
from plugin.md.output import MDLog
from plugin.md.settings import DEFAULTS


@dataclasses.dataclass
class ASEResult:
  """``atoms``: the final structure (with the calculator); ``log``: one row per ``interval``
  steps and the first step (:class:`plugin.md.MDLog`); ``wall_time_s``: seconds of the run;
  ``stopped`` / ``reason``: the runaway guard that ended the run early and its one-line reason
  (:mod:`plugin.md.guards`; ``atoms`` is then the last good state), else None."""

  atoms: ase.Atoms
  log: MDLog
  wall_time_s: float
  stopped: Optional[str] = None
  reason: Optional[str] = None


def start_momenta(atoms: ase.Atoms, temperature: float, seed: int) -> np.ndarray:
  """:func:`plugin.thermo.maxwell_boltzmann` momenta for ``atoms`` (open boundaries: without
  rigid rotation), as :func:`plugin.md.run` starts them."""
  positions = None if np.any(atoms.pbc) else atoms.positions
  return thermo.maxwell_boltzmann(atoms.get_masses(), temperature, seed, positions)


def dynamics(atoms: ase.Atoms, ensemble: str, timestep: float, temperature: float, seed: int):
  """The ASE dynamics object of ``ensemble`` (the table's ``ase_dynamics``), or a clear error."""
  entry = TABLE.get(ensemble)
  if entry is None or entry.ase_dynamics is None:
    offered = [name for name, e in TABLE.items() if e.ase_dynamics is not None]
    raise ValueError(
      f"ensemble {ensemble!r} has no ASE engine; choose one of "
      f"{', '.join(offered)} or run it with plugin.md.run (JAX-MD)"
    )
  return entry.ase_dynamics(atoms, timestep, temperature, seed)


def snapshot(atoms: ase.Atoms, step: int, timestep: float, ensemble: str) -> ase.Atoms:
  """A trajectory frame of the live ``atoms``: a copy with its energy, forces (and stress where
  periodic; charges of a model with learnt charges) in a ``SinglePointCalculator`` and
  ``md_step``, ``md_time_fs``, ``md_ensemble``."""
  from ase.calculators.calculator import PropertyNotImplementedError
  from ase.calculators.singlepoint import SinglePointCalculator

  frame = atoms.copy()
  results = dict(energy=atoms.get_potential_energy(), forces=atoms.get_forces())
  if atoms.pbc.all():
    try:
      results["stress"] = atoms.get_stress()
    except PropertyNotImplementedError:  # a calculator without stress
      pass
  charges = getattr(atoms.calc, "results", {}).get("charges")
  if charges is not None:  # a model with learnt charges
    results["charges"] = np.array(charges)
  frame.calc = SinglePointCalculator(frame, **results)
  frame.info.update(md_step=int(step), md_time_fs=step * timestep, md_ensemble=ensemble)
  return frame


def run_ase(
  atoms: ase.Atoms,
  calculator: Any,
  *,
  ensemble: str = DEFAULTS.ensemble,
  timestep: float = DEFAULTS.timestep,
  steps: int = DEFAULTS.steps,
  temperature: float = DEFAULTS.temperature,
  interval: int = 1,
  seed: int = DEFAULTS.seed,
  momenta: Optional[np.ndarray] = None,
  traj: Optional[str] = None,
  progress: Optional[Callable[[int, float, float], None]] = None,
  max_temperature: Optional[float] = None,
  max_force: Optional[float] = DEFAULTS.max_force,
  log_file: Optional[str] = None,
) -> ASEResult:
  """Run ``steps`` steps of ``ensemble`` with ASE's integrator on a copy of ``atoms``.

  Start momenta: ``momenta`` if given, else the atoms' own if any is non-zero, else
  :func:`start_momenta` at ``temperature`` from ``seed``. Every ``interval`` steps (and at the
  start) a log row is taken, a frame appended to ``traj`` (any format of
  :data:`plugin.md.output.FORMATS`; an existing file is replaced) and
  ``progress(step, temperature_K, total_energy_eV)`` called; ``log_file``: the rows as CSV
  (:func:`plugin.md.run`'s columns; an existing file is replaced). The runaway guards
  (:func:`plugin.md.guards.guard`, every step; ``max_temperature`` None: the default rule for
  ``temperature``) end the run early with its last good frame written (``ASEResult.stopped``).
  """
  a = atoms.copy()
  a.calc = calculator
  if momenta is None and not np.any(a.get_momenta()):
    momenta = start_momenta(a, temperature, seed)
  if momenta is not None:
    a.set_momenta(np.asarray(momenta, np.float64))
  dyn = dynamics(a, ensemble, timestep, temperature, seed)
  names = ("ekin", "epot") + (() if TABLE[ensemble].thermostat else ("conserved",))
  columns = output.columns_for(names)
  context = output.RowContext(len(a), lambda step: step * timestep)
  rows: List[Dict[str, float]] = []
  if traj is not None:
    output.traj_format(traj)
    Path(traj).unlink(missing_ok=True)
  if log_file is not None:
    Path(log_file).unlink(missing_ok=True)
  csv = output.CsvLog(log_file, [c.csv for c in columns])
  written = [-1]  # md_step of the last frame in traj

  def write(frame: ase.Atoms) -> None:
    if traj is not None and frame.info["md_step"] != written[0]:
      output.append_frames(traj, [frame])
      written[0] = frame.info["md_step"]

  def record():
    step = dyn.get_number_of_steps()
    if rows and rows[-1]["step"] == step:  # ASE versions differ in calling observers at start
      return
    epot, ekin = a.get_potential_energy(), a.get_kinetic_energy()
    new = output.make_rows(
      columns,
      {"step": [step], "epot": [epot], "ekin": [ekin], "conserved": [epot + ekin]},
      1,
      context,
    )
    rows.extend(new)
    csv.write(new)
    if traj is not None:
      write(snapshot(a, step, timestep, ensemble))
    if progress is not None:
      progress(step, rows[-1]["temperature_K"], epot + ekin)

  t0 = time.perf_counter()
  stopped = reason = None
  reference_t = temperature if TABLE[ensemble].thermostat else a.get_temperature()
  record()
  dyn.attach(record, interval=interval)
  guards.guard(dyn, max_temperature=max_temperature, max_force=max_force, temperature=reference_t)
  try:
    dyn.run(steps)
  except guards.RunawayError as e:
    stopped, reason, good = e.guard, str(e), e.last_good
    if good is not None:
      a = good  # the last good state; the live atoms hold the runaway one
      write(snapshot(good, good.info["md_step"], timestep, ensemble))
  return ASEResult(a, MDLog.from_rows(columns, rows), time.perf_counter() - t0, stopped, reason)
