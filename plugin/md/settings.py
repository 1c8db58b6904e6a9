"""The dtype rule and the checked options of one run; the defaults live in
:mod:`plugin.defaults` (re-exported here and as ``plugin.md.DEFAULTS``).

User-facing units: Å, eV, amu, fs, K, bar (conversions: :mod:`plugin.thermo`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from plugin.defaults import DEFAULTS, Defaults  # noqa: F401  (the one home; re-exported)


def resolve_dtype(dtype: Any = None) -> np.dtype:
  """:func:`plugin.host.resolve_dtype`, the one dtype rule (imported here on use: the CLI's
  parser reads DEFAULTS without importing JAX)."""
  from plugin import host

  return host.resolve_dtype(dtype)


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """The checked, completed options of one :func:`plugin.md.run` call (user units)."""

  ensemble: str
  temperature: float
  timestep: float
  total_steps: int
  pressure: float
  friction: float
  tau_t: float
  tau_p: float
  init_temperature: float
  chunk: int
  log_interval: int
  traj_interval: int  # 0: no trajectory
  seed: int
  dr_threshold: float
  capacity_multiplier: float
  dtype: np.dtype
  max_temperature: Optional[float]  # K as given (None: the default rule, see guard_limits)
  max_force: Optional[float]  # eV/Å as given (None: off)


def guard_limits(
  *, max_temperature: Optional[float], max_force: Optional[float], temperature: float
):
  """``(max_temperature K, max_force eV/Å)`` checked, ``inf`` where off; ``max_temperature``
  None is the default rule (``DEFAULTS``) for a run whose reference temperature is
  ``temperature`` (the thermostat target, or the start temperature in NVE)."""
  if max_temperature is None:
    max_temperature = max(
      DEFAULTS.max_temperature_factor * float(temperature), DEFAULTS.max_temperature_floor
    )
  max_force = np.inf if max_force is None else max_force
  for name, value, unit in (
    ("max_temperature", max_temperature, "K"),
    ("max_force", max_force, "eV/Å"),
  ):
    if isinstance(value, bool) or not (float(value) > 0):
      raise ValueError(f"{name} must be > 0 {unit} (inf: off), got {value!r}")
  return float(max_temperature), float(max_force)
