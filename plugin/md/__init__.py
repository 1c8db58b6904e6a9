"""A jitted molecular-dynamics driver: ASE ``Atoms`` in, trajectory and log out, JAX-MD inside.

::

    import plugin.md
    result = plugin.md.run(atoms, potential, ensemble="nvt_langevin", temperature=300.0,
                           timestep=1.0, total_steps=10_000, traj="md.traj", log_file="md.csv")
    result.atoms            # final structure (positions, momenta, cell, energy, forces)
    result.log.temperature  # (num_rows,) K
    # after an interruption, the same call with resume=True continues from the last frame:
    plugin.md.run(atoms, potential, ..., total_steps=10_000, traj="md.traj", resume=True)

The package, in the order :func:`run` composes it (jax-md style: small functions returning
closures, ``(init_fn, apply_fn)`` integrators):

* :mod:`~plugin.md.settings`: every default (``DEFAULTS``), the dtype rule, checked options;
* :mod:`~plugin.md.ensembles`: the ensembles table (``nve``, ``nvt_langevin``,
  ``nvt_nose_hoover``, ``npt``): adding an ensemble is one entry there;
* :mod:`~plugin.md.system`: ``ase.Atoms`` <-> the engine's frame (fractional coordinates in
  periodic cells, rotated into ASE's standard form; free space for molecules) and the
  integrator's variables <-> ``atoms.info["md_state"]``;
* :mod:`~plugin.md.engine`: one step, observables, one compiled chunk, neighbour-list
  overflow replay (the trajectory is the same as one that never overflowed);
* :mod:`~plugin.md.replicas`: many systems in one program (``run`` on a list of ``Atoms``): the
  engine mapped over a padded replica axis, per-replica pair lists, sharding over devices;
* :mod:`~plugin.md.output`: the log schema (``COLUMNS``), CSV, trajectories, progress;
* :mod:`~plugin.md.ase_engine`: the same ensembles with ASE's integrators and any ASE
  calculator (``eqattn md --engine ase``, :mod:`plugin.testing`).

Units, temperature (3N degrees of freedom) and the Maxwell-Boltzmann start: :mod:`plugin.thermo`.
User-facing: Å, eV, amu, fs, K, bar; inside, JAX-MD's metal units (time unit
``Å sqrt(amu / eV)``, ASE's too, so momenta need no conversion).

Trajectories (``traj``): the format by extension (``plugin.md.FORMATS``): ``.traj`` (ASE),
``.xyz``/``.extxyz``, ``.h5``/``.h5md`` (H5MD 1.1, needs h5py: ``pip install 'eqattn[h5]'``).
A frame every ``traj_interval`` steps and at the last step, each flushed before the next, so an
interrupted run (Ctrl-C, SIGTERM, ``kill -9``) keeps every complete frame; a frame cut short is
never read back (:func:`read_trajectory`, any format) and is dropped before a resume appends.
Each frame has positions, momenta, cell, energy, forces and (periodic) stress, and
``atoms.info`` holds ``md_step``, ``md_time_fs``, ``md_ensemble`` and ``md_state`` (the
integrator's variables), so that ``resume=True`` continues exactly where the run stopped, from
any format. ``steps`` is the step number at which a run ends, counted from the first run.

Guards (:mod:`~plugin.md.guards`), checked at every step inside the compiled loop: a run whose
positions, momenta, forces or energy become non-finite, whose temperature exceeds
``max_temperature`` (default ``max(10 x target, 5000 K)``) or whose largest force exceeds
``max_force`` (default off) stops at the last good step, writes it as the last frame and
returns with ``MDResult.stopped`` / ``reason`` set (and a ``RuntimeWarning``). ASE dynamics get
the same as an observer, ``plugin.ase.guard(dyn)``.

Initial velocities: the ``Atoms``' momenta if any is non-zero, else Maxwell-Boltzmann at
``init_temperature`` (default ``temperature``) from ``seed``, without centre-of-mass motion
(and, for open boundaries, without rigid rotation), rescaled to exactly that temperature.

dtype: float32 by default (MD speed); float64 needs ``jax.config.update("jax_enable_x64", True)``
first (the driver never flips JAX flags). JAX-MD's velocity Verlet rounds ``dt`` to float32 even
in float64 runs (relative 6e-8).
"""

import importlib

# name -> module that defines it. Imported on first use (PEP 562), so that reading the table or
# the defaults (the CLI's parser) does not import JAX and JAX-MD.
_EXPORTS = {
  "run": "plugin.md.driver",
  "MDOptions": "plugin.md.options",
  "MDResult": "plugin.md.driver",
  "temperature_of": "plugin.md.driver",
  "ENSEMBLES": "plugin.md.ensembles",
  "ENSEMBLE_TABLE": "plugin.md.ensembles",
  "CLI_ENSEMBLES": "plugin.md.ensembles",
  "Ensemble": "plugin.md.ensembles",
  "COLUMNS": "plugin.md.output",
  "MDLog": "plugin.md.output",
  "Progress": "plugin.md.output",
  "ProgressBar": "plugin.md.output",
  "read_trajectory": "plugin.md.output",
  "FORMATS": "plugin.md.output",
  "guard": "plugin.md.guards",
  "RunawayError": "plugin.md.guards",
  "run_ase": "plugin.md.ase_engine",
  "ASEResult": "plugin.md.ase_engine",
  "DEFAULTS": "plugin.md.settings",
  "Defaults": "plugin.md.settings",
  "FS": "plugin.thermo",
  "KB": "plugin.thermo",
  "BAR": "plugin.thermo",
  "kinetic_energy": "plugin.thermo",
  "temperature": "plugin.thermo",
  "maxwell_boltzmann": "plugin.thermo",
}
_ALIASES = {"ENSEMBLE_TABLE": "TABLE", "CLI_ENSEMBLES": "CLI_NAMES"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'plugin.md' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), _ALIASES.get(name, name))
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
