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
  """The dtype rule: float32 or float64; ``None`` is JAX's default float (float64 only under
  ``jax_enable_x64``). float64 needs x64 on: library code never flips JAX flags."""
  import jax  # here, not at the top: the CLI's parser reads DEFAULTS without importing JAX

  if dtype is None:
    return np.dtype(np.float64 if jax.config.jax_enable_x64 else np.float32)
  dtype = np.dtype(dtype)
  if dtype not in (np.float32, np.float64):
    raise ValueError(f"dtype must be float32 or float64, got {dtype}")
  if dtype == np.float64 and not jax.config.jax_enable_x64:
    raise ValueError(
      "dtype float64 needs 64-bit JAX: call jax.config.update("
      "'jax_enable_x64', True) at start-up (the driver does not flip it for you)"
    )
  return dtype


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """The checked, completed options of one :func:`plugin.md.run` call (user units)."""

  ensemble: str
  temperature: float
  timestep: float
  steps: int
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


def _positive_int(name: str, value: Any) -> None:
  if value is not None and (
    isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
  ):
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _finite(name: str, value: Any, strict: bool) -> None:
  if not (np.isfinite(value) and (value > 0 if strict else value >= 0)):
    raise ValueError(f"{name} must be a finite number {'> 0' if strict else '>= 0'}, got {value!r}")


def run_options(
  *,
  ensembles,
  ensemble: str,
  temperature: float,
  timestep: float,
  steps: int,
  pressure: float,
  friction: float,
  tau_t: Optional[float],
  tau_p: Optional[float],
  init_temperature: Optional[float],
  chunk: int,
  log_interval: Optional[int],
  has_traj: bool,
  traj_interval: Optional[int],
  seed: int,
  dr_threshold: float,
  capacity_multiplier: float,
  dtype: Any,
  max_temperature: Optional[float] = None,
  max_force: Optional[float] = DEFAULTS.max_force,
) -> RunOptions:
  """Checks :func:`plugin.md.run`'s arguments (clear errors) and fills in the derived defaults.

  ``ensembles``: the table (:data:`plugin.md.ensembles.TABLE`).
  """
  if ensemble not in ensembles:
    raise ValueError(f"unknown ensemble {ensemble!r}; choose one of {', '.join(ensembles)}")
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
    raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
  for name, value in (
    ("chunk", chunk),
    ("log_interval", log_interval),
    ("traj_interval", traj_interval),
  ):
    _positive_int(name, value)
  _finite("timestep", timestep, strict=True)
  for name, value in (
    ("temperature", temperature),
    ("friction", friction),
    ("dr_threshold", dr_threshold),
  ):
    _finite(name, value, strict=False)
  if ensembles[ensemble].thermostat and temperature <= 0:
    raise ValueError(f"{ensemble} needs a temperature > 0 K, got {temperature}")
  if not np.isfinite(pressure):
    raise ValueError(f"pressure must be finite (bar), got {pressure}")
  if not (np.isfinite(capacity_multiplier) and capacity_multiplier > 0):
    raise ValueError(f"capacity_multiplier must be > 0, got {capacity_multiplier}")
  if init_temperature is not None and not (np.isfinite(init_temperature) and init_temperature >= 0):
    raise ValueError(f"init_temperature must be >= 0 K, got {init_temperature}")
  dtype = resolve_dtype(dtype)
  init_t = float(temperature if init_temperature is None else init_temperature)
  guard_limits(max_temperature=max_temperature, max_force=max_force, temperature=init_t)
  log_interval = int(log_interval or chunk)
  tau_t = DEFAULTS.tau_t_per_timestep * timestep if tau_t is None else float(tau_t)
  tau_p = DEFAULTS.tau_p_per_timestep * timestep if tau_p is None else float(tau_p)
  if tau_t <= 0 or tau_p <= 0:
    raise ValueError(f"tau_t and tau_p must be > 0 fs, got {tau_t}, {tau_p}")
  return RunOptions(
    ensemble=ensemble,
    temperature=float(temperature),
    timestep=float(timestep),
    steps=int(steps),
    pressure=float(pressure),
    friction=float(friction),
    tau_t=tau_t,
    tau_p=tau_p,
    init_temperature=init_t,
    chunk=int(chunk),
    log_interval=log_interval,
    traj_interval=int(traj_interval or log_interval) if has_traj else 0,
    seed=int(seed),
    dr_threshold=float(dr_threshold),
    capacity_multiplier=float(capacity_multiplier),
    dtype=dtype,
    max_temperature=max_temperature,
    max_force=max_force,
  )


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
