"""A jitted molecular-dynamics driver: ASE ``Atoms`` in, trajectory and log out, JAX-MD inside.

::

    import plugin.md
    result = plugin.md.run(atoms, potential, ensemble="nvt_langevin", temperature=300.0,
                           timestep=1.0, steps=10_000, traj="md.traj", log_file="md.csv")
    result.atoms            # final structure (positions, momenta, cell, energy, forces)
    result.log.temperature  # (num_rows,) K
    # after an interruption, the same call with resume=True continues from the last frame:
    plugin.md.run(atoms, potential, ..., steps=10_000, traj="md.traj", resume=True)

How it runs
-----------
Steps run on the device in chunks of ``chunk`` steps: one jitted call per chunk, a
``lax.fori_loop`` whose body updates JAX-MD's neighbour list (``nbrs.update``, as in JAX-MD's
examples: update, then integrate) and takes one integrator step. Log rows and trajectory
frames are recorded inside the loop into fixed-size buffers (``lax.cond``, so the energy is
evaluated only at the recorded steps) and copied to the host once per chunk.

After each chunk the host reads JAX-MD's error bits. If the neighbour (or cell) list overflowed
at any step of the chunk, the steps after it were computed with a truncated list, so the chunk
is thrown away: the list is allocated again from the chunk's *start* positions with more room
(geometric growth), and the chunk is replayed from its saved start state (positions, momenta,
thermostat variables and random key), so no step is lost or mis-computed and a replayed run
is the same trajectory as one that never overflowed. The chunk function is compiled once per
neighbour-list capacity: ``MDResult.num_compilations`` counts its traces.

Ensembles (JAX-MD's integrators)
--------------------------------
* ``"nve"``: velocity Verlet (``simulate.nve``).
* ``"nvt_langevin"``: BAOAB Langevin (``simulate.nvt_langevin``), ``friction`` in 1/fs.
* ``"nvt_nose_hoover"``: Nose-Hoover chain (``simulate.nvt_nose_hoover``), ``tau_t`` in fs.
* ``"npt"``: isotropic Nose-Hoover NPT (``simulate.npt_nose_hoover``, the box scales
  uniformly), ``tau_t`` / ``tau_p`` in fs, periodic systems only. JAX-MD rebuilds a list only
  when an atom moved ``dr_threshold / 2``; a shrinking box also brings pairs closer, so the
  driver additionally forces a rebuild when ``2 * max displacement + (1 - s) * (cutoff +
  dr_threshold) > dr_threshold`` (``s``: linear box scale relative to the last rebuild), which
  keeps the list exact under compression. JAX-MD 0.2.29's NPT step also moves atoms in
  fractional coordinates when the box changes (it adds the real-space scaling term to
  fractional positions); the driver takes that term out again (``_npt_fractional_shift``),
  which makes JAX-MD's NPT conserved quantity conserved (drift 1.5e-5 eV instead of 0.16 eV
  over 200 fs on 32 Cu atoms compressed by a third).

The log's ``conserved`` column is what the integrator conserves (NVE: total energy; Nose-Hoover
NVT and NPT: JAX-MD's extended Hamiltonians), the number to watch for a too-large timestep.

Periodic systems use ``space.periodic_general`` with fractional coordinates (orthorhombic and
triclinic cells, of any size: boxes narrower than ``2 * (cutoff + dr_threshold)`` get
``plugin.jax_md``'s neighbour list with periodic images, chosen at allocation; an NPT box that
shrinks below that width mid-run is reallocated for the compressed box and replayed like an
overflow); ASE cells that are not lower triangular are rotated into ASE's standard form
inside and rotated back on output. Non-periodic systems (molecules, clusters) use
``space.free()``. Mixed periodicity (slabs) is refused: JAX-MD's spaces are periodic along all
axes or none.

Units
-----
User-facing: Å, eV, amu, fs, K, bar. Inside: JAX-MD's metal units (``units.metal_unit_system``):
Å, eV, amu, and the time unit ``Å sqrt(amu / eV)`` = 10.1805 fs (ASE's internal time unit too, so
ASE momenta ``amu Å / t`` need no conversion). Conversions, made once here in float64 from
JAX-MD's CODATA-2014 constants (``metal_unit_system`` itself rounds them to float32 unless x64
is on):

* time: ``dt_internal = timestep_fs * FS`` with ``FS = 1e-15 s / sqrt(amu Å^2 / eV)`` = 0.0982269;
* temperature: ``kT = KB * T`` with ``KB = k_B / e`` = 8.617330e-5 eV/K;
* pressure: ``p_internal = p_bar * BAR`` with ``BAR = 1e5 Pa * 1e-30 m^3 / e`` = 6.241509e-7
  eV/Å^3;
* friction: ``gamma_internal = friction_per_fs / FS``; Nose-Hoover times ``tau * FS``.

Temperature is ``2 E_kin / (3 N k_B)`` (3N degrees of freedom, as ASE's
``Atoms.get_temperature`` and JAX-MD's ``quantity.temperature``). Pressure (periodic systems) is
``(2 E_kin - dU/d eps) / (3 V)`` with ``eps`` a uniform strain (JAX-MD's ``quantity.pressure``),
reported in bar.

Trajectories
------------
Frames go to ``traj`` (``.traj``: ASE's binary format, float64; ``.xyz`` / ``.extxyz``: extended
XYZ) every ``traj_interval`` steps and at the last step, appended after each chunk and closed
again, so an interrupted run keeps every frame written before it. Each frame has positions,
momenta, cell, energy and forces, and ``atoms.info`` holds ``md_step``, ``md_time_fs``,
``md_ensemble`` and (``.traj`` only) ``md_state``: the integrator's extra variables (thermostat
chains, barostat, random key) so that ``resume=True`` continues the run exactly where it stopped.
``steps`` is the step number at which a run ends, counted from the first run: a resumed run
runs ``steps - md_step`` more steps.

Initial velocities: the ``Atoms``' momenta if any is non-zero, else Maxwell-Boltzmann at
``init_temperature`` (default ``temperature``) from ``seed``, with zero total momentum and
rescaled to exactly that temperature (as ASE's ``MaxwellBoltzmannDistribution(force_temp=True)``).

dtype: float32 by default (MD speed); float64 needs ``jax.config.update("jax_enable_x64", True)``
first (the driver never flips JAX flags). Note that JAX-MD's velocity Verlet rounds ``dt`` to
float32 even in float64 runs (relative 6e-8).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import ase
import ase.io
import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from jax import lax
from jax_md import dataclasses as jmd_dataclasses
from jax_md import partition, quantity, simulate, space
from jax_md import units as jmd_units

import potentials
import plugin.jax_md as pjm

__all__ = ["run", "MDResult", "MDLog", "Progress", "ENSEMBLES", "FS", "KB", "BAR",
           "kinetic_energy", "temperature"]

Array = jax.Array
PathLike = Union[str, os.PathLike]

ENSEMBLES = ("nve", "nvt_langevin", "nvt_nose_hoover", "npt")


# --------------------------------------------------------------------------------------------
# units


def _metal_conversions() -> Tuple[float, float, float]:
  """``(FS, KB, BAR)``: 1 fs in JAX-MD metal time units, k_B in eV/K, 1 bar in eV/Å^3.

  The same formulas as ``jax_md.units.metal_unit_system`` (CODATA 2014), in float64.
  """
  c = jmd_units.constants_CONDATA_2014
  second = math.sqrt(c["_e"] / (c["_amu"] * 1e-20))  # metal time units per second
  return second * 1e-15, c["_k"] / c["_e"], 1e5 * 1e-30 / c["_e"]


FS, KB, BAR = _metal_conversions()


def kinetic_energy(momenta: np.ndarray, masses: np.ndarray) -> float:
  """``sum p^2 / 2m`` (eV) of momenta ``(N, 3)`` (amu Å / metal time) and masses ``(N,)`` amu."""
  p = np.asarray(momenta, np.float64)
  return float(0.5 * np.sum(p * p / np.asarray(masses, np.float64)[:, None]))


def temperature(momenta: np.ndarray, masses: np.ndarray) -> float:
  """``2 E_kin / (3 N k_B)`` in K (3N degrees of freedom, as ASE and JAX-MD)."""
  return 2.0 * kinetic_energy(momenta, masses) / (3 * len(masses) * KB)


def maxwell_boltzmann(masses: np.ndarray, temperature_k: float, seed: int) -> np.ndarray:
  """Momenta ``(N, 3)`` from the Maxwell-Boltzmann distribution at ``temperature_k``, with zero
  total momentum (N > 1) and rescaled to exactly that temperature."""
  m = np.asarray(masses, np.float64)[:, None]
  rng = np.random.default_rng(seed)
  p = np.sqrt(m * KB * temperature_k) * rng.standard_normal((len(m), 3))
  if len(m) > 1:
    p -= p.mean(axis=0)  # zero total momentum
  t = temperature(p, m[:, 0])
  return p * math.sqrt(temperature_k / t) if t > 0 else p


# --------------------------------------------------------------------------------------------
# public result types


@dataclasses.dataclass
class MDLog:
  """Per-row observables (one row per ``log_interval`` steps, plus the first and last step).

  Attributes (all ``(rows,)`` NumPy arrays): ``step``, ``time_ps``, ``epot``, ``ekin``,
  ``etot`` (eV), ``temperature`` (K); ``conserved`` (eV): what the integrator conserves (NVE:
  ``etot``; Nose-Hoover NVT / NPT: the extended Hamiltonian; None for Langevin), the number
  to watch for integration errors; for periodic systems ``pressure`` (bar) and ``volume``
  (Å^3), else None.
  """
  step: np.ndarray
  time_ps: np.ndarray
  epot: np.ndarray
  ekin: np.ndarray
  etot: np.ndarray
  temperature: np.ndarray
  conserved: Optional[np.ndarray] = None
  pressure: Optional[np.ndarray] = None
  volume: Optional[np.ndarray] = None

  def __len__(self) -> int:
    return len(self.step)

  def as_dict(self) -> Dict[str, np.ndarray]:
    """Columns by CSV name (units in the names); the optional ones only where they exist."""
    d = {"step": self.step, "time_ps": self.time_ps, "epot_eV": self.epot, "ekin_eV": self.ekin,
         "etot_eV": self.etot, "temperature_K": self.temperature}
    if self.conserved is not None:
      d["conserved_eV"] = self.conserved
    if self.pressure is not None:
      d.update(pressure_bar=self.pressure, volume_A3=self.volume)
    return d

  def to_csv(self, path: PathLike) -> None:
    """Write the log as CSV (overwrites ``path``)."""
    d = self.as_dict()
    with open(path, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(list(d))
      w.writerows(zip(*[c.tolist() for c in d.values()]))


@dataclasses.dataclass(frozen=True)
class Progress:
  """What a ``progress`` callback gets after each chunk (latest logged values)."""
  step: int
  total_steps: int
  time_ps: float
  temperature: float  # K, of the state at ``step``
  epot: float  # eV, of the latest log row
  ekin: float
  etot: float
  steps_per_s: float  # of this chunk (includes compilation on the first chunk)


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


# --------------------------------------------------------------------------------------------
# the system: ASE Atoms <-> JAX-MD arrays


@dataclasses.dataclass(frozen=True)
class _System:
  """An ``Atoms`` in the driver's frame. Periodic: ``R`` fractional, ``box`` = lattice vectors
  as columns (upper triangular), ``Q`` rotates ASE's frame into it (``x_internal = x @ Q.T``).
  Free: ``R`` Cartesian, shifted by ``origin`` into the cell-list region ``box``."""
  numbers: np.ndarray  # (N,)
  masses: np.ndarray  # (N,) amu
  periodic: bool
  pbc: np.ndarray  # (3,) bool, as given
  R: np.ndarray  # (N, 3)
  momenta: Optional[np.ndarray]  # (N, 3), internal frame, or None when not set
  box: np.ndarray  # (3, 3)
  Q: np.ndarray  # (3, 3)
  origin: np.ndarray  # (3,)
  cell_in: np.ndarray  # (3, 3) the input cell (kept for non-periodic output)


def _system(atoms: ase.Atoms, cutoff: float, skin: float,
            reference: Optional[_System] = None) -> _System:
  """Checks ``atoms`` and converts it to the driver's frame.

  ``reference`` (resume): keep its free-space origin and box, so a resumed run uses the same
  frame as the run it continues.
  """
  if not isinstance(atoms, ase.Atoms):
    raise TypeError(f"atoms must be an ase.Atoms, got {type(atoms).__name__}")
  n = len(atoms)
  if n == 0:
    raise ValueError("atoms is empty: nothing to simulate")
  if atoms.constraints:
    raise ValueError(f"atoms has ASE constraints ({atoms.constraints}); JAX-MD's integrators "
                     f"cannot apply them. Remove them (del atoms.constraints), or run ASE's "
                     f"integrators with the eqattn ASE calculator.")
  pbc = np.asarray(atoms.pbc, bool)
  if pbc.any() and not pbc.all():
    raise ValueError(f"pbc={pbc.tolist()}: JAX-MD's spaces are periodic along all axes or none. "
                     f"For a slab, make it fully periodic with enough vacuum along the "
                     f"non-periodic axis (atoms.pbc = True; atoms.center(vacuum=..., axis=2)).")
  pos = atoms.get_positions()
  if not np.all(np.isfinite(pos)):
    i = int(np.argmax(~np.isfinite(pos).all(axis=1)))
    raise ValueError(f"positions of atom {i} are not finite: {pos[i]}")
  masses = atoms.get_masses().astype(np.float64)
  if np.any(masses <= 0):
    raise ValueError(f"all masses must be positive (amu); got {masses.min()}")
  p = atoms.get_momenta() if atoms.has("momenta") else None
  if p is not None and not np.any(p):
    p = None  # all zero: treated as "not set" (Maxwell-Boltzmann)
  if p is not None and not np.all(np.isfinite(p)):
    raise ValueError("atoms has non-finite momenta")
  cell_in = atoms.cell.array.copy()
  if pbc.all():
    if abs(atoms.cell.volume) < 1e-9:
      raise ValueError(f"periodic atoms need a cell with non-zero volume, got\n{cell_in}")
    rcell, Q = atoms.cell.standard_form()
    if np.allclose(rcell.array, cell_in, rtol=0, atol=1e-12):
      rcell, Q = cell_in, np.eye(3)  # already lower triangular: no rotation at all
    else:
      rcell = rcell.array
    R = atoms.cell.scaled_positions(pos) % 1.0
    R = np.where(R >= 1.0, 0.0, R)  # % can round up to exactly 1.0
    return _System(atoms.numbers.copy(), masses, True, pbc, R,
                   None if p is None else p @ Q.T, np.asarray(rcell).T.copy(), Q,
                   np.zeros(3), cell_in)
  if reference is not None:
    origin, box = reference.origin, reference.box
  else:
    # JAX-MD's cell list bins positions in [0, box); atoms that leave it later are still
    # binned correctly (cell indices wrap), so this only needs to fit the start.
    margin = cutoff + skin
    origin = pos.min(axis=0) - margin
    box = np.diag(np.maximum(pos.max(axis=0) - origin + margin, 1.0))
  return _System(atoms.numbers.copy(), masses, False, pbc, pos - origin, p, box, np.eye(3),
                 origin, cell_in)


def _to_atoms(system: _System, R: np.ndarray, momenta: np.ndarray, forces: np.ndarray,
              energy: float, box: np.ndarray, info: Dict[str, Any]) -> ase.Atoms:
  """Driver-frame arrays back to ASE ``Atoms`` (ASE's frame, Cartesian, float64)."""
  R, momenta, forces = (np.asarray(a, np.float64) for a in (R, momenta, forces))
  if system.periodic:
    cell = np.asarray(box, np.float64).T @ system.Q
    positions = R @ cell
    momenta, forces = momenta @ system.Q, forces @ system.Q
  else:
    cell = system.cell_in
    positions = R + system.origin
  atoms = ase.Atoms(numbers=system.numbers, positions=positions, cell=cell, pbc=system.pbc,
                    masses=system.masses, momenta=momenta, info=dict(info))
  atoms.calc = SinglePointCalculator(atoms, energy=float(energy), forces=forces)
  return atoms


# --------------------------------------------------------------------------------------------
# the engine: JAX-MD functions, one step, observables, one chunk


@dataclasses.dataclass(frozen=True)
class _Settings:
  """Everything the compiled functions close over (hashable: engines are cached by it)."""
  ensemble: str
  numbers: Tuple[int, ...]
  periodic: bool
  box: Tuple[float, ...]  # 9 floats, row-major
  dt: float  # metal time units
  kT: float  # eV
  gamma: float  # 1 / metal time unit
  tau_t: float  # metal time units
  tau_p: float
  pressure: float  # eV / Å^3
  dr_threshold: float
  capacity_multiplier: float
  chunk: int
  log_interval: int
  traj_interval: int  # 0: no frames recorded


@dataclasses.dataclass
class _Engine:
  settings: _Settings
  neighbor_fn: partition.NeighborListFns
  energy_fn: Callable
  init_fn: Callable  # (key, R, box, mass, momenta, nbrs) -> state
  observe_fn: Callable  # jitted (state, nbrs) -> dict of scalars
  chunk_fn: Callable  # jitted, see _chunk_fn
  box_fn: Callable  # state -> (3, 3) box
  traces: List[int]  # [number of chunk_fn traces]


def _integrator(settings: _Settings, energy_fn: Callable, shift_fn: Callable,
                ) -> Tuple[Callable, Callable]:
  """JAX-MD ``(init_fn, apply_fn)``; ``init_fn(key, R, box, mass, momenta, nbrs)`` for all."""
  s = settings
  if s.ensemble == "nve":
    init, apply = simulate.nve(energy_fn, shift_fn, s.dt)
    init_fn = lambda key, R, box, mass, p, nbrs: init(key, R, s.kT, mass=mass, momenta=p,
                                                     neighbor=nbrs)
  elif s.ensemble == "nvt_langevin":
    init, apply = simulate.nvt_langevin(energy_fn, shift_fn, s.dt, s.kT, gamma=s.gamma)
    init_fn = lambda key, R, box, mass, p, nbrs: init(key, R, mass=mass, momenta=p,
                                                     neighbor=nbrs)
  elif s.ensemble == "nvt_nose_hoover":
    init, apply = simulate.nvt_nose_hoover(energy_fn, shift_fn, s.dt, s.kT, tau=s.tau_t)
    init_fn = lambda key, R, box, mass, p, nbrs: init(key, R, mass=mass, momenta=p,
                                                     neighbor=nbrs)
  else:  # npt
    npt = functools.partial(
        simulate.npt_nose_hoover, energy_fn, dt=s.dt, pressure=s.pressure, kT=s.kT,
        barostat_kwargs={"tau": s.tau_p}, thermostat_kwargs={"tau": s.tau_t})
    init, _ = npt(shift_fn=shift_fn)
    init_fn = lambda key, R, box, mass, p, nbrs: init(key, R, box, mass=mass, momenta=p,
                                                     neighbor=nbrs)

    def apply(state, **kwargs):
      # JAX-MD's shift_fn never sees the box before the step; build the step (cheap Python,
      # at trace time) around a shift that knows it. See _npt_fractional_shift.
      shift = _npt_fractional_shift(shift_fn, simulate.npt_box(state))
      return npt(shift_fn=shift)[1](state, **kwargs)
  return init_fn, apply


def _npt_fractional_shift(shift_fn: Callable, box_old: Array) -> Callable:
  """``shift_fn`` for ``simulate.npt_nose_hoover`` with fractional coordinates.

  JAX-MD's NPT position update (``exp_iL1``) calls ``shift_fn(R, R * (e^x - 1) + dt V ...,
  box=new_box)``: the first term is the affine scaling of *real* positions with the box. With
  fractional ``R`` it is a fractional number added as if it were Å, so atoms drift by
  ``inv(box) R (e^x - 1)`` per step (``u -> u (1 + ln(s) / L)`` over a run), a shift that grows
  from one side of the cell to the other (JAX-MD 0.2.29; atoms at rest in a shrinking box move
  in fractional coordinates). In fractional coordinates the box scaling is already carried by
  the box, so the correct update is ``u + inv(new_box) (dt V ...)``. ``box_old`` is the box
  before the step; ``e^x`` is the (isotropic) ratio of the two boxes, and the scaling term is
  taken out again here.
  """
  def shift(R, dR, **kwargs):
    if "box" in kwargs:
      ratio = jnp.trace(kwargs["box"]) / jnp.trace(box_old)  # e^x: the box scales uniformly
      dR = dR - R * (ratio - 1.0)
    return shift_fn(R, dR, **kwargs)
  return shift


def _keep_dtypes(new, old):
  """``new`` with the dtypes of ``old``: under x64 some JAX-MD steps promote float32 states to
  float64 (e.g. the Langevin noise from ``random.normal`` without a dtype), which would break
  the loop carry and silently change the precision the user chose."""
  return jax.tree.map(lambda n, o: n.astype(jnp.result_type(o)), new, old)


def _step_fn(settings: _Settings, apply_fn: Callable, displacement_fn: Callable,
             cutoff: float) -> Callable:
  """One MD step on the carry ``(state, nbrs, aux)``: update the list, then integrate.

  ``aux`` is ``(ref_scale, min_scale)`` for NPT (linear box scale at the last list rebuild,
  smallest scale seen), else ``()``.
  """
  if settings.ensemble != "npt":
    def step(carry):
      state, nbrs, aux = carry
      nbrs = nbrs.update(state.position)
      return _keep_dtypes(apply_fn(state, neighbor=nbrs), state), nbrs, aux
    return step

  skin = settings.dr_threshold
  list_cutoff = cutoff + skin

  def step(carry):
    state, nbrs, (ref_scale, min_scale) = carry
    box = simulate.npt_box(state)
    R = state.position
    scale = jnp.exp(state.box_position)  # linear box scale relative to reference_box
    # Compression since the last rebuild brings every pair closer by up to (1 - s) * r; JAX-MD
    # only watches atom displacements, so force a rebuild when both together eat the skin.
    d = jax.vmap(functools.partial(displacement_fn, box=box))(R, nbrs.reference_position)
    max_disp = jnp.sqrt(jnp.max(jnp.sum(d * d, axis=-1)))
    shrink = jnp.maximum(0.0, 1.0 - scale / ref_scale)
    force = 2.0 * max_disp + shrink * list_cutoff > skin
    # Half a lattice vector away (fractional coordinates) is beyond any skin: JAX-MD rebuilds.
    ref = jnp.where(force, jnp.mod(R + 0.5, 1.0), nbrs.reference_position)
    nbrs = jmd_dataclasses.replace(nbrs, reference_position=ref)
    new = nbrs.update(R, box=box)
    rebuilt = jnp.any(new.reference_position != ref)
    ref_scale = jnp.where(rebuilt, scale, ref_scale)
    state = _keep_dtypes(apply_fn(state, neighbor=new), state)
    min_scale = jnp.minimum(min_scale, jnp.exp(state.box_position))
    return state, new, (ref_scale, min_scale)
  return step


def _observe_fn(settings: _Settings, energy_fn: Callable, box_fn: Callable) -> Callable:
  """``(state, nbrs) -> {epot, ekin[, conserved][, pressure, volume]}`` in eV, eV/Å^3, Å^3.

  ``conserved``: the quantity the integrator conserves (NVE: total energy; Nose-Hoover NVT and
  NPT: JAX-MD's extended Hamiltonians); Langevin has none.
  """
  s = settings

  def observe(state, nbrs):
    R = state.position
    # not quantity.kinetic_energy: its float64 accumulator warns in every float32 run
    ekin = 0.5 * jnp.sum(state.momentum**2 / state.mass)
    out = {"ekin": ekin}
    if s.periodic:
      box = box_fn(state)
      # One reverse pass gives E and the virial dU/d(eps) of a uniform strain (1 + eps).
      u = lambda eps: energy_fn(R, nbrs, box=box, perturbation=1.0 + eps)
      epot, dU = jax.value_and_grad(u)(jnp.zeros((), R.dtype))
      volume = jnp.abs(jnp.linalg.det(box))
      out.update(pressure=(2.0 * ekin - dU) / (3.0 * volume), volume=volume)
    else:
      epot = energy_fn(R, nbrs)
    out["epot"] = epot
    # JAX-MD's invariants re-evaluate the energy through energy_fn; hand them the known one.
    known = lambda *args, **kwargs: epot
    if s.ensemble == "nve":
      out["conserved"] = epot + ekin
    elif s.ensemble == "nvt_nose_hoover":
      out["conserved"] = simulate.nvt_nose_hoover_invariant(known, state, s.kT)
    elif s.ensemble == "npt":
      out["conserved"] = simulate.npt_nose_hoover_invariant(known, state, s.pressure, s.kT)
    return out
  return observe


def _chunk_fn(settings: _Settings, step_fn: Callable, observe_fn: Callable, box_fn: Callable,
              traces: List[int]) -> Callable:
  """``chunk(carry, g0, n, g_end) -> (carry, logs, num_logs, frames, num_frames)``.

  Runs ``n <= chunk`` steps from global step ``g0``. After a step that lands on global step
  ``g``, it records a log row if ``g % log_interval == 0 or g == g_end`` and a frame (full state,
  energy, box) if ``g % traj_interval == 0 or g == g_end``, into buffers of static size;
  ``num_logs`` / ``num_frames`` say how many entries are valid. ``g0, n, g_end`` are traced
  int32 scalars, so a shorter last chunk does not recompile.
  """
  li, ti = settings.log_interval, settings.traj_interval
  n_logs = settings.chunk // li + 2
  n_frames = settings.chunk // ti + 2 if ti else 0

  def chunk(carry, g0, n, g_end):
    traces[0] += 1  # runs at trace time only: counts compilations
    state, nbrs, _ = carry
    obs_shape = jax.eval_shape(observe_fn, state, nbrs)  # one trace of observe, not two
    frame_shape = {"state": state, "epot": obs_shape["epot"], "box": jax.eval_shape(box_fn, state)}
    zeros = lambda k, tree: jax.tree.map(lambda x: jnp.zeros((k,) + x.shape, x.dtype), tree)
    logs = dict(zeros(n_logs, obs_shape), step=jnp.zeros(n_logs, jnp.int32))
    frames = dict(zeros(n_frames, frame_shape), step=jnp.zeros(n_frames, jnp.int32))

    def record(args):
      carry, logs, il, frames, ifr, g = args
      state, nbrs, _ = carry
      obs = observe_fn(state, nbrs)
      put = lambda buf, i, tree: jax.tree.map(lambda b, v: b.at[i].set(v), buf, tree)
      # Written unconditionally; a slot whose counter is not advanced is overwritten later.
      logs = put(logs, jnp.minimum(il, n_logs - 1), dict(obs, step=g))
      if n_frames:
        frames = put(frames, jnp.minimum(ifr, n_frames - 1),
                     {"state": state, "epot": obs["epot"], "box": box_fn(state), "step": g})
      return logs, frames

    def body(j, c):
      carry, logs, il, frames, ifr = c
      carry = step_fn(carry)
      g = g0 + j + 1
      last = g == g_end
      do_log = (g % li == 0) | last
      do_frame = ((g % ti == 0) | last) if ti else jnp.zeros((), bool)
      logs, frames = lax.cond(do_log | do_frame, record, lambda a: (a[1], a[3]),
                              (carry, logs, il, frames, ifr, g))
      return carry, logs, il + do_log, frames, ifr + do_frame

    zero = jnp.zeros((), jnp.int32)
    carry, logs, il, frames, ifr = lax.fori_loop(0, n, body, (carry, logs, zero, frames, zero))
    return carry, logs, il, frames, ifr

  return jax.jit(chunk)


@functools.lru_cache(maxsize=8)
def _engine(potential: potentials.Potential, settings: _Settings) -> _Engine:
  """Builds (once per potential and settings) the JAX-MD functions and the jitted chunk."""
  s = settings
  box = np.asarray(s.box, np.float64).reshape(3, 3)
  if s.periodic:
    displacement_fn, shift_fn = space.periodic_general(box, fractional_coordinates=True)
  else:
    displacement_fn, shift_fn = space.free()
  neighbor_fn, energy_fn = pjm.neighbor_list(
      potential, displacement_fn, box, species=np.asarray(s.numbers),
      dr_threshold=s.dr_threshold, capacity_multiplier=s.capacity_multiplier,
      fractional_coordinates=s.periodic)
  init_fn, apply_fn = _integrator(s, energy_fn, shift_fn)
  if s.ensemble == "npt":
    box_fn = simulate.npt_box
  else:
    box_fn = lambda state: jnp.asarray(box, state.position.dtype)
  observe_fn = _observe_fn(s, energy_fn, box_fn)
  step_fn = _step_fn(s, apply_fn, displacement_fn, float(potential.cutoff))
  traces = [0]
  chunk_fn = _chunk_fn(s, step_fn, observe_fn, box_fn, traces)
  # init computes the first forces: jitted it is one program to compile (or load from the
  # persistent cache), not dozens of op-by-op ones.
  return _Engine(s, neighbor_fn, energy_fn, jax.jit(init_fn), jax.jit(observe_fn), chunk_fn,
                 box_fn, traces)


# --------------------------------------------------------------------------------------------
# neighbour lists: allocation and growth


def _allocate(engine: _Engine, R: Array, box: Optional[np.ndarray], extra: int,
              min_capacity: int = 0) -> Tuple[partition.NeighborList, int]:
  """A list for positions ``R`` (and NPT ``box``) with at least ``min_capacity`` pairs, and
  the ``extra_capacity`` it took (JAX-MD adds it per cell, and ``N *`` it to the pairs)."""
  kw = {} if box is None else {"box": jnp.asarray(box, R.dtype)}
  n = R.shape[0]
  nbrs = engine.neighbor_fn.allocate(R, extra, **kw)
  # JAX-MD's lists hold at most n (n - 1) pairs; image lists (small boxes) have no such limit.
  limit = math.inf if isinstance(nbrs, pjm.ImageNeighborList) else n * (n - 1)
  if nbrs.max_occupancy < min_capacity and nbrs.max_occupancy < limit:
    extra += -(-(min_capacity - nbrs.max_occupancy) // n)
    nbrs = engine.neighbor_fn.allocate(R, extra, **kw)
  return nbrs, extra


_GROWTH = 1.5  # capacity growth per overflow: geometric, so a run reallocates O(log) times
_MAX_REPLAYS = 10


# --------------------------------------------------------------------------------------------
# extended state (thermostats, barostat, random key) <-> atoms.info


_PARTICLE_FIELDS = ("position", "momentum", "force", "mass")


def _extended_state(state) -> Dict[str, np.ndarray]:
  """The integrator's variables besides positions, momenta, forces and masses, by key path."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves
          if getattr(path[0], "name", None) not in _PARTICLE_FIELDS}


def _restore_extended(state, saved: Dict[str, Any]):
  """``state`` with its extended variables replaced by ``saved`` (from :func:`_extended_state`);
  returns ``(state, ok)``; ``ok`` is False (and ``state`` unchanged) if they do not match."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  new = []
  for path, leaf in leaves:
    if getattr(path[0], "name", None) in _PARTICLE_FIELDS:
      new.append(leaf)
      continue
    value = saved.get(jax.tree_util.keystr(path))
    if value is None or np.shape(value) != np.shape(leaf):
      return state, False
    new.append(jnp.asarray(np.asarray(value), dtype=jnp.asarray(leaf).dtype))
  return jax.tree_util.tree_unflatten(treedef, new), True


# --------------------------------------------------------------------------------------------
# files


def _traj_format(path: Path) -> str:
  suffix = path.suffix.lower()
  if suffix == ".traj":
    return "traj"
  if suffix in (".xyz", ".extxyz"):
    return "extxyz"
  raise ValueError(f"trajectory file {str(path)!r}: use a .traj (ASE binary, exact resume) "
                   f"or .xyz/.extxyz file name")


def _append_frames(path: Path, frames: List[ase.Atoms]) -> None:
  """Append frames and close the file again, so it is complete after every chunk."""
  if not frames:
    return
  if _traj_format(path) == "traj":
    from ase.io.trajectory import Trajectory
    with Trajectory(str(path), "a") as t:
      for f in frames:
        t.write(f)
  else:
    for f in frames:
      f.info.pop("md_state", None)  # nested dicts do not fit an extxyz comment line
    ase.io.write(str(path), frames, format="extxyz", append=True)


def _read_last_frame(path: Path) -> Optional[ase.Atoms]:
  if not path.exists() or path.stat().st_size == 0:
    return None
  fmt = _traj_format(path)
  try:
    if fmt == "traj":
      from ase.io.trajectory import Trajectory
      with Trajectory(str(path)) as t:
        return t[-1] if len(t) else None
    return ase.io.read(str(path), index=-1, format="extxyz")
  except Exception as e:  # noqa: BLE001 - any parse error: say which file and what to do
    raise ValueError(f"cannot read the last frame of {str(path)!r} to resume from ({e}); "
                     f"the file may be damaged: copy the good frames to a new file "
                     f"(ase.io.read(path, ':N')) and resume from that") from e


class _CsvLog:
  """Appends log rows to a CSV file, header first, flushed after every chunk."""

  def __init__(self, path: Optional[PathLike], columns: List[str]):
    self.path = None if path is None else Path(path)
    self.columns = columns
    if self.path is not None and (not self.path.exists() or self.path.stat().st_size == 0):
      with open(self.path, "w", newline="") as f:
        csv.writer(f).writerow(columns)

  def write(self, rows: List[Dict[str, float]]) -> None:
    if self.path is None or not rows:
      return
    with open(self.path, "a", newline="") as f:
      w = csv.writer(f)
      for r in rows:
        w.writerow([r[c] for c in self.columns])


# --------------------------------------------------------------------------------------------
# the driver


def _quiet_float64_requests(fn: Callable) -> Callable:
  """jax-md's thermostats sum kinetic energies with an explicit float64 accumulator, which JAX
  truncates to float32 in float32 runs with a UserWarning at every trace; the sum is the same,
  so the warning is noise to users."""
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message="Explicitly requested dtype float64",
                              category=UserWarning)
      return fn(*args, **kwargs)
  return wrapper


@_quiet_float64_requests
def run(
    atoms: ase.Atoms,
    potential: potentials.Potential,
    *,
    ensemble: str = "nve",
    temperature: float = 300.0,
    timestep: float = 0.5,
    steps: int = 1000,
    pressure: float = 1.01325,
    friction: float = 0.01,
    tau_t: Optional[float] = None,
    tau_p: Optional[float] = None,
    init_temperature: Optional[float] = None,
    chunk: int = 100,
    log_interval: Optional[int] = None,
    traj: Optional[PathLike] = None,
    traj_interval: Optional[int] = None,
    resume: bool = False,
    log_file: Optional[PathLike] = None,
    seed: int = 0,
    dr_threshold: float = 0.5,
    capacity_multiplier: float = 1.25,
    dtype: Any = jnp.float32,
    progress: Union[bool, Callable[[Progress], None]] = False,
) -> MDResult:
  """Run molecular dynamics of ``atoms`` with ``potential``; see the module docstring.

  Args:
    atoms: the start structure (positions Å, masses amu, cell, pbc all or none; momenta are
      used if any is non-zero). Not modified.
    potential: the :class:`potentials.Potential`.
    ensemble: ``"nve"``, ``"nvt_langevin"``, ``"nvt_nose_hoover"`` or ``"npt"``.
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
    traj: ``.traj`` or ``.xyz``/``.extxyz`` file for frames (None: no frames).
    traj_interval: steps between frames (default ``log_interval``); the first (fresh runs) and
      the last step are always written.
    resume: continue from the last frame of ``traj`` if it exists (else start from ``atoms``).
      Without it an existing non-empty ``traj`` is an error, never overwritten.
    log_file: CSV file for the log rows (appended to; a header is written to a new file).
    seed: seeds the Maxwell-Boltzmann velocities and the Langevin noise.
    dr_threshold: neighbour-list skin (Å).
    capacity_multiplier: initial neighbour-list headroom (JAX-MD's); it grows on overflow.
    dtype: ``jnp.float32`` (default) or ``jnp.float64`` (needs ``jax_enable_x64``).
    progress: True for a tqdm bar, or a callable taking a :class:`Progress` after each chunk.

  Returns:
    :class:`MDResult`.
  """
  # ---------------------------------------------------------------- arguments
  if ensemble not in ENSEMBLES:
    raise ValueError(f"unknown ensemble {ensemble!r}; choose one of {', '.join(ENSEMBLES)}")
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
    raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
  steps = int(steps)
  for name, value in (("chunk", chunk), ("log_interval", log_interval),
                      ("traj_interval", traj_interval)):
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  for name, value, lo in (("timestep", timestep, 0.0), ("temperature", temperature, None),
                          ("friction", friction, None), ("dr_threshold", dr_threshold, None)):
    if not (np.isfinite(value) and (value > lo if lo is not None else value >= 0)):
      raise ValueError(f"{name} must be a finite number {'> 0' if lo is not None else '>= 0'}, "
                       f"got {value!r}")
  if ensemble in ("nvt_langevin", "nvt_nose_hoover", "npt") and temperature <= 0:
    raise ValueError(f"{ensemble} needs a temperature > 0 K, got {temperature}")
  if not np.isfinite(pressure):
    raise ValueError(f"pressure must be finite (bar), got {pressure}")
  if not (np.isfinite(capacity_multiplier) and capacity_multiplier > 0):
    raise ValueError(f"capacity_multiplier must be > 0, got {capacity_multiplier}")
  if init_temperature is not None and not (np.isfinite(init_temperature)
                                           and init_temperature >= 0):
    raise ValueError(f"init_temperature must be >= 0 K, got {init_temperature}")
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.float32, jnp.float64):
    raise ValueError(f"dtype must be float32 or float64, got {dtype}")
  if dtype == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError("dtype float64 needs 64-bit JAX: call jax.config.update("
                     "'jax_enable_x64', True) at start-up (the driver does not flip it for you)")
  chunk = int(chunk)
  log_interval = int(log_interval or chunk)
  traj_path = None if traj is None else Path(traj)
  traj_interval = int(traj_interval or log_interval) if traj_path is not None else 0
  if traj_path is not None:
    _traj_format(traj_path)
  tau_t = 100.0 * timestep if tau_t is None else float(tau_t)
  tau_p = 1000.0 * timestep if tau_p is None else float(tau_p)
  if tau_t <= 0 or tau_p <= 0:
    raise ValueError(f"tau_t and tau_p must be > 0 fs, got {tau_t}, {tau_p}")
  cutoff = float(potential.cutoff)

  # ---------------------------------------------------------------- start state
  system = _system(atoms, cutoff, dr_threshold)
  if ensemble == "npt" and not system.periodic:
    raise ValueError("npt needs a periodic system (atoms.pbc all True and a cell)")
  first_step, time0_fs, saved_state, last = 0, 0.0, None, None
  if traj_path is not None:
    last = _read_last_frame(traj_path)
    if last is not None and not resume:
      raise FileExistsError(f"{str(traj_path)!r} already holds frames; pass resume=True to "
                            f"continue that run, or choose another file / delete it")
  if last is not None:
    if not np.array_equal(last.numbers, system.numbers):
      raise ValueError(f"cannot resume: the atoms in {str(traj_path)!r} are not the ones given "
                       f"(atomic numbers differ)")
    if "md_step" not in last.info:
      raise ValueError(f"cannot resume: the last frame of {str(traj_path)!r} has no md_step "
                       f"(not written by plugin.md)")
    first_step = int(last.info["md_step"])
    time0_fs = float(last.info.get("md_time_fs", first_step * timestep))
    if last.info.get("md_ensemble") == ensemble:
      saved_state = last.info.get("md_state")
    last.set_masses(system.masses)
    system = _system(last, cutoff, dr_threshold, reference=system if not system.periodic
                     else None)
    if system.momenta is None:
      system = dataclasses.replace(system, momenta=np.zeros_like(system.R))

  settings = _Settings(
      ensemble=ensemble, numbers=tuple(int(z) for z in system.numbers),
      periodic=system.periodic, box=tuple(float(x) for x in system.box.ravel()),
      dt=float(timestep) * FS, kT=float(temperature) * KB, gamma=float(friction) / FS,
      tau_t=tau_t * FS, tau_p=tau_p * FS, pressure=float(pressure) * BAR,
      dr_threshold=float(dr_threshold), capacity_multiplier=float(capacity_multiplier),
      chunk=chunk, log_interval=log_interval, traj_interval=traj_interval)
  engine = _engine(potential, settings)
  traces0 = engine.traces[0]

  R = jnp.asarray(system.R, dtype)
  box0 = system.box if ensemble == "npt" else None
  extra = 0
  nbrs, extra = _allocate(engine, R, box0, extra)
  if system.momenta is None:
    t0 = temperature if init_temperature is None else float(init_temperature)
    momenta = maxwell_boltzmann(system.masses, t0, seed) @ system.Q.T
  else:
    momenta = system.momenta
  key = jax.random.PRNGKey(seed)
  state = engine.init_fn(key, R, jnp.asarray(system.box, dtype),
                         jnp.asarray(system.masses, dtype), jnp.asarray(momenta, dtype), nbrs)
  # Python-float leaves (JAX-MD stores e.g. the chains' tau so) come back from the jitted chunk
  # as arrays; make them arrays now, or the second chunk would compile again.
  state = jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x)), state)
  # ... and every floating leaf in the run's dtype: under x64, JAX-MD builds thermostat and
  # barostat variables in float64 for a float32 run, which breaks its own inner loops.
  state = jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  if saved_state is not None:
    state, ok = _restore_extended(state, saved_state)
    if not ok:
      warnings.warn("the trajectory's saved integrator state does not match this run's "
                    "settings; thermostat/barostat variables start afresh", stacklevel=2)
  elif last is not None and ensemble != "nve":
    warnings.warn(f"resuming {ensemble} from a frame without its integrator state (other "
                  f"ensemble or extxyz file): thermostat/barostat variables start afresh",
                  stacklevel=2)
  aux: Any = ()
  if ensemble == "npt":
    scale = jnp.exp(state.box_position)
    aux = (scale, scale)
    if saved_state is not None:
      # Positions were read back through the frame's cell; use the restored box exactly.
      box_now = np.asarray(simulate.npt_box(state), np.float64)
      nbrs, extra = _allocate(engine, R, box_now, extra)
  carry = (state, nbrs, aux)

  # ---------------------------------------------------------------- output helpers
  masses = system.masses
  columns = ["step", "time_ps", "epot_eV", "ekin_eV", "etot_eV", "temperature_K"]
  has_conserved = ensemble != "nvt_langevin"
  if has_conserved:
    columns.append("conserved_eV")
  if system.periodic:
    columns += ["pressure_bar", "volume_A3"]
  csv_log = _CsvLog(log_file, columns)
  rows: List[Dict[str, float]] = []
  n_atoms = len(masses)

  def time_fs(g: int) -> float:
    return time0_fs + (g - first_step) * float(timestep)

  def make_rows(logs: Dict[str, np.ndarray], count: int) -> List[Dict[str, float]]:
    out = []
    for i in range(count):
      epot, ekin = float(logs["epot"][i]), float(logs["ekin"][i])
      r = {"step": int(logs["step"][i]), "time_ps": time_fs(int(logs["step"][i])) * 1e-3,
           "epot_eV": epot, "ekin_eV": ekin, "etot_eV": epot + ekin,
           "temperature_K": 2.0 * ekin / (3 * n_atoms * KB)}
      if has_conserved:
        r["conserved_eV"] = float(logs["conserved"][i])
      if system.periodic:
        r["pressure_bar"] = float(logs["pressure"][i]) / BAR
        r["volume_A3"] = float(logs["volume"][i])
      out.append(r)
    return out

  def make_frame(state, epot, box, g) -> ase.Atoms:
    info = {"md_step": int(g), "md_time_fs": time_fs(int(g)), "md_ensemble": ensemble,
            "md_state": _extended_state(state)}
    return _to_atoms(system, np.asarray(state.position), np.asarray(state.momentum),
                     np.asarray(state.force), float(epot), np.asarray(box), info)

  # The start: logged, and written as the first frame of a fresh trajectory.
  if last is None:
    obs = jax.device_get(engine.observe_fn(state, nbrs))
    start_logs = jax.tree.map(lambda x: np.asarray(x)[None], obs)
    start_logs["step"] = np.array([first_step])
    new_rows = make_rows(start_logs, 1)
    rows += new_rows
    csv_log.write(new_rows)
    if traj_path is not None:
      _append_frames(traj_path, [make_frame(state, obs["epot"], engine.box_fn(state),
                                            first_step)])

  bar = None
  if progress is True:
    from tqdm.auto import tqdm
    bar = tqdm(total=steps - first_step, unit="step", desc=f"MD {ensemble}")
  callback = progress if callable(progress) else None

  # ---------------------------------------------------------------- the loop
  g = first_step
  reallocations = 0
  chunk_times: List[float] = []
  try:
    while g < steps:
      n = min(chunk, steps - g)
      t_start = time.perf_counter()
      for _attempt in range(_MAX_REPLAYS + 1):
        out = engine.chunk_fn(carry, jnp.int32(g), jnp.int32(n), jnp.int32(steps))
        new_nbrs = out[0][1]
        overflow = bool(new_nbrs.did_buffer_overflow)
        too_small = bool(new_nbrs.cell_size_too_small)
        if not (overflow or too_small):
          break
        # Throw the chunk away; allocate from its start positions and replay it.
        state0, nbrs0, aux0 = carry
        box_alloc = None
        if ensemble == "npt":
          ref_box = np.asarray(state0.reference_box, np.float64)
          scale0 = float(jnp.exp(state0.box_position))
          # Allocate for the most compressed box of the chunk (with a margin): its pairs, its
          # image shifts (small boxes) and cells stay valid for the whole replay. A box below
          # 2 * (cutoff + dr_threshold) gets a list with periodic images (one recompilation).
          s = min(scale0, 0.98 * float(out[0][2][1]))
          box_alloc = ref_box * s
          aux0 = (jnp.asarray(s, dtype), jnp.asarray(scale0, dtype))
        extra += 1  # also grows the cell list's per-cell capacity
        capacity = math.ceil(_GROWTH * nbrs0.max_occupancy) if overflow else 0
        nbrs, extra = _allocate(engine, state0.position, box_alloc, extra, capacity)
        carry = (state0, nbrs, aux0)
        reallocations += 1
      else:
        raise RuntimeError(f"the neighbour list still overflowed after {_MAX_REPLAYS} "
                           f"reallocations in steps {g}..{g + n}; the system is probably "
                           f"collapsing (atoms piling up); check the timestep and structure")
      carry, logs, n_logs, frames, n_frames = out
      state = carry[0]
      logs, n_logs = jax.device_get(logs), int(n_logs)
      if not (np.all(np.isfinite(np.asarray(state.position)))
              and np.all(np.isfinite(logs["epot"][:n_logs]))):
        raise RuntimeError(
            f"MD became unstable between steps {g} and {g + n}: non-finite positions or "
            f"energies (atoms too close, or timestep {timestep} fs too large). Frames up to "
            f"step {g} are kept"
            f"{'' if traj_path is None else f' in {str(traj_path)!r}'}.")
      new_rows = make_rows(logs, n_logs)
      rows += new_rows
      csv_log.write(new_rows)
      if traj_path is not None:
        frames, n_frames = jax.device_get(frames), int(n_frames)
        _append_frames(traj_path, [
            make_frame(jax.tree.map(lambda x: x[i], frames["state"]), frames["epot"][i],
                       frames["box"][i], frames["step"][i]) for i in range(n_frames)])
      g += n
      chunk_times.append(time.perf_counter() - t_start)
      if bar is not None:
        bar.update(n)
        if rows:
          bar.set_postfix(T=f"{rows[-1]['temperature_K']:.0f}K",
                          Etot=f"{rows[-1]['etot_eV']:.4f}eV")
      if callback is not None and rows:
        r = rows[-1]
        callback(Progress(step=g, total_steps=steps, time_ps=time_fs(g) * 1e-3,
                          temperature=temperature_of(state, masses),
                          epot=r["epot_eV"], ekin=r["ekin_eV"], etot=r["etot_eV"],
                          steps_per_s=n / chunk_times[-1]))
  finally:
    if bar is not None:
      bar.close()

  # ---------------------------------------------------------------- result
  state, nbrs, _ = carry
  if g == first_step and last is not None:
    final = last.copy()
    final.calc = last.calc
  else:
    obs = jax.device_get(engine.observe_fn(state, nbrs))
    final = make_frame(state, obs["epot"], engine.box_fn(state), g)
    final.info.pop("md_state")
  log = MDLog(*(np.asarray([r[c] for r in rows], np.int64 if c == "step" else np.float64)
                for c in columns[:6]))
  if has_conserved:
    log.conserved = np.asarray([r["conserved_eV"] for r in rows], np.float64)
  if system.periodic:
    log.pressure = np.asarray([r["pressure_bar"] for r in rows], np.float64)
    log.volume = np.asarray([r["volume_A3"] for r in rows], np.float64)
  return MDResult(atoms=final, log=log, steps=g - first_step, first_step=first_step,
                  total_steps=g, num_compilations=engine.traces[0] - traces0,
                  num_reallocations=reallocations, wall_time_s=float(sum(chunk_times)),
                  chunk_times_s=chunk_times)


def temperature_of(state, masses: np.ndarray) -> float:
  """Temperature (K) of a JAX-MD state's momenta."""
  return temperature(np.asarray(state.momentum), masses)
