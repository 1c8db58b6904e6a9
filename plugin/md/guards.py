"""Guards against runaway MD: one rule, checked inside the JAX-MD engine's compiled loop at every
step (:mod:`plugin.md.engine`) and by an ASE observer (:func:`guard`, ``plugin.ase.guard``).

A run stops cleanly, keeping its last good frame, when positions, momenta, forces or the energy
become non-finite, the temperature (3N rule, :mod:`plugin.thermo`) exceeds ``max_temperature``,
or the largest force on an atom exceeds ``max_force``. Defaults and the default temperature rule:
:data:`plugin.md.settings.DEFAULTS` (``max_temperature_factor``, ``max_temperature_floor``,
``max_force``) and :func:`plugin.md.settings.guard_limits`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from plugin import thermo
from plugin.md.settings import DEFAULTS, guard_limits

# Codes the compiled loop returns (0: no guard fired); the reasons are worded here only.
OK, NON_FINITE, HOT, FORCE, NON_FINITE_ENERGY = range(5)
# checked on the host between chunks (plugin.md.driver), not in the compiled loop
UNCERTAIN, WALL_TIME = 5, 6
NAMES = {
  NON_FINITE: "non_finite",
  HOT: "max_temperature",
  FORCE: "max_force",
  NON_FINITE_ENERGY: "non_finite",
  UNCERTAIN: "max_uncertainty",
  WALL_TIME: "max_wall_time",
}


def wall_time_reason(step: int, limit: float) -> str:
  """The one-line reason of a run stopped by its ``max_wall_time``."""
  return (
    f"MD stopped at step {step}: max_wall_time {limit:g} s reached; the frame of step {step} "
    f"is the last one written (resume=True continues from it)"
  )


def uncertain_atoms(forces_uncertainty: np.ndarray, limit: float) -> np.ndarray:
  """Indices of the atoms whose force uncertainty exceeds ``limit``, most uncertain first."""
  u = np.asarray(forces_uncertainty, np.float64)
  over = np.flatnonzero(u > limit)
  return over[np.argsort(-u[over], kind="stable")]


def uncertainty_reason(step: int, forces_uncertainty: np.ndarray, limit: float, stop: bool) -> str:
  """The one-line reason of the uncertainty guard (``stop``: it ended the run)."""
  atoms = uncertain_atoms(forces_uncertainty, limit)
  shown = ", ".join(str(int(i)) for i in atoms[:10]) + (" ..." if len(atoms) > 10 else "")
  what = "stopped" if stop else "flagged"
  return (
    f"MD {what} at step {step}: force uncertainty {float(np.max(forces_uncertainty)):.4g} "
    f"eV/Å exceeded max_uncertainty {limit:g} eV/Å on {len(atoms)} atom(s) [{shown}] (the "
    f"model is guessing: this structure is outside its training data; label it and retrain)"
    + (f"; the frame of step {step} is the last one written" if stop else "")
  )


def reason(
  code: int,
  step: int,
  value: float,
  *,
  max_temperature: float,
  max_force: float,
  last_good: Optional[int] = None,
) -> str:
  """The one-line reason a guard gives for stopping at ``step`` (``last_good``: the step of the
  last good frame, default ``step - 1``)."""
  what = {
    NON_FINITE: "positions, momenta or forces became non-finite",
    NON_FINITE_ENERGY: "the potential energy became non-finite",
    HOT: f"temperature {value:.4g} K exceeded max_temperature {max_temperature:g} K",
    FORCE: f"a force of {value:.4g} eV/Å exceeded max_force {max_force:g} eV/Å",
  }[code]
  return (
    f"MD stopped at step {step}: {what} (runaway: atoms too close, timestep too large, or "
    f"the model outside its training data); the last good frame is step "
    f"{step - 1 if last_good is None else last_good}"
  )


class RunawayError(RuntimeError):
  """Raised by the ASE observer (:func:`guard`) when a guard fires. ``guard``: which one
  (``"non_finite"``, ``"max_temperature"``, ``"max_force"``), ``step``, ``last_good``: a copy
  of the last ``Atoms`` that passed (energy and forces in a ``SinglePointCalculator``)."""

  def __init__(self, message: str, guard: str, step: int, last_good: Any):
    super().__init__(message)
    self.guard, self.step, self.last_good = guard, step, last_good


def check(positions, momenta, forces, energy, masses, *, max_temperature: float, max_force: float):
  """``(code, value)`` of the first guard that fires for one state (host side), else (OK, 0)."""
  arrays = (positions, momenta, forces)
  if not all(np.all(np.isfinite(np.asarray(a))) for a in arrays):
    return NON_FINITE, float("nan")
  if energy is not None and not np.isfinite(energy):
    return NON_FINITE_ENERGY, float("nan")
  t = thermo.temperature(momenta, masses)
  if t > max_temperature:
    return HOT, t
  f = float(np.sqrt(np.max(np.sum(np.asarray(forces, np.float64) ** 2, axis=-1))))
  if f > max_force:
    return FORCE, f
  return OK, 0.0


@dataclasses.dataclass
class Guard:
  """The ASE observer :func:`guard` attaches; ``last_good`` is the last state that passed."""

  dyn: Any
  max_temperature: float
  max_force: float
  last_good: Optional[Any] = None

  def __call__(self) -> None:
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = self.dyn.atoms
    step = int(self.dyn.get_number_of_steps())
    positions = atoms.get_positions()
    try:
      forces, energy = atoms.get_forces(), atoms.get_potential_energy()
    except Exception:  # noqa: BLE001 - a calculator failing on NaN positions is a runaway too
      forces, energy = np.full_like(positions, np.nan), float("nan")
    code, value = check(
      positions,
      atoms.get_momenta(),
      forces,
      energy,
      atoms.get_masses(),
      max_temperature=self.max_temperature,
      max_force=self.max_force,
    )
    if code != OK:
      good = None if self.last_good is None else int(self.last_good.info["md_step"])
      raise RunawayError(
        reason(
          code,
          step,
          value,
          max_temperature=self.max_temperature,
          max_force=self.max_force,
          last_good=good,
        ),
        NAMES[code],
        step,
        self.last_good,
      )
    good = atoms.copy()
    good.calc = SinglePointCalculator(good, energy=energy, forces=forces)
    good.info.update(md_step=step)
    self.last_good = good


def guard(
  dyn,
  *,
  max_temperature: Optional[float] = None,
  max_force: Optional[float] = DEFAULTS.max_force,
  temperature: Optional[float] = None,
  interval: int = 1,
) -> Guard:
  """Attach the runaway guards to an ASE dynamics object (``plugin.ase.guard``).

  Every ``interval`` steps it checks the atoms and raises :class:`RunawayError` (one-line
  reason, ``last_good`` atoms) from ``dyn.run``. ``max_temperature`` None: the default rule for
  ``temperature`` (default: the dynamics' own target if it has one, else the atoms'
  temperature now); ``max_force`` None: off. The observer is moved to the front of
  ``dyn.observers``, so a trajectory writer attached earlier never writes the runaway frame.
  """
  if temperature is None:
    temperature = getattr(dyn, "temp", None)  # ASE keeps a thermostat's kT as `temp`
    temperature = (
      dyn.atoms.get_temperature() if temperature is None else float(temperature) / thermo.KB
    )
  t_max, f_max = guard_limits(
    max_temperature=max_temperature, max_force=max_force, temperature=temperature
  )
  g = Guard(dyn, t_max, f_max)
  dyn.attach(g, interval=interval)
  observers = getattr(dyn, "observers", None)
  if isinstance(observers, list) and observers and observers[-1][0] is g:
    observers.insert(0, observers.pop())
  return g
