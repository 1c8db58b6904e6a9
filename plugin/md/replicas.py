"""Many systems in one program: the JAX-MD engine over a batch of replicas.

``B`` systems (any sizes, species, cells: periodic, triclinic or open) are padded to the
largest atom count ``N`` and advanced together by one jitted chunk (:func:`plugin.md.engine.
chunk_fn`) whose step is the single-system step mapped over the replica axis (``jax.vmap``):
the vmapped, padded layout. Measured against the concatenated alternative it needs no segment
bookkeeping in the model, keeps each replica's arithmetic that of a run alone, and maps one
replica axis onto devices (:func:`shard`).

Pair list (:mod:`plugin.neighbors.replicas`): per replica, every pair within ``cutoff +
dr_threshold``, found by brute force on the image table the narrowest cell needs, rebuilt
only for replicas whose atoms moved half the skin. Batches are for many small systems
(molecules, cells of a few hundred atoms); one large system belongs to ``plugin.md.run`` on a
single ``Atoms``, whose cell list scales as ``N``.

The model's parameters are an argument of the compiled programs (the carry's third part),
not constants in them: another model of the same shape (an active-learning round's) reuses
them. A replica that leaves a batch is parked in its slot (:func:`park`), so the batch keeps
its shape and program.

Overflow: a replica whose pairs exceed the capacity marks the list; the host then replays the
chunk for the whole batch with a larger capacity (:func:`plugin.md.engine.advance`), which
gives every other replica the same numbers it had (the extra slots are padding).

Padding atoms carry no pairs, mass 1 and zero momentum (reset after each step, so Langevin noise
never moves them); temperatures, kinetic energies and guards count real atoms only.
Each replica's trajectory equals the one it has alone, except that Langevin noise is drawn for
the padded shape (same statistics, other numbers) in replicas smaller than the largest.
Nose-Hoover chains count ``3 N`` degrees of freedom of the padded shape, so that ensemble needs
replicas of one size; NPT is not batched (one box per system would need JAX-MD's NPT state per
replica; run those one at a time).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax_md import dataclasses as jmd_dataclasses
from jax_md import space

import potentials
from potentials import electrostatics, ensemble
from plugin import thermo
from plugin.md import engine as eng
from plugin.md import guards
from plugin.md import system as msys
from plugin.md.ensembles import TABLE, Params
from plugin.md.settings import DEFAULTS
from plugin.neighbors.replicas import (  # noqa: F401  (ReplicaList: its old home)
  Geometry,
  ReplicaList,
  ReplicaNeighborFns,
  image_table,
  pair_vectors,
  shift,
)

Array = jax.Array


def _model_inputs(cutoff: float) -> Callable:
  """``inputs(R, neighbor, perturbation=None) -> (r, kwargs)``: one replica's pair vectors
  (padding pairs: a finite vector beyond the cutoff, which also zeroes their gradients) and
  the keyword arguments of the potential's per-atom functions."""
  far = 2.0 * cutoff + 1.0

  def inputs(R, neighbor, perturbation=None):
    valid = neighbor.dst < R.shape[0]
    r = pair_vectors(R, neighbor, perturbation)
    r = jnp.where(valid[:, None], r, jnp.zeros_like(r).at[:, 0].set(far))
    geom = neighbor.geometry
    kw = dict(species_index=geom.species, dst=neighbor.dst, src=neighbor.src, atom_mask=geom.mask)
    return r, dict(kw, indices_are_sorted=True)

  return inputs


def energy_fn(potential: potentials.Potential) -> Callable:
  """``energy(R, neighbor, perturbation=None, params=None, **ignored) -> ()`` eV of one
  replica (element shifts included, as ``plugin.jax_md``'s energy; with a model's learnt
  charges, their electrostatics). ``params``: the model's (default ``potential.params``); a
  batch engine passes them as an argument, so one program serves every model of a shape."""
  if potential.config.electrostatics:
    atom_energies = charged_energies_fn(potential)
    return lambda R, neighbor, perturbation=None, params=None, **kw: jnp.sum(
      atom_energies(R, neighbor, perturbation, params)[0]
    )
  pair_fn = potential.atomic_energies_from_pairs_fn()
  inputs = _model_inputs(float(potential.cutoff))

  def energy(R, neighbor, perturbation=None, params=None, **kwargs):
    r, kw = inputs(R, neighbor, perturbation)
    return jnp.sum(pair_fn(potential.params if params is None else params, r=r, **kw))

  return energy


def charged_energies_fn(potential: potentials.Potential) -> Callable:
  """``(R, neighbor, perturbation=None, params=None) -> (energies (N,), charges (N,))`` of one
  replica for a model with learnt charges: local energies plus the open sum or Ewald sum (the
  replica's ``Geometry`` holds its total charge and reciprocal vectors)."""
  pair_fn = potential.energies_and_charges_from_pairs_fn()
  inputs = _model_inputs(float(potential.cutoff))
  config = potential.config

  def energies(R, neighbor, perturbation=None, params=None):
    r, kw = inputs(R, neighbor, perturbation)
    local, raw = pair_fn(potential.params if params is None else params, r=r, **kw)
    geom = neighbor.geometry
    # fractional (periodic) positions as real ones, with the pair vectors' derivatives
    positions = jnp.where(geom.periodic, space.transform(geom.box, R), R)
    box = jnp.where(geom.periodic, geom.box, jnp.eye(3, dtype=R.dtype))
    if perturbation is not None:
      positions = space.raw_transform(perturbation, positions)
      box = perturbation @ box
    frames = electrostatics.one_system(
      geom.mask, geom.charge, geom.periodic, geom.kvectors, geom.kmask, R.dtype, geom.mesh
    )
    term = electrostatics.model_long_range_fn(config, frames, neighbor.dst, neighbor.src)
    out = term(positions, box.T, r, raw)
    return local + out.energies, out.charges

  return energies


def force_uncertainty_fn(potential: potentials.Potential) -> Callable:
  """Jitted ``(R (B, N, 3), neighbor, params, scale) -> (B, N)``: every replica's calibrated
  per-atom force uncertainty (eV/Å; padding atoms 0) of an ensemble potential with
  ``params`` and force calibration ``scale`` (``potential.uncertainty_scales[1]``), as
  :func:`plugin.jax_md.uncertainty_fn` gives for one system; one program for every model
  of ``potential``'s shape (:func:`model_key`)."""
  committee = potential.config.committee
  inputs = _model_inputs(float(potential.cutoff))
  members = (
    potential.member_forces_fn() if potential.config.force_heads else potential.member_energies_fn()
  )

  def one(R, neighbor, params, scale):
    r, kw = inputs(R, neighbor)
    if potential.config.force_heads:  # read out in the forward pass
      member_e, deviations = members(params, r=r, **kw)
      spread = ensemble.readout_spread(jnp.sum(member_e, 0), deviations, forces_scale=scale)
    else:
      vectors = lambda R: inputs(R, neighbor)[0]
      pairs = lambda R: vectors(R) if committee == 1 else jax.vmap(vectors)(R)
      totals = lambda R: jnp.sum(members(params, r=pairs(R), **kw), axis=0)
      spread = ensemble.spread(*ensemble.member_forces(totals, R, committee), forces_scale=scale)
    return spread.forces * neighbor.geometry.mask

  return jax.jit(jax.vmap(one, in_axes=(0, 0, None, None)))


def model_key(potential: potentials.Potential) -> tuple:
  """What a batch program depends on of a model besides its parameters' values: its
  configuration, species and the parameters' structure, shapes and dtypes. Models that
  share it (an active-learning run's rounds) share compiled programs."""
  leaves, tree = jax.tree_util.tree_flatten(potential.params)
  shapes = tuple((tuple(x.shape), str(x.dtype)) for x in leaves)  # no copy to the host
  return potential.config, tuple(potential.species), tree, shapes


@dataclasses.dataclass(frozen=True)
class BatchKey:
  """What a batch engine's compiled functions close over (engines are cached by it)."""

  ensemble: str
  params: Params
  systems: Tuple[Tuple, ...]  # per replica: (numbers, periodic, box, charge)
  temperatures: Tuple[float, ...]  # K
  dr_threshold: float
  capacity_multiplier: float
  chunk: int
  log_interval: int
  traj_interval: int
  periodic: bool = True  # frames carry the virial (a free replica's is its pair virial)


@dataclasses.dataclass(frozen=True)
class Batch:
  """The padded, stacked start of ``B`` systems (NumPy; positions in each engine frame)."""

  systems: Tuple[msys.System, ...]
  R: np.ndarray  # (B, N, 3)
  masses: np.ndarray  # (B, N), padding 1
  momenta: np.ndarray  # (B, N, 3), padding 0
  geometry: Geometry  # NumPy leaves with a replica axis
  sizes: np.ndarray  # (B,) real atoms

  @property
  def num_atoms(self) -> int:
    return int(self.R.shape[1])


def stack(
  systems: Sequence[msys.System], momenta: Sequence[np.ndarray], potential: potentials.Potential
) -> Batch:
  """Pads and stacks systems (in the engine frame, with their start momenta)."""
  n = max(len(s.numbers) for s in systems)
  pad = lambda a, fill: np.concatenate([a, np.full((n - len(a),) + a.shape[1:], fill, a.dtype)])
  geometry = Geometry(
    box=np.stack([s.box for s in systems]),
    periodic=np.array([s.periodic for s in systems]),
    species=np.stack(
      [pad(potential.species_index(s.numbers).astype(np.int32), 0) for s in systems]
    ),
    mask=np.stack([pad(np.ones(len(s.numbers), bool), False) for s in systems]),
    **(_charge_geometry(systems, potential.config) if potential.config.electrostatics else {}),
  )
  return Batch(
    tuple(systems),
    np.stack([pad(s.R, 0.0) for s in systems]),
    np.stack([pad(s.masses, 1.0) for s in systems]),
    np.stack([pad(np.asarray(p, np.float64), 0.0) for p in momenta]),
    geometry,
    np.array([len(s.numbers) for s in systems]),
  )


def _charge_geometry(systems: Sequence[msys.System], config) -> dict:
  """Each replica's total charge and Ewald vectors (none for open replicas) or one PME grid
  for all (its moduli repeated per replica), for a model with learnt charges."""
  cells = np.stack([s.box.T for s in systems])  # rows: lattice vectors
  periodic = np.array([s.periodic for s in systems])
  most = max(len(s.numbers) for s in systems)
  table, mask, mesh = electrostatics.reciprocal_plan(
    cells, periodic, most, config.cutoff, config.ewald_accuracy
  )
  if mesh is not None:
    mesh = tuple(np.broadcast_to(m, (len(systems), len(m))) for m in mesh)
  return dict(charge=np.array([s.charge for s in systems]), kvectors=table, kmask=mask, mesh=mesh)


def _per_replica_kT(key: BatchKey) -> Array:
  return jnp.asarray([t * thermo.KB for t in key.temperatures])


def group_size(num_replicas: int, num_atoms: int) -> Optional[int]:
  """Replicas per group in the compiled step: all (None: one ``vmap``) on accelerators or
  several devices; on one CPU, groups of about ``DEFAULTS.replica_group_atoms`` atoms run one
  after the other (``lax.map(..., batch_size=)``), which keeps the working set in cache."""
  if jax.default_backend() != "cpu" or jax.device_count() > 1:
    return None
  group = max(1, DEFAULTS.replica_group_atoms // max(num_atoms, 1))
  return None if group >= num_replicas else group


def mapped(fn: Callable, group: Optional[int]) -> Callable:
  """``fn`` over a leading replica axis: ``vmap`` (``group`` None), else ``lax.map`` of
  vmapped groups of ``group`` replicas."""
  if group is None:
    return jax.vmap(fn)
  return lambda *xs: lax.map(lambda x: fn(*x), xs, batch_size=group)


def _integrator(key: BatchKey, energy: Callable, group: Optional[int]):
  """Mapped ``(init(keys, R, mass, momenta, nbrs, params), apply(state, neighbor, params))``,
  each returning ``(state, known)`` (:func:`plugin.md.engine.energy_tap`: energy and virial
  from the forces' pass); thermostats get each replica's ``kT``, the energy the model's
  ``params``."""
  ens = TABLE[key.ensemble]
  force, take = eng.energy_tap(energy, virial=True)
  init1, apply1 = ens.integrator(key.params, force, shift)
  kTs = _per_replica_kT(key)
  kw = (lambda kT: {"kT": kT}) if ens.thermostat else (lambda kT: {})

  def init(keys, R, mass, momenta, nbrs, params):
    def one(k, r, m, p, nb, kT):
      return init1(k, r, None, m, p, nb, params=params, **kw(kT)), take()

    return jax.vmap(one)(keys, R, mass, momenta, nbrs, kTs)

  def apply(state, neighbor, params):
    one = lambda s, nb, kT: (apply1(s, neighbor=nb, params=params, **kw(kT)), take())
    new, known = mapped(one, group)(state, neighbor, kTs)
    # padding atoms never move (Langevin noise would give them momentum; they have no pairs)
    return new.set(momentum=new.momentum * neighbor.geometry.mask[..., None]), known

  return jax.jit(init), apply


def _observe(
  key: BatchKey, energy: Callable, group: Optional[int], charges: Optional[Callable] = None
) -> Callable:
  """Vmapped ``observe(state, nbrs, params, known=None)`` (each ``(B,)``, ``virial (B, 3, 3)``,
  ``charges (B, N)`` with a model's learnt charges): those of
  :func:`plugin.md.engine.observe_fn`, ``pressure``/``volume`` NaN for open replicas."""
  invariant = TABLE[key.ensemble].invariant
  kTs = _per_replica_kT(key)

  def one(state, nbrs, kT, params, known):
    R, geom = state.position, nbrs.geometry
    ekin = 0.5 * jnp.sum(state.momentum**2 / state.mass)
    if known:
      epot, virial = known["epot"], known["virial"]
    else:
      eye = jnp.eye(3, dtype=R.dtype)
      u = lambda eps: energy(R, nbrs, perturbation=eye + eps, params=params)
      epot, dU = jax.value_and_grad(u)(jnp.zeros((3, 3), R.dtype))
      virial = 0.5 * (dU + dU.T)
    volume = jnp.where(geom.periodic, jnp.abs(jnp.linalg.det(geom.box)), jnp.nan)
    out = {
      "ekin": ekin,
      "epot": epot,
      "pressure": (2.0 * ekin - jnp.trace(virial)) / (3.0 * volume),
      "volume": volume,
      "virial": virial,
    }
    if charges is not None:
      out["charges"] = charges(R, nbrs, params=params)[1]
    if invariant is not None:
      out["conserved"] = invariant(state, epot, ekin, dataclasses.replace(key.params, kT=kT))
    return out

  def observe(state, nbrs, params, known=None):
    known = known or {}
    return mapped(lambda s, nb, kT, kn: one(s, nb, kT, params, kn), group)(state, nbrs, kTs, known)

  return observe


def _guard(sizes: Array) -> Callable:
  """Batched guard for :func:`plugin.md.engine.chunk_fn`: the first replica that fails
  (``limits (B, 3)``: max temperature, max force, and 1 for a replica still running, 0 for
  one parked by :func:`park`, whose guards are off)."""

  def guard(state, limits):
    codes, values = jax.vmap(eng.guard_code)(state, limits, sizes)
    codes = jnp.where(limits[:, 2] > 0, codes, guards.OK)
    where = jnp.argmax(codes != guards.OK).astype(jnp.int32)
    return codes[where], values[where], where

  return guard


def make_engine(potential: potentials.Potential, key: BatchKey, batch: Batch) -> eng.Engine:
  """The batch engine: :class:`plugin.md.engine.Engine` whose arrays carry a replica axis."""
  if TABLE[key.ensemble].variable_box:
    raise ValueError(
      f"{key.ensemble} is not run for several systems at once (each needs its "
      f"own box state); run them one at a time with plugin.md.run(atoms, ...)"
    )
  if key.ensemble == "nvt_nose_hoover" and len(set(batch.sizes.tolist())) > 1:
    raise ValueError(
      "nvt_nose_hoover counts the degrees of freedom of the padded shape, so "
      "its replicas must have one size; use nvt_langevin for systems of "
      f"different sizes (got {sorted(set(batch.sizes.tolist()))} atoms)"
    )
  energy = energy_fn(potential)
  list_cutoff = float(potential.cutoff) + key.dr_threshold
  table = image_table(
    [s.box for s in batch.systems], [s.periodic for s in batch.systems], list_cutoff
  )
  neighbor_fn = ReplicaNeighborFns(
    batch.geometry,
    table,
    list_cutoff,
    key.dr_threshold,
    key.capacity_multiplier,
    place=placement(len(batch.systems)),
  )
  group = group_size(len(batch.systems), batch.num_atoms)
  init, apply = _integrator(key, energy, group)
  boxes = jnp.asarray(batch.geometry.box)
  box_fn = lambda state: boxes.astype(state.position.dtype)
  charged = charged_energies_fn(potential) if potential.config.electrostatics else None
  observe = _observe(key, energy, group, charged)
  traces = [0]

  def step(carry):  # the carry's third part: the model's parameters
    state, nbrs, params = carry
    nbrs = nbrs.update(state.position)
    new, known = apply(state, nbrs, params)
    return (eng.keep_dtypes(new, state), nbrs, params), known

  chunk = eng.chunk_fn(key, step, observe, box_fn, traces, guard=_guard(jnp.asarray(batch.sizes)))
  return eng.Engine(key, neighbor_fn, energy, init, jax.jit(observe), chunk, box_fn, traces)


def placement(B: int) -> Callable:
  """``place(tree)``: puts the arrays with a leading replica axis of length ``B`` on all JAX
  devices, sharded along it (``NamedSharding`` over a ``"replica"`` mesh axis; with ``B`` not a
  multiple of the device count, over the most devices it divides), so that the jitted chunk
  runs each device's replicas there. One device: the identity."""
  devices = jax.devices()
  d = max(k for k in range(1, len(devices) + 1) if B % k == 0)
  if d < 2:
    return lambda tree: tree
  mesh = jax.sharding.Mesh(np.array(devices[:d]), ("replica",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("replica"))
  put = lambda x: jax.device_put(x, sharding) if np.ndim(x) and np.shape(x)[0] == B else x
  return lambda tree: jax.tree.map(put, tree)


def start(engine: eng.Engine, batch: Batch, seeds: Sequence[int], dtype, params):
  """``(carry, extra, known)`` of a batch: each replica's state from its seed (placed on the
  devices by :func:`placement`), the list, and the model's ``params`` (an argument of the
  compiled programs, not a constant in them); ``known``: what the start forces computed."""
  place = engine.neighbor_fn.place
  R = place(jnp.asarray(batch.R, dtype))
  nbrs, extra = eng.allocate(engine, R, None, 0)
  keys = place(jnp.stack([jax.random.PRNGKey(s) for s in seeds]))
  mass, momenta = (place(jnp.asarray(x, dtype)) for x in (batch.masses, batch.momenta))
  params = jax.tree.map(jnp.asarray, params)
  state, known = engine.init_fn(keys, R, mass, momenta, nbrs, params)
  return (place(eng.in_dtype(state, dtype)), nbrs, params), extra, known


def park(carry, slots: Sequence[int]):
  """The batch ``carry`` with the replicas ``slots`` parked: their atoms become padding (no
  pairs, no forces, zero momentum), so they stand still while the others go on in the same
  compiled program, whose arithmetic for them is unchanged. A replica that leaves a batch
  is parked rather than dropped: a batch of other shape would be a new program (a
  compilation per departure: ten minutes of a fifteen-minute active-learning run on glycine)."""
  state, nbrs, aux = carry
  out = np.zeros(state.position.shape[0], bool)
  out[list(slots)] = True
  gone = jnp.asarray(out)
  idle = lambda x, fill: jnp.where(gone.reshape((-1,) + (1,) * (x.ndim - 1)), fill, x)
  state = state.set(momentum=idle(state.momentum, 0), force=idle(state.force, 0))
  n = state.position.shape[1]
  geometry = dataclasses.replace(nbrs.geometry, mask=nbrs.geometry.mask & ~gone[:, None])
  nbrs = dataclasses.replace(
    nbrs,
    dst=idle(nbrs.dst, n),
    src=idle(nbrs.src, n),
    shifts=idle(nbrs.shifts, 0),
    count=idle(nbrs.count, 0),
    overflow=idle(nbrs.overflow, False),
    geometry=geometry,
  )
  return state, nbrs, aux


def replica(tree, i: int, n: int, lead: int = 0):
  """Replica ``i`` of a batched integrator state (host arrays) behind ``lead`` leading axes
  (frame buffers: 1), its particle fields cut to its ``n`` real atoms."""
  keep = (slice(None),) * lead

  def cut(path, x):
    x = np.asarray(x)[keep + (i,)]
    if getattr(path[0], "name", None) in msys.PARTICLE_FIELDS:
      x = x[keep + (slice(0, n),)]
    return x

  return jax.tree_util.tree_map_with_path(cut, tree)


# ------------------------------------------------------------------------------------------
# copies of one system with any JAX-MD energy function (plugin.testing's replicas)


@jmd_dataclasses.dataclass
class StackedList:
  """``K`` JAX-MD neighbour lists of one capacity stacked along a replica axis (``inner``:
  the list with batched leaves); overflow of any replica counts for the batch."""

  inner: object

  def update(self, R: Array) -> "StackedList":
    return StackedList(jax.vmap(lambda nb, r: nb.update(r))(self.inner, R))

  @property
  def did_buffer_overflow(self) -> Array:
    return jnp.any(self.inner.did_buffer_overflow)

  @property
  def cell_size_too_small(self) -> Array:
    return jnp.any(self.inner.cell_size_too_small)

  @property
  def max_occupancy(self) -> int:
    return self.inner.max_occupancy


class StackedNeighborFns:
  """``allocate`` of a :class:`StackedList`: the user's ``neighbor_fn`` allocates for the first
  replica (capacity and cell grid), every replica's list is that list updated to its positions."""

  def __init__(self, neighbor_fn):
    self.neighbor_fn = neighbor_fn
    self._update = jax.jit(jax.vmap(lambda nb, r: nb.update(r), in_axes=(None, 0)))

  def allocate(self, R: Array, extra_capacity: int = 0, **kwargs) -> StackedList:
    first = self.neighbor_fn.allocate(R[0], extra_capacity, **kwargs)
    return StackedList(self._update(first, R))


def stacked_engine(key, *, energy_fn: Callable, neighbor_fn, shift_fn: Callable) -> eng.Engine:
  """An engine for copies of one system (replica axis first in positions, momenta, masses),
  from the user's JAX-MD functions (``neighbor_fn`` None for a pair-list-free energy): each
  step is the single-system step (:func:`plugin.md.engine.step_fn`) mapped over replicas.
  Fixed-box ensembles only. ``key``: a :class:`plugin.md.engine.EngineKey`."""
  force1, take1 = eng.energy_tap(energy_fn, virial=key.periodic)
  init1, apply1 = TABLE[key.ensemble].integrator(key.params, force1, shift_fn)
  box = np.asarray(key.box, np.float64).reshape(3, 3)
  box_fn = lambda state: jnp.broadcast_to(
    jnp.asarray(box, state.position.dtype), state.position.shape[:1] + (3, 3)
  )
  inner = lambda nbrs: None if nbrs is None else nbrs.inner
  nb_kw = lambda nb: {} if nb is None else {"neighbor": nb}

  def init(keys, R, box_, mass, momenta, nbrs):
    if keys.ndim == 1:  # one key (plugin.md.engine.start): one per replica from it
      keys = jax.random.split(keys, R.shape[0])
    one = lambda k, r, m, p, nb: (init1(k, r, box_, m, p, nb), take1())
    return jax.vmap(one)(keys, R, mass, momenta, inner(nbrs))

  kept = []  # the step's known, from inside the vmap to step_fn's take (the same trace)

  def apply(state, **kw):
    nb = inner(kw.get("neighbor"))
    new, known = jax.vmap(lambda s, n: (apply1(s, **nb_kw(n)), take1()))(state, nb)
    kept[:] = [known]
    return new

  observe1 = eng.observe_fn(key, energy_fn, lambda s: jnp.asarray(box, s.position.dtype))

  def observe(state, nbrs, aux=None, known=None):
    return jax.vmap(observe1)(state, inner(nbrs), None, known or {})

  def guard(state, limits):
    codes, values = jax.vmap(eng.guard_code, in_axes=(0, None))(state, limits)
    where = jnp.argmax(codes != guards.OK).astype(jnp.int32)
    return codes[where], values[where], where

  traces = [0]
  step = eng.step_fn(key, apply, None, 0.0, take=lambda: kept.pop() if kept else {})
  chunk = eng.chunk_fn(key, step, observe, box_fn, traces, guard=guard)
  neighbors = None if neighbor_fn is None else StackedNeighborFns(neighbor_fn)
  return eng.Engine(
    key, neighbors, energy_fn, jax.jit(init), jax.jit(observe), chunk, box_fn, traces
  )
