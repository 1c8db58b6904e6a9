"""Units, kinetic energy, temperature and Maxwell-Boltzmann momenta: the one home of each.

Units
-----
eV, Å, amu; the time unit is ``Å sqrt(amu / eV)`` = 10.1805 fs, which is both ASE's internal
time unit and JAX-MD's metal time unit, so momenta (``amu Å / time unit``) pass between ASE and
JAX-MD unchanged. The three conversions are ASE's (``ase.units``, CODATA 2014, the constants
JAX-MD's ``units.metal_unit_system`` uses too, but in float64):

* ``FS``: 1 fs in time units (``dt = timestep_fs * FS``; a friction in 1/fs is ``gamma / FS``);
* ``KB``: Boltzmann's constant in eV/K (``kT = KB * T``);
* ``BAR``: 1 bar in eV/Å^3.

Temperature: one degrees-of-freedom rule
----------------------------------------
Every temperature eqattn reports is ``T = 2 E_kin / (n_dof k_B)`` with ``n_dof = 3 N``
(:func:`degrees_of_freedom`): all Cartesian momenta count, whether or not the total momentum
(or a free molecule's angular momentum) happens to be conserved. It is ASE's
``Atoms.get_temperature`` (without constraints) and JAX-MD's ``quantity.temperature``, and the
number that ASE's and JAX-MD's thermostats drive to their target, so a thermostatted run reports
its target whichever engine runs it. For a system with zero total momentum, equipartition puts
``(3N - 3) / 2 k_B T`` into the momenta, so the reported value is ``(3N - 3) / 3N`` of that
equilibrium ``T`` (3 % lower for 32 atoms, 0.3 % for 300).

Start momenta
-------------
:func:`maxwell_boltzmann` draws from the Maxwell-Boltzmann distribution, removes the
centre-of-mass velocity (and, given ``positions``, the rigid rotation of a free molecule) and
rescales to exactly the requested temperature under the rule above.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from ase import units

__all__ = [
  "FS",
  "KB",
  "BAR",
  "degrees_of_freedom",
  "kinetic_energy",
  "temperature",
  "temperature_from_kinetic",
  "maxwell_boltzmann",
]

FS = float(units.fs)  # 1 fs in Å sqrt(amu / eV)
KB = float(units.kB)  # eV / K
BAR = float(units.bar)  # eV / Å^3


def degrees_of_freedom(num_atoms):
  """``3 N``: the one degrees-of-freedom rule of every reported temperature (module docstring);
  ``num_atoms`` an int or an array (per replica, traced)."""
  return 3 * num_atoms


def kinetic_energy(momenta: np.ndarray, masses: np.ndarray) -> float:
  """``sum p^2 / 2m`` (eV) of momenta ``(N, 3)`` (amu Å / time unit) and masses ``(N,)`` amu."""
  p = np.asarray(momenta, np.float64)
  return float(0.5 * np.sum(p * p / np.asarray(masses, np.float64).reshape(-1, 1)))


def temperature_from_kinetic(ekin, num_atoms):
  """``2 E_kin / (3 N k_B)`` in K; ``ekin`` (eV) may be a number or an array."""
  return 2.0 * ekin / (degrees_of_freedom(num_atoms) * KB)


def temperature(momenta: np.ndarray, masses: np.ndarray) -> float:
  """Temperature (K) of momenta ``(N, 3)`` and masses ``(N,)``, 3N degrees of freedom."""
  return temperature_from_kinetic(kinetic_energy(momenta, masses), len(np.ravel(masses)))


def _remove_rotation(p: np.ndarray, m: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """``p`` without the rigid rotation ``omega x (r - r_com)`` that carries its angular momentum."""
  x = np.asarray(positions, np.float64)
  x = x - (m[:, None] * x).sum(axis=0) / m.sum()
  angular = np.cross(x, p).sum(axis=0)
  inertia = (m * (x * x).sum(axis=1)).sum() * np.eye(3) - np.einsum("i,ij,ik->jk", m, x, x)
  # lstsq: a linear molecule has no inertia about its axis (and no angular momentum there).
  omega = np.linalg.lstsq(inertia, angular, rcond=1e-10)[0]
  return p - m[:, None] * np.cross(omega, x)


def maxwell_boltzmann(
  masses: np.ndarray, temperature_k: float, seed: int, positions: Optional[np.ndarray] = None
) -> np.ndarray:
  """Momenta ``(N, 3)`` (amu Å / time unit) drawn at ``temperature_k`` from ``seed``.

  The centre-of-mass velocity is removed, and with ``positions`` (open boundaries) the rigid
  rotation too (N > 1). The result is rescaled to exactly ``temperature_k`` by
  :func:`temperature` (3N degrees of freedom).
  """
  m = np.asarray(masses, np.float64).ravel()
  rng = np.random.default_rng(seed)
  p = np.sqrt(m * KB * temperature_k)[:, None] * rng.standard_normal((len(m), 3))
  if len(m) > 1:
    p -= m[:, None] * (p.sum(axis=0) / m.sum())  # zero centre-of-mass velocity
  if positions is not None and len(m) > 1:
    p = _remove_rotation(p, m, positions)
  t = temperature(p, m)
  return p * math.sqrt(temperature_k / t) if t > 0 else p
