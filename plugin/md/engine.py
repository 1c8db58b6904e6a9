"""The JAX-MD engine: one step, observables, one compiled chunk, and the overflow replay.

Steps run on the device in chunks of ``chunk`` steps: one jitted call per chunk, a
``lax.fori_loop`` whose body updates JAX-MD's neighbour list (``nbrs.update``, as in JAX-MD's
examples: update, then integrate) and takes one integrator step. Log rows and trajectory frames
are recorded inside the loop into fixed-size buffers (``lax.cond``: only at the recorded steps)
and copied to the host once per chunk. A recorded energy (and virial) is the one the step's
force pass computed on the way (:func:`energy_tap`, fixed boxes): the model appears once in
the compiled chunk, not twice (the second copy was about half of its compile time).

After each chunk the host reads JAX-MD's error bits. If the neighbour (or cell) list overflowed
at any step of the chunk, the steps after it were computed with a truncated list, so the chunk is
thrown away: the list is allocated again from the chunk's *start* positions with more room
(geometric growth), and the chunk is replayed from its saved start state (positions, momenta,
thermostat variables and random key), so no step is lost or mis-computed and a replayed run is
the same trajectory as one that never overflowed. The chunk function is compiled once per
neighbour-list capacity: ``Engine.traces`` counts its traces.

Variable boxes (NPT): JAX-MD rebuilds a list only when an atom moved ``dr_threshold / 2``; a
shrinking box also brings pairs closer, so the step additionally forces a rebuild when
``2 * max displacement + (1 - s) * (cutoff + dr_threshold) > dr_threshold`` (``s``: linear box
scale relative to the last rebuild), which keeps the list exact under compression. An overflow
replay allocates for the most compressed box of the chunk; a box that shrinks below
``2 * (cutoff + dr_threshold)`` gets ``plugin.jax_md``'s list with periodic images.

The engine is built from JAX-MD functions (:func:`make_engine`: any energy function, e.g. a
user's in :mod:`plugin.testing`) or from an eqattn potential (:func:`engine`, cached).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from typing import Any, Callable, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax_md import dataclasses as jmd_dataclasses
from jax_md import partition, simulate, space

import potentials
import plugin.jax_md as pjm
from plugin import exported, thermo
from plugin.md import guards
from plugin.md.ensembles import TABLE, Ensemble, Params, neighbor_kwargs
from plugin.md.settings import DEFAULTS
from plugin.registry import registered

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class EngineKey:
  """Everything the compiled functions close over (hashable: engines are cached by it)."""

  ensemble: str
  params: Params
  numbers: Tuple[int, ...]
  periodic: bool  # fractional coordinates in a periodic box; pressure and volume observed
  box: Tuple[float, ...]  # 9 floats, row-major
  dr_threshold: float
  capacity_multiplier: float
  chunk: int
  log_interval: int
  traj_interval: int  # 0: no frames recorded
  charge: float = 0.0  # total charge (e): a model with learnt charges reads it


@dataclasses.dataclass
class Engine:
  key: EngineKey
  neighbor_fn: Optional[partition.NeighborListFns]  # None: an energy without pair list
  energy_fn: Callable
  init_fn: Callable  # jitted (key, R, box, mass, momenta, nbrs) -> (state, known)
  observe_fn: Callable  # jitted (state, nbrs, aux, known=None) -> dict (aux: the carry's third)
  chunk_fn: Callable  # jitted, see chunk_fn
  box_fn: Callable  # state -> (3, 3) box
  traces: List[int]  # [number of chunk_fn traces]

  @property
  def ensemble(self) -> Ensemble:
    return TABLE[self.key.ensemble]


def keep_dtypes(new, old):
  """``new`` with the dtypes of ``old``: under x64 some JAX-MD steps promote float32 states to
  float64 (e.g. the Langevin noise from ``random.normal`` without a dtype), which would break
  the loop carry and silently change the precision the user chose."""
  return jax.tree.map(lambda n, o: n.astype(jnp.result_type(o)), new, old)


def energy_tap(energy_fn: Callable, *, virial: bool) -> Tuple[Callable, Callable]:
  """``(force_fn, take)``: ``force_fn(R, **kwargs) = -dU/dR`` for a JAX-MD integrator that also
  keeps the energy it computed on the way (``virial``: and the symmetric ``dU/d eps`` of a
  strain ``1 + eps``, from the same reverse pass); ``take()`` hands over what the last call kept
  (``{"epot"[, "virial"]}``; ``{}`` if none) and forgets it.

  Why: a step's forces evaluate the model at its new positions anyway; a recorded step's energy
  from a second evaluation would put the model into the compiled chunk twice (measured: about
  half its compile time). ``take`` must run in the trace of the call (the same step, inside the
  same ``vmap``/``lax.map`` body).
  """
  kept: List[dict] = []

  def force_fn(R, **kwargs):
    if virial:
      eye = jnp.eye(3, dtype=R.dtype)
      u = lambda R, eps: energy_fn(R, perturbation=eye + eps, **kwargs)
      epot, (dR, dU) = jax.value_and_grad(u, argnums=(0, 1))(R, jnp.zeros((3, 3), R.dtype))
      kept[:] = [{"epot": epot, "virial": 0.5 * (dU + dU.T)}]
    else:
      epot, dR = jax.value_and_grad(energy_fn)(R, **kwargs)
      kept[:] = [{"epot": epot}]
    return -dR

  def take() -> dict:
    out = kept[0] if kept else {}
    kept.clear()
    return out

  return force_fn, take


def step_fn(
  key: EngineKey,
  apply_fn: Callable,
  displacement_fn: Callable,
  cutoff: float,
  take: Callable = dict,
) -> Callable:
  """One MD step on the carry ``(state, nbrs, aux)``: update the list, then integrate; returns
  ``(carry, known)``, ``known`` what ``take()`` gives of the new state (:func:`energy_tap`).

  ``aux`` is ``(ref_scale, min_scale)`` for variable boxes (linear box scale at the last list
  rebuild, smallest scale seen), else ``()``.
  """
  if not TABLE[key.ensemble].variable_box:

    def step(carry):
      state, nbrs, aux = carry
      if nbrs is not None:
        nbrs = nbrs.update(state.position)
      new = keep_dtypes(apply_fn(state, **neighbor_kwargs(nbrs)), state)
      return (new, nbrs, aux), take()

    return step

  skin = key.dr_threshold
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
    state = keep_dtypes(apply_fn(state, neighbor=new), state)
    min_scale = jnp.minimum(min_scale, jnp.exp(state.box_position))
    return (state, new, (ref_scale, min_scale)), take()

  return step


def observables(key: EngineKey) -> Tuple[str, ...]:
  """The names :func:`observe_fn` returns for ``key`` (the log columns follow from them)."""
  return (
    ("ekin", "epot")
    + (("conserved",) if TABLE[key.ensemble].invariant else ())
    + (("pressure", "volume") if key.periodic else ())
  )


def observe_fn(key: EngineKey, energy_fn: Callable, box_fn: Callable) -> Callable:
  """``(state, nbrs, aux=None, known=None) -> {epot, ekin[, conserved][, pressure, volume,
  virial][, charges]}`` in eV, eV/Å^3, Å^3, eV, e (``charges (N,)``: a model with learnt
  charges); ``aux``, the carry's third part, is not needed here (a batch engine's holds
  parameters); ``known``: what the step's forces computed of ``state`` (:func:`energy_tap`),
  evaluated again only where missing.

  Pressure (periodic) is ``(2 E_kin - tr dU/d eps) / (3 V)`` with ``eps`` a strain (JAX-MD's
  ``quantity.pressure``); ``virial`` is the symmetric ``dU/d eps`` (3, 3) (ASE's stress is
  ``virial / V``); ``conserved`` is the ensemble's invariant (where it has one).
  """
  invariant = TABLE[key.ensemble].invariant
  charges = _charges_fn(energy_fn)

  def observe(state, nbrs, aux=None, known=None):
    R = state.position
    known = known or {}
    # not quantity.kinetic_energy: its float64 accumulator warns in every float32 run
    ekin = 0.5 * jnp.sum(state.momentum**2 / state.mass)
    out = {"ekin": ekin}
    if key.periodic:
      box = box_fn(state)
      if "virial" in known:
        epot, virial = known["epot"], known["virial"]
      else:
        # One reverse pass gives E and the virial dU/d(eps) of a strain (1 + eps): its trace
        # is the uniform-strain derivative, the whole (ASE's stress times V) goes into frames.
        eye = jnp.eye(3, dtype=R.dtype)
        u = lambda eps: energy_fn(R, neighbor=nbrs, box=box, perturbation=eye + eps)
        epot, dU = jax.value_and_grad(u)(jnp.zeros((3, 3), R.dtype))
        virial = 0.5 * (dU + dU.T)
      volume = jnp.abs(jnp.linalg.det(box))
      out.update(
        pressure=(2.0 * ekin - jnp.trace(virial)) / (3.0 * volume),
        volume=volume,
        virial=virial,
      )
    elif "epot" in known:
      epot = known["epot"]
    else:
      epot = energy_fn(R, **neighbor_kwargs(nbrs))
    out["epot"] = epot
    if charges is not None:
      kw = {"box": box_fn(state)} if key.periodic else {}
      out["charges"] = charges(R, neighbor=nbrs, **kw)
    if invariant is not None:
      out["conserved"] = invariant(state, epot, ekin, key.params)
    return out

  return observe


def _charges_fn(energy_fn: Callable) -> Optional[Callable]:
  """:func:`plugin.jax_md.charge_fn` of ``energy_fn`` (None: not a model with charges)."""
  try:
    return pjm.charge_fn(energy_fn)
  except TypeError:
    return None


def guard_code(state, limits, num_atoms=None):
  """``(code, value)`` of the first guard (:mod:`plugin.md.guards`) that fires for ``state``
  (traced; code 0: none). ``limits``: ``(max_temperature K, max_force eV/Å)``, inf: off;
  ``num_atoms``: the real atoms of a padded state (default: all rows)."""
  finite = (
    jnp.all(jnp.isfinite(state.position))
    & jnp.all(jnp.isfinite(state.momentum))
    & jnp.all(jnp.isfinite(state.force))
  )
  ekin = 0.5 * jnp.sum(state.momentum**2 / state.mass)
  n = state.position.shape[0] if num_atoms is None else num_atoms
  temperature = thermo.temperature_from_kinetic(ekin, n)
  fmax = jnp.sqrt(jnp.max(jnp.sum(state.force**2, axis=-1)))
  code = jnp.where(
    ~finite,
    guards.NON_FINITE,
    jnp.where(
      temperature > limits[0], guards.HOT, jnp.where(fmax > limits[1], guards.FORCE, guards.OK)
    ),
  )
  value = jnp.where(code == guards.HOT, temperature, fmax)
  return code.astype(jnp.int32), value


def no_limits(dtype=jnp.float32):
  """Guard limits that never fire except on non-finite states."""
  return jnp.full((2,), jnp.inf, dtype)


def chunk_fn(
  key: EngineKey,
  step: Callable,
  observe: Callable,
  box_fn: Callable,
  traces: List[int],
  guard: Optional[Callable] = None,
  jit: Callable = jax.jit,
) -> Callable:
  """``chunk(carry, g0, n, g_end, limits) -> (carry, logs, num_logs, frames, num_frames,
  num_steps, guard, value, where, known)``.

  Runs up to ``n <= chunk`` steps from global step ``g0``. After a step that lands on global
  step ``g``, it records a log row if ``g % log_interval == 0 or g == g_end`` and a frame (full
  state, energy, box[, virial]) if ``g % traj_interval == 0 or g == g_end``, into buffers of
  static size; ``num_logs`` / ``num_frames`` say how many entries are valid. ``g0, n, g_end``
  are traced int32 scalars, so a shorter last chunk does not recompile.

  Guards (``limits``: ``(max_temperature, max_force)``, traced): a step whose state fails
  :func:`guard_code`, or whose recorded energy is non-finite, ends the loop: ``carry`` is then
  the last good state (step ``g0 + num_steps``), ``guard`` the code and ``value`` the
  temperature or force that fired; nothing of the failed step is recorded.

  ``guard(state, limits) -> (code, value, where)`` replaces :func:`guard_code` for batches of
  systems (``where``: the replica that fired; :mod:`plugin.md.replicas`). ``jit`` compiles
  the chunk (:func:`make_engine` passes one that keeps programs on disk).

  ``step(carry) -> (carry, known)``: ``known`` (:func:`energy_tap`) is what ``observe`` needs
  not compute again; the result's ``known`` is that of the returned carry (meaningless when
  ``num_steps`` is 0).
  """
  guard = guard or (lambda state, limits: guard_code(state, limits) + (jnp.zeros((), jnp.int32),))
  li, ti = key.log_interval, key.traj_interval
  n_logs = key.chunk // li + 2
  n_frames = key.chunk // ti + 2 if ti else 0
  # what observe gives of these (virial: periodic; charges: a model with learnt charges)
  frame_keys = ("epot", "virial", "charges")

  def buffers(carry, known):
    state = carry[0]
    obs_shape = jax.eval_shape(observe, *carry, known)  # one trace of observe, not two
    frame_shape = dict(
      {k: obs_shape[k] for k in frame_keys if k in obs_shape},
      state=state,
      box=jax.eval_shape(box_fn, state),
    )
    zeros = lambda k, tree: jax.tree.map(lambda x: jnp.zeros((k,) + x.shape, x.dtype), tree)
    return (
      dict(zeros(n_logs, obs_shape), step=jnp.zeros(n_logs, jnp.int32)),
      dict(zeros(n_frames, frame_shape), step=jnp.zeros(n_frames, jnp.int32)),
    )

  def record(args):
    carry, logs, il, frames, ifr, g, known = args
    state = carry[0]
    obs = observe(*carry, known)
    put = lambda buf, i, tree: jax.tree.map(lambda b, v: b.at[i].set(v), buf, tree)
    # Written unconditionally; a slot whose counter is not advanced is overwritten later.
    logs = put(logs, jnp.minimum(il, n_logs - 1), dict(obs, step=g))
    if n_frames:
      frames = put(
        frames,
        jnp.minimum(ifr, n_frames - 1),
        dict({k: obs[k] for k in frame_keys if k in obs}, state=state, box=box_fn(state), step=g),
      )
    return logs, frames, jnp.isfinite(obs["epot"])  # () alone, (B,) for a batch

  def skip(args):
    return args[1], args[3], jnp.ones(args[1]["epot"].shape[1:], bool)

  def chunk(carry, g0, n, g_end, limits):
    traces[0] += 1  # runs at trace time only: counts compilations
    # in the run's dtype (under x64 a Langevin step computes its forces in float64)
    dtype = carry[0].position.dtype
    known0 = jax.tree.map(lambda x: jnp.zeros(x.shape, dtype), jax.eval_shape(step, carry)[1])
    logs, frames = buffers(carry, known0)

    def body(c):
      carry, logs, il, frames, ifr, j, _, _, _, known = c
      new, new_known = step(carry)
      new_known = jax.tree.map(lambda x: x.astype(dtype), new_known)
      g = g0 + j + 1
      last = g == g_end
      do_log = (g % li == 0) | last
      do_frame = ((g % ti == 0) | last) if ti else jnp.zeros((), bool)
      code, value, where = guard(new[0], limits)
      logs, frames, finite = lax.cond(
        (code == 0) & (do_log | do_frame), record, skip, (new, logs, il, frames, ifr, g, new_known)
      )
      bad = ~finite
      if bad.ndim:  # a batch: the replica whose energy failed; parked ones (limits[:, 2] 0) not
        bad = bad & (limits[:, 2] > 0)
      energy_bad = (code == 0) & jnp.any(bad)
      code = jnp.where(energy_bad, guards.NON_FINITE_ENERGY, code)
      where = jnp.where(energy_bad, jnp.argmax(bad).astype(where.dtype), where)
      ok = code == 0
      # a failed step is not taken: the carry stays the last good state
      carry, known = jax.tree.map(
        lambda a, b: jnp.where(ok, a, b), (new, new_known), (carry, known)
      )
      return (
        carry,
        logs,
        il + (ok & do_log),
        frames,
        ifr + (ok & do_frame),
        j + ok,
        code,
        value.astype(limits.dtype),
        where,
        known,
      )

    zero = jnp.zeros((), jnp.int32)
    init = (carry, logs, zero, frames, zero, zero, zero, jnp.zeros((), limits.dtype), zero, known0)
    return lax.while_loop(lambda c: (c[5] < n) & (c[6] == 0), body, init)

  return jit(chunk)


def make_engine(
  key: EngineKey,
  *,
  energy_fn: Callable,
  neighbor_fn: Any,
  displacement_fn: Callable,
  shift_fn: Callable,
  cutoff: float,
  stored_as: Optional[str] = None,
) -> Engine:
  """An engine from JAX-MD functions (``energy_fn(R, neighbor=..., **kwargs)``; ``neighbor_fn``
  None for an energy without pair list). ``stored_as``: a key naming everything the functions
  close over beyond ``key`` (e.g. the model and its parameters); with it, and eqattn's cache
  enabled, the traced programs are kept on disk (:mod:`plugin.exported`)."""
  variable_box = TABLE[key.ensemble].variable_box
  # NPT's integrator differentiates the energy by the box itself: it gets the energy
  force_fn, take = (energy_fn, dict) if variable_box else energy_tap(energy_fn, virial=key.periodic)
  init_fn, apply_fn = TABLE[key.ensemble].integrator(key.params, force_fn, shift_fn)
  if variable_box:
    box_fn = simulate.npt_box
  else:
    box = np.asarray(key.box, np.float64).reshape(3, 3)
    box_fn = lambda state: jnp.asarray(box, state.position.dtype)
  observe = observe_fn(key, energy_fn, box_fn)
  traces = [0]
  jit = jax.jit
  if stored_as is not None:
    jit = functools.partial(_stored, key=(stored_as, key), traces=traces)
  step = step_fn(key, apply_fn, displacement_fn, cutoff, take)
  chunk = chunk_fn(key, step, observe, box_fn, traces, jit=jit)
  # init computes the first forces: jitted it is one program to compile (or load from the
  # persistent cache), not dozens of op-by-op ones.
  init = lambda *args: (init_fn(*args), take())  # noqa: E731  (named for the stored program)
  init.__name__ = "init"
  return Engine(key, neighbor_fn, energy_fn, jit(init), jit(observe), chunk, box_fn, traces)


def _stored(fn: Callable, key, traces: List[int]) -> exported.ExportedJit:
  """``jax.jit(fn)`` kept on disk; a chunk program loaded from there counts as a trace."""
  name = getattr(fn, "__name__", "fn").strip("<>")

  def loaded():
    traces[0] += name == "chunk"

  return exported.ExportedJit(fn, f"md-{name}", key, on_load=loaded)


@registered("md-engine")
def engine(potential: potentials.Potential, key: EngineKey) -> Engine:
  """The engine of an eqattn potential (once per potential and key): ``space.periodic_general``
  in fractional coordinates for periodic systems, ``space.free()`` otherwise, and
  :func:`plugin.jax_md.neighbor_list`."""
  box = np.asarray(key.box, np.float64).reshape(3, 3)
  if key.periodic:
    displacement_fn, shift_fn = space.periodic_general(box, fractional_coordinates=True)
  else:
    displacement_fn, shift_fn = space.free()
  neighbor_fn, energy_fn = pjm.neighbor_list(
    potential,
    displacement_fn,
    box,
    atomic_numbers=np.asarray(key.numbers),
    dr_threshold=key.dr_threshold,
    capacity_multiplier=key.capacity_multiplier,
    fractional_coordinates=key.periodic,
    charge=key.charge if potential.config.electrostatics else 0.0,
  )
  return make_engine(
    key,
    energy_fn=energy_fn,
    neighbor_fn=neighbor_fn,
    displacement_fn=displacement_fn,
    shift_fn=shift_fn,
    cutoff=float(potential.cutoff),
    stored_as=_potential_key(potential),
  )


def _potential_key(potential: potentials.Potential) -> str:
  """What the engine's programs close over of ``potential``: config, species and weights."""
  text = f"{potential.config}|{tuple(potential.species)}|{exported.params_digest(potential.params)}"
  return hashlib.sha256(text.encode()).hexdigest()


def force_uncertainty_fn(engine: Engine) -> Callable:
  """Jitted ``(state, nbrs) -> (N,)``: the ensemble's calibrated force uncertainty per atom
  (eV/Å, :func:`plugin.jax_md.uncertainty_fn`), built once per engine. It is not part of the
  compiled step (every member's forces cost a backward pass each, unless a shallow ensemble
  reads them out: ``force_heads``): the driver checks it between chunks."""
  fn = getattr(engine, "_force_uncertainty", None)
  if fn is None:
    spread = pjm.uncertainty_fn(engine.energy_fn)

    def forces(state, nbrs):
      kw = {"box": engine.box_fn(state)} if engine.key.periodic else {}
      return spread(state.position, neighbor=nbrs, **kw).forces

    fn = engine._force_uncertainty = jax.jit(forces)
  return fn


# ------------------------------------------------------------------------------------------
# start state, neighbour-list allocation, chunks with replay


def allocate(
  engine: Engine,
  R: Array,
  box: Optional[np.ndarray],
  extra: int,
  min_capacity: int = 0,
  like: Any = None,
) -> Tuple[Any, int]:
  """A list for positions ``R`` (and variable ``box``) with at least ``min_capacity`` pairs, and
  the ``extra_capacity`` it took (JAX-MD adds it per cell, and ``N *`` it to the pairs).
  ``like``: the list it replaces; a replica list keeps its geometry (parked replicas)."""
  if engine.neighbor_fn is None:
    return None, extra
  kw = {} if box is None else {"box": jnp.asarray(box, R.dtype)}
  if getattr(like, "geometry", None) is not None:
    kw["geometry"] = like.geometry
  n = R.shape[-2]  # atoms (per replica for a batch)
  nbrs = engine.neighbor_fn.allocate(R, extra, **kw)
  # JAX-MD's lists hold at most n (n - 1) pairs; image lists (small boxes) and replica lists
  # (plugin.md.replicas) have no such limit.
  jax_md_list = isinstance(nbrs, partition.NeighborList) and not isinstance(
    nbrs, pjm.ImageNeighborList
  )
  limit = n * (n - 1) if jax_md_list else math.inf
  if nbrs.max_occupancy < min_capacity and nbrs.max_occupancy < limit:
    extra += -(-(min_capacity - nbrs.max_occupancy) // n)
    nbrs = engine.neighbor_fn.allocate(R, extra, **kw)
  # A list that overflows already where it is built (capacity_multiplier < 1) would give the
  # start state truncated forces, which a replay from that state keeps: grow it first.
  for _ in range(DEFAULTS.max_replays):
    if not bool(nbrs.did_buffer_overflow):
      break
    extra += max(1, -(-nbrs.max_occupancy // n))
    nbrs = engine.neighbor_fn.allocate(R, extra, **kw)
  return nbrs, extra


def init_state(
  engine: Engine,
  R: Array,
  box: np.ndarray,
  masses: np.ndarray,
  momenta: np.ndarray,
  nbrs,
  seed: int,
):
  """``(state, known)``: the integrator state in ``R``'s dtype (every floating leaf, and every
  leaf an array) and what its forces computed on the way (:func:`energy_tap`)."""
  dtype = R.dtype
  state, known = engine.init_fn(
    jax.random.PRNGKey(seed),
    R,
    jnp.asarray(box, dtype),
    jnp.asarray(masses, dtype),
    jnp.asarray(momenta, dtype),
    nbrs,
  )
  return in_dtype(state, dtype), known


def in_dtype(state, dtype):
  """A fresh integrator state with every leaf an array and every floating leaf in ``dtype``."""
  # Python-float leaves (JAX-MD stores e.g. the chains' tau so) come back from the jitted chunk
  # as arrays; make them arrays now, or the second chunk would compile again. Under x64 JAX-MD
  # builds thermostat and barostat variables in float64 for a float32 run, which breaks its own
  # inner loops: cast every floating leaf to the run's dtype.
  state = jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x)), state)
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state
  )


def initial_aux(engine: Engine, state):
  """The step's ``aux`` at the start: ``(scale, scale)`` for variable boxes, else ``()``."""
  if not engine.ensemble.variable_box:
    return ()
  scale = jnp.exp(state.box_position)
  return (scale, scale)


def start(
  engine: Engine, R: Array, box: np.ndarray, masses: np.ndarray, momenta: np.ndarray, seed: int
):
  """The init half of the engine: ``(carry, extra, known)`` for positions ``R`` (their dtype is
  the run's), ``box`` (3, 3), masses and momenta; ``extra`` is the list's extra capacity,
  ``known`` what the start forces computed (for :func:`start_logs`)."""
  nbrs, extra = allocate(engine, R, box if engine.ensemble.variable_box else None, 0)
  state, known = init_state(engine, R, box, masses, momenta, nbrs, seed)
  return (state, nbrs, initial_aux(engine, state)), extra, known


def _regrow(engine: Engine, carry, out, extra: int):
  """After an overflow: the chunk's start carry with a larger list (and the new ``extra``)."""
  state0, nbrs0, aux0 = carry
  overflow = bool(out[0][1].did_buffer_overflow)
  box_alloc = None
  if engine.ensemble.variable_box:
    dtype = state0.position.dtype
    ref_box = np.asarray(state0.reference_box, np.float64)
    scale0 = float(jnp.exp(state0.box_position))
    # Allocate for the most compressed box of the chunk (with a margin): its pairs, its image
    # shifts (small boxes) and cells stay valid for the whole replay. A box below
    # 2 * (cutoff + dr_threshold) gets a list with periodic images (one recompilation).
    s = min(scale0, 0.98 * float(out[0][2][1]))
    box_alloc = ref_box * s
    aux0 = (jnp.asarray(s, dtype), jnp.asarray(scale0, dtype))
  extra += 1  # also grows the cell list's per-cell capacity
  capacity = math.ceil(DEFAULTS.capacity_growth * nbrs0.max_occupancy) if overflow else 0
  nbrs, extra = allocate(engine, state0.position, box_alloc, extra, capacity, like=nbrs0)
  return (state0, nbrs, aux0), extra


def advance(engine: Engine, carry, g: int, n: int, g_end: int, extra: int, limits=None):
  """Runs ``n`` steps from global step ``g``, replaying after overflows (``limits``: the
  guards' ``(max_temperature, max_force)``, default off).

  Returns ``(out, extra, reallocations)``; ``out`` is :func:`chunk_fn`'s result.
  """
  if limits is None:
    limits = no_limits(carry[0].position.dtype)
  for attempt in range(DEFAULTS.max_replays + 1):
    out = engine.chunk_fn(carry, jnp.int32(g), jnp.int32(n), jnp.int32(g_end), limits)
    nbrs = out[0][1]
    if nbrs is None or not (bool(nbrs.did_buffer_overflow) or bool(nbrs.cell_size_too_small)):
      return out, extra, attempt
    # Throw the chunk away; allocate from its start positions and replay it.
    carry, extra = _regrow(engine, carry, out, extra)
  raise RuntimeError(
    f"the neighbour list still overflowed after {DEFAULTS.max_replays} "
    f"reallocations in steps {g}..{g + n}; the system is probably "
    f"collapsing (atoms piling up); check the timestep and structure"
  )


def start_logs(engine: Engine, carry, step: int, known=None) -> dict:
  """The observables of the start state, shaped like one chunk's log buffers (one row);
  ``known``: :func:`start`'s (without it the model is evaluated again, in a program of its
  own)."""
  obs = jax.device_get(engine.observe_fn(*carry, known))
  return dict(jax.tree.map(lambda x: np.asarray(x)[None], obs), step=np.array([step]))


@dataclasses.dataclass
class Chunk:
  """One finished chunk, on the host: steps ``start..stop``, its log buffers and frames;
  ``guard`` (:mod:`plugin.md.guards` code, 0: none) and ``value``: a guard fired at step
  ``stop + 1`` and ``carry`` is the last good state (step ``stop``)."""

  start: int
  stop: int
  carry: Any
  logs: dict
  num_logs: int
  frames: Any  # device buffers (fetched only when used)
  num_frames: Any
  t_start: float  # time.perf_counter() at its start: the caller adds its output to the time
  reallocations: int  # neighbour-list reallocations (each followed by a replay)
  extra: int = 0  # the list's extra capacity after it (the next advance's ``extra``)
  guard: int = 0
  value: float = 0.0
  where: int = 0  # the replica the guard fired in (batches)
  known: Optional[dict] = None  # what the last step computed of ``carry`` (None: no step)


def simulate_chunks(
  engine: Engine, carry, first_step: int, steps: int, extra: int = 0, limits=None
):
  """Yields a :class:`Chunk` per ``chunk`` steps from ``first_step`` to ``steps``; the caller
  writes output between them. After a chunk in which a guard fired, it stops."""
  g = first_step
  while g < steps:
    n = min(engine.key.chunk, steps - g)
    t_start = time.perf_counter()
    out, extra, realloc = advance(engine, carry, g, n, steps, extra, limits)
    carry, logs, n_logs, frames, n_frames, done, code, value, where, known = out
    logs = jax.device_get(logs)
    yield Chunk(
      g,
      g + int(done),
      carry,
      logs,
      int(n_logs),
      frames,
      n_frames,
      t_start,
      realloc,
      extra,
      int(code),
      float(value),
      int(where),
      known if int(done) else None,
    )
    if int(code):
      return
    g += n
