"""The one home of eqattn's simulation defaults: the MD engines (``plugin.md``), the JAX-MD
adapter's neighbour lists (``plugin.jax_md``), ``plugin.testing`` and the ``eqattn`` command.

Imports nothing heavy: the CLI's parser reads these without importing JAX. Public as
``plugin.md.DEFAULTS``. User-facing units: Å, eV, amu, fs, K, bar.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Defaults:
  """The one home of the MD defaults (``plugin.md.run``, the ASE engine, ``plugin.testing``,
  the ``eqattn`` command)."""

  ensemble: str = "nve"  # plugin.md.run: the dynamics as given, nothing added
  # the eqattn command starts from structures at rest: a thermostat brings them to temperature
  command_ensemble: str = "nvt"  # a name of plugin.md.CLI_ENSEMBLES
  temperature: float = 300.0  # K
  timestep: float = 0.5  # fs
  steps: int = 1000
  duration: float = 2.0  # ps: the eqattn command's runs and plugin.testing's conservation runs
  pressure: float = 1.01325  # bar (1 atm)
  friction: float = 0.01  # 1/fs, Langevin (both engines)
  tau_t_per_timestep: float = 100.0  # Nose-Hoover thermostat time / timestep (JAX-MD's)
  tau_p_per_timestep: float = 1000.0  # barostat time / timestep (JAX-MD's)
  chunk: int = 100  # steps per compiled call
  seed: int = 0
  dr_threshold: float = 0.5  # Å, neighbour-list skin
  capacity_multiplier: float = 1.25  # initial neighbour-list headroom (JAX-MD's)
  capacity_growth: float = 1.5  # per overflow: geometric, so a run reallocates O(log) times
  max_replays: int = 10  # reallocations of one chunk before giving up
  # many systems on one CPU (plugin.md.replicas): the model runs on groups of replicas with
  # about this many atoms together, one group after the other (vmapped within a group).
  # Measured (benchmarks/replicas.py): 108-atom Cu replicas vmapped 4 or 16 at once cost
  # 1.14-1.18x their runs alone, one at a time 1.03x; 9-atom ethanol vmapped 8 at once 0.67x.
  # Accelerators and sharded runs map all replicas at once.
  replica_group_atoms: int = 64
  # compiled functions kept per process (plugin.registry: evaluators, MD and batch engines,
  # LAMMPS stages), least recently used evicted beyond it
  compiled_functions: int = 32
  # MD and host evaluators (ASE calculator, LAMMPS): speed; float64 needs jax_enable_x64
  dtype: Any = np.float32
  # Å: host evaluators refuse two atoms closer than this (the model is not meant for overlaps)
  min_distance: float = 0.1
  # the ASE engine's Berendsen NPT (``eqattn md --engine ase --ensemble npt``)
  berendsen_tau_t: float = 100.0  # fs
  berendsen_tau_p: float = 1000.0  # fs
  berendsen_compressibility: float = 1e-6  # 1/bar
  # guards against runaway MD (plugin.md.guards): the run stops, with its last good frame,
  # above max(factor x reference temperature, floor) K (reference: the thermostat target, or
  # the start temperature in NVE), or (when set) above max_force eV/Å on any atom
  max_temperature_factor: float = 10.0
  max_temperature_floor: float = 5000.0  # K
  max_force: Optional[float] = None  # eV/Å; None: off (non-finite forces always stop a run)


DEFAULTS = Defaults()
