"""The ensembles table: adding an ensemble is adding one :class:`Ensemble` entry to ``TABLE``.

Each entry says how JAX-MD integrates it (``integrator``), what it conserves (``invariant``,
the log's ``conserved`` column), and, optionally, the ASE dynamics that run it in the ASE engine
and its short name on the ``eqattn md --ensemble`` command line. ``plugin.md.run``, the engines
and the CLI read everything from here.

* ``"nve"``: velocity Verlet (``simulate.nve``); conserves the total energy.
* ``"nvt_langevin"``: BAOAB Langevin (``simulate.nvt_langevin``), ``friction`` in 1/fs; ASE:
  ``Langevin``.
* ``"nvt_nose_hoover"``: Nose-Hoover chain (``simulate.nvt_nose_hoover``), ``tau_t`` in fs;
  conserves JAX-MD's extended Hamiltonian.
* ``"npt"``: isotropic Nose-Hoover NPT (``simulate.npt_nose_hoover``, the box scales
  uniformly), ``tau_t`` / ``tau_p`` in fs, periodic systems only (see :func:`npt_fractional_shift`
  and the engine's list rebuild under compression); ASE: ``NPTBerendsen``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from plugin import thermo
from plugin.md.settings import DEFAULTS


def _simulate():
  """``jax_md.simulate``, imported when an integrator is built: the table itself stays cheap to
  import (the CLI's parser reads it)."""
  from jax_md import simulate

  return simulate


@dataclasses.dataclass(frozen=True)
class Params:
  """An ensemble's parameters in JAX-MD's metal units (hashable: part of the engine key)."""

  dt: float  # time units
  kT: float  # eV
  gamma: float  # 1 / time unit
  tau_t: float  # time units
  tau_p: float
  pressure: float  # eV / Å^3

  @classmethod
  def from_user(
    cls,
    *,
    timestep: float,
    temperature: float,
    friction: float,
    tau_t: float,
    tau_p: float,
    pressure: float,
  ) -> "Params":
    """From fs, K, 1/fs, fs, fs, bar: the one conversion into JAX-MD's units."""
    return cls(
      dt=timestep * thermo.FS,
      kT=temperature * thermo.KB,
      gamma=friction / thermo.FS,
      tau_t=tau_t * thermo.FS,
      tau_p=tau_p * thermo.FS,
      pressure=pressure * thermo.BAR,
    )


def neighbor_kwargs(nbrs) -> dict:
  """``neighbor=nbrs`` for energy functions on a list; nothing for pair-list-free ones."""
  return {} if nbrs is None else {"neighbor": nbrs}


# ``integrator(params, energy_fn, shift_fn) -> (init_fn, apply_fn)`` with
# ``init_fn(key, R, box, mass, momenta, nbrs)``: one signature for all ensembles (fixed-box ones
# also pass keywords such as ``kT`` on to JAX-MD's init).
Integrator = Callable[[Params, Callable, Callable], Tuple[Callable, Callable]]


def _fixed_box(make: Callable) -> Integrator:
  """An integrator of JAX-MD's fixed-box kind: ``make(energy_fn, shift_fn, params) -> (init,
  apply)`` whose ``init(key, R, mass=, momenta=, **nbr)``."""

  def integrator(p: Params, energy_fn: Callable, shift_fn: Callable):
    init, apply = map(_inline, make(energy_fn, shift_fn, p))
    # **kwargs: e.g. a per-replica kT (plugin.md.replicas)
    init_fn = lambda key, R, box, mass, momenta, nbrs, **kwargs: init(
      key, R, mass=mass, momenta=momenta, **neighbor_kwargs(nbrs), **kwargs
    )
    return init_fn, apply

  return integrator


def _inline(fn: Callable) -> Callable:
  """JAX-MD's ``init``/``apply`` without the ``jax.jit`` it wraps them in: our compiled chunk
  inlines them anyway, and the energy tap (:func:`plugin.md.engine.energy_tap`) must see the
  force call in the step's own trace, not inside a nested one."""
  if isinstance(fn, functools.partial):
    return functools.partial(_inline(fn.func), *fn.args, **fn.keywords)
  return getattr(fn, "__wrapped__", fn)


def _nve(energy_fn: Callable, shift_fn: Callable, p: Params):
  init, apply = _simulate().nve(energy_fn, shift_fn, p.dt)
  return functools.partial(init, kT=p.kT), apply  # kT: unused once momenta are given


def _npt(p: Params, energy_fn: Callable, shift_fn: Callable):
  npt = functools.partial(
    _simulate().npt_nose_hoover,
    energy_fn,
    dt=p.dt,
    pressure=p.pressure,
    kT=p.kT,
    barostat_kwargs={"tau": p.tau_p},
    thermostat_kwargs={"tau": p.tau_t},
  )
  init, _ = npt(shift_fn=shift_fn)
  init_fn = lambda key, R, box, mass, momenta, nbrs: init(
    key, R, box, mass=mass, momenta=momenta, **neighbor_kwargs(nbrs)
  )

  def apply(state, **kwargs):
    # JAX-MD's shift_fn never sees the box before the step; build the step (cheap Python, at
    # trace time) around a shift that knows it.
    shift = npt_fractional_shift(shift_fn, _simulate().npt_box(state))
    return npt(shift_fn=shift)[1](state, **kwargs)

  return init_fn, apply


def npt_fractional_shift(shift_fn: Callable, box_old) -> Callable:
  """``shift_fn`` for ``simulate.npt_nose_hoover`` with fractional coordinates.

  JAX-MD's NPT position update (``exp_iL1``) calls ``shift_fn(R, R * (e^x - 1) + dt V ...,
  box=new_box)``: the first term is the affine scaling of *real* positions with the box. With
  fractional ``R`` it is a fractional number added as if it were Å, so atoms drift by
  ``inv(box) R (e^x - 1)`` per step (``u -> u (1 + ln(s) / L)`` over a run), a shift that grows
  from one side of the cell to the other (JAX-MD 0.2.29; atoms at rest in a shrinking box move
  in fractional coordinates). In fractional coordinates the box scaling is already carried by
  the box, so the correct update is ``u + inv(new_box) (dt V ...)``. ``box_old`` is the box
  before the step; ``e^x`` is the (isotropic) ratio of the two boxes, and the scaling term is
  taken out again here. With it JAX-MD's NPT conserved quantity is conserved (drift 1.5e-5 eV
  instead of 0.16 eV over 200 fs on 32 Cu atoms compressed by a third).
  """
  import jax.numpy as jnp

  def shift(R, dR, **kwargs):
    if "box" in kwargs:
      ratio = jnp.trace(kwargs["box"]) / jnp.trace(box_old)  # e^x: the box scales uniformly
      dR = dR - R * (ratio - 1.0)
    return shift_fn(R, dR, **kwargs)

  return shift


# ``invariant(state, epot, ekin, params) -> conserved`` (eV). JAX-MD's invariants re-evaluate the
# energy through energy_fn; they are handed the known one.
def _known(epot):
  return lambda *args, **kwargs: epot


# ``ase_dynamics(atoms, timestep_fs, temperature_K, seed) -> ase.md.MolecularDynamics``
def _ase_verlet(atoms, timestep, temperature, seed):
  from ase.md.verlet import VelocityVerlet

  return VelocityVerlet(atoms, timestep=timestep * thermo.FS)


def _ase_langevin(atoms, timestep, temperature, seed):
  from ase.constraints import FixCom
  from ase.md.langevin import Langevin

  # the centre of mass held by a constraint, as ASE now asks (its fixcm=True samples NVT only
  # approximately and is deprecated); the engine's own copy of the atoms carries it
  if not atoms.constraints:
    atoms.set_constraint(FixCom())
  return Langevin(
    atoms,
    timestep=timestep * thermo.FS,
    temperature_K=temperature,
    friction=DEFAULTS.friction / thermo.FS,
    fixcm=False,
    rng=np.random.default_rng(seed),
  )


def _ase_berendsen(atoms, timestep, temperature, seed):
  from ase.md.nptberendsen import NPTBerendsen

  return NPTBerendsen(
    atoms,
    timestep=timestep * thermo.FS,
    temperature_K=temperature,
    pressure_au=DEFAULTS.pressure * thermo.BAR,
    taut=DEFAULTS.berendsen_tau_t * thermo.FS,
    taup=DEFAULTS.berendsen_tau_p * thermo.FS,
    compressibility_au=DEFAULTS.berendsen_compressibility / thermo.BAR,
  )


@dataclasses.dataclass(frozen=True)
class Ensemble:
  """One row of the table.

  Attributes:
    name: the ``ensemble=`` value of :func:`plugin.md.run`.
    integrator: see :data:`Integrator`.
    invariant: ``(state, epot, ekin, params) -> conserved`` or None (nothing conserved).
    thermostat: needs a temperature > 0.
    variable_box: the box is part of the state (NPT): periodic systems only; the engine reads
      the box from the state and rebuilds the list under compression.
    cli_name: the name on ``eqattn md --ensemble`` (None: not offered there).
    ase_dynamics: ``(atoms, timestep_fs, temperature_K, seed) -> ASE dynamics`` for the ASE
      engine, or None.
  """

  name: str
  integrator: Integrator
  invariant: Optional[Callable] = None
  thermostat: bool = True
  variable_box: bool = False
  cli_name: Optional[str] = None
  ase_dynamics: Optional[Callable] = None


TABLE: Dict[str, Ensemble] = {
  e.name: e
  for e in (
    Ensemble(
      "nve",
      _fixed_box(_nve),
      invariant=lambda state, epot, ekin, p: epot + ekin,
      thermostat=False,
      cli_name="nve",
      ase_dynamics=_ase_verlet,
    ),
    Ensemble(
      "nvt_langevin",
      _fixed_box(lambda e, s, p: _simulate().nvt_langevin(e, s, p.dt, p.kT, gamma=p.gamma)),
      cli_name="nvt",
      ase_dynamics=_ase_langevin,
    ),
    Ensemble(
      "nvt_nose_hoover",
      _fixed_box(lambda e, s, p: _simulate().nvt_nose_hoover(e, s, p.dt, p.kT, tau=p.tau_t)),
      invariant=lambda state, epot, ekin, p: _simulate().nvt_nose_hoover_invariant(
        _known(epot), state, p.kT
      ),
    ),
    Ensemble(
      "npt",
      _npt,
      invariant=lambda state, epot, ekin, p: _simulate().npt_nose_hoover_invariant(
        _known(epot), state, p.pressure, p.kT
      ),
      variable_box=True,
      cli_name="npt",
      ase_dynamics=_ase_berendsen,
    ),
  )
}

ENSEMBLES = tuple(TABLE)
CLI_NAMES = {e.cli_name: e.name for e in TABLE.values() if e.cli_name}
