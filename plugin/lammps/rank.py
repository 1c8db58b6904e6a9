"""The model on one LAMMPS rank: energies, forces and virial from local + ghost rows.

LAMMPS gives each rank its own atoms (``nlocal`` rows) and copies of every atom within the
ghost cutoff of its subdomain (the ghost rows, Cartesian images with the periodic shifts
already applied). The pair style asks for a ghost cutoff of one model cutoff plus LAMMPS'
skin, and the model runs hop by hop (``Potential.stage_fn``), on pairs centred on local rows
only:

* stage ``s`` gives new features of the local atoms; the pair style's forward communication
  copies them to their ghost rows on every rank (:meth:`RankEvaluator.compute` yields to let
  it run), and stage ``s + 1`` reads them. The rank's energy is the sum of its local atoms'
  energies (every atom's energy is counted on exactly one rank);
* the backward pass runs the stages in reverse (each stage's ``jax.vjp``, kept from the
  forward pass): the gradient in a stage's input features on ghost rows is summed into their
  owners by reverse communication before the owner's stage is differentiated. Forces are
  ``-dE/dR`` of every row, as gradients of all stages; LAMMPS adds the ghost rows' forces to
  their owners;
* the virial is ``-dE/dε``: every stage's gradient in the pair vectors, summed per pair, then
  one strain derivative of the pair vectors (a ghost row's features come from its owner's
  stages, which see the same strain); LAMMPS sums it over ranks.

So each rank computes pairs of its own atoms only, whatever the model's receptive field.
Along a periodic direction that LAMMPS does not divide among ranks (processor grid 1 there,
e.g. y and z with ``processors * 1 1``, or every direction on one rank) the ghosts are only
periodic images of the rank's own rows. There the rank keeps one row per atom and image along
the divided directions (local rows first), and the neighbour list is periodic along the
undivided directions, as the ASE calculator's is: exact, and those ghosts are neither
evaluated nor read. Forces on the dropped rows are zero; their atoms' forces reach the kept
row through the periodic shifts. On one rank of a brick layout (processor grid 1 1 1) and for
a one-stage model (whose receptive field is one cutoff), the whole model runs at once on all
kept rows, pairs centred on ghosts included (the ASE calculator's jitted function), and
nothing is exchanged. Exchanges are collective: every rank makes this choice alike, from the
processor grid, and a rank without atoms still takes part.

Shapes are padded as in the ASE calculator (atom ladder, pair capacity buckets), so a LAMMPS
run compiles a few times at the start and rarely after; ``compilations`` counts them.
Per-element reference energies are added in float64 on the host.
"""

from __future__ import annotations

from typing import Any, Generator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import potentials
from potentials import elements, observables
from plugin.defaults import DEFAULTS
from potentials.ops import pair_vectors
from plugin import host
from plugin.host import atom_capacity, device_params, resolve_dtype
from plugin.neighbors import NeighborListBuilder
from plugin.registry import COMPILED

__all__ = ["RankEvaluator", "keep_rows", "lammps_cell"]

# (energy, rows, forces on them, virial xx yy zz xy xz yz, local atoms' energies)
Result = tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def lammps_cell(box: Sequence[float]) -> np.ndarray:
  """Cell rows ``a, b, c`` of a LAMMPS box ``(xprd, yprd, zprd, xy, xz, yz)``."""
  lx, ly, lz, xy, xz, yz = (float(v) for v in box)
  return np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]])


class RankEvaluator:
  """Evaluates ``potential`` for the rows LAMMPS holds on one rank.

  Args:
    potential: the model.
    type_elements: element symbol of each LAMMPS atom type (``pair_coeff * * Cu``), in type
      order.
    dtype: ``"float32"`` (default) or ``"float64"`` (needs JAX's x64 mode).
    min_distance: raise when two rows are closer than this (Å); 0 or None: no check.

  Attributes:
    cutoff: the interaction range LAMMPS must cover with ghosts (one model cutoff).
    widths: doubles per row of each exchanged feature array (``num_stages - 1`` of them);
      ``width``: the widest (0 for a one-stage model).
    compilations: calls that built programs (new shapes; a staged call builds one per stage).
    rows, local: rows evaluated and local atoms, summed over calls (``rows / local`` is the
      ghost overhead).
  """

  def __init__(
    self,
    potential: potentials.Potential,
    *,
    type_elements: Sequence[str],
    dtype: Any = DEFAULTS.dtype,
    min_distance: float | None = DEFAULTS.min_distance,
  ) -> None:
    self.potential = potential
    self.dtype = resolve_dtype(dtype)
    numbers = [elements.atomic_number(s) for s in type_elements]
    # LAMMPS types are 1-based; index 0 is never used
    self.type_species = np.concatenate([[0], potential.species_index(numbers)]).astype(np.int32)
    self.cutoff = potential.cutoff
    self.min_distance = float(min_distance or 0.0)
    self.neighbors = NeighborListBuilder(potential.cutoff, shift_dtype=self.dtype)
    self.atom_capacity: int | None = None
    self.compilations = self.rows = self.local = 0
    self._params = device_params(potential, self.dtype)
    self._shifts = potential.element_shifts
    self._evaluator = host.shared_evaluator(potential, self.dtype, uncertainty=False)
    self._stages = _shared_stages(potential)
    self.widths = self._stages.widths
    self.width = max(self.widths, default=0)

  def compute(
    self,
    x: np.ndarray,
    types: np.ndarray,
    tags: np.ndarray,
    nlocal: int,
    *,
    box: Sequence[float],
    periodicity: Sequence[int],
    procgrid: Sequence[int],
    features: np.ndarray | None = None,
  ) -> Generator[int, None, Result]:
    """The rank's ``(energy, rows, forces, virial, energies)``: the local atoms' energy (eV),
    the indices of the evaluated rows and their forces (``(len(rows), 3)``), the virial
    ``-dE/dε`` (``xx yy zz xy xz yz``, eV) and the local atoms' energies; ``procgrid``:
    ranks along x, y, z (0 0 0: treat every direction as divided).

    A generator: it returns that result (``StopIteration.value``) after yielding, unless the
    processor grid is 1 1 1 or the model has one stage, the width of each of the
    ``2 * len(widths)`` exchanges of ``features`` (``(len(x), width)`` float64, LAMMPS'
    per-row buffer) that must happen before it is resumed: forward communication (owners'
    rows copied to their ghosts) for the first half, reverse communication (ghost rows added
    to their owners) for the second."""
    cell = lammps_cell(box)
    pbc = np.asarray(periodicity, bool) & (np.asarray(procgrid) == 1)
    if pbc.all():  # one rank, fully periodic: every ghost is an image of a local atom
      rows = np.arange(nlocal)
    elif pbc.any():
      rows = keep_rows(x, tags, nlocal, cell, pbc)
    else:
      rows = np.arange(len(x))
    self.rows += len(rows)
    self.local += nlocal
    # one rank (its ghosts are periodic images, dropped above) or a one-hop model: the whole
    # model at once. Every rank decides alike: exchanges are collective.
    exchanging = not np.all(np.asarray(procgrid) == 1) and bool(self.widths)
    if len(rows) == 0:  # an empty subdomain still takes part in every exchange
      for w in self.widths + self.widths[::-1] if exchanging else []:
        yield w
      return 0.0, rows, np.zeros((0, 3)), np.zeros(6), np.zeros(0)
    cell = np.where(pbc[:, None], cell, 0.0)  # open directions need no cell vector
    species = self.type_species[types[rows]]
    positions = host.reference_positions(x[rows], cell, pbc)
    n = len(rows)
    previous = self.atom_capacity
    na = self.atom_capacity = atom_capacity(n, previous)
    if previous is not None and na != previous:
      self.neighbors.reset_capacity()  # a new atom axis compiles anyway: refit the pairs too
    # with exchanges, only pairs centred on local atoms (ghost rows are neighbours only)
    pairs = self.neighbors.build(positions, cell, pbc, centres=nlocal if exchanging else None)
    dst, src, shifts, num_pairs = pairs.dst, pairs.src, pairs.shifts, pairs.num_pairs
    dst[num_pairs:] = na  # padding index: the padded atom count
    src[num_pairs:] = na
    padded_species = np.zeros(na, np.int32)
    padded_species[:n] = species
    pos = np.zeros((na, 3), self.dtype)
    pos[:n] = positions
    local = np.arange(na) < nlocal  # ghost rows are neighbours only: no energy of their own
    args = (padded_species, pos, cell.astype(self.dtype), dst, src, shifts, local)
    if not exchanging:
      traces = self._evaluator.traces
      out = self._evaluator.fn(self._params, *args)
      self.compilations += self._evaluator.traces - traces
      e_model, forces, de, _, d2, closest, _ = jax.device_get(out)  # per-atom virials, spread
    else:
      e_model, forces, de, d2, closest = yield from self._staged(args, rows, nlocal, features)
    if num_pairs and self.min_distance and d2 < self.min_distance**2:
      raise ValueError(
        f"atoms {int(tags[rows[dst[closest]]])} and {int(tags[rows[src[closest]]])} "
        f"are only {float(np.sqrt(d2)):.3g} Å apart, closer than min_distance = "
        f"{self.min_distance:g} Å; check the structure and time step, or give "
        "min_distance 0 in the pair_style line to skip this check"
      )
    energies = e_model[:nlocal].astype(np.float64) + self._shifts[species[:nlocal]]
    forces = forces[:n].astype(np.float64)
    energy = float(np.sum(energies))
    host.check_finite(energy, forces)
    de = np.asarray(de, np.float64)
    virial = -np.array([de[0, 0], de[1, 1], de[2, 2], de[0, 1], de[0, 2], de[1, 2]])
    return energy, rows, forces, virial, energies

  def _staged(self, args, rows, nlocal, features):
    """Stage by stage with feature exchanges (module docstring); yields exchange widths,
    returns ``(energies, forces, dE/dε, closest d², its pair)``."""
    if features is None:
      raise ValueError("ranks that exchange features need LAMMPS' feature buffer")
    stages, widths, n = self._stages, self.widths, len(rows)
    species, positions, cell, dst, src, shifts, local = args
    na = len(species)
    traces = stages.traces
    r, r_vjp, closest = stages.pairs(positions, cell, dst, src, shifts)
    inputs = (self._params, species, dst, src, local, r)
    backward, x = [], None
    for s, w in enumerate(widths):
      out, vjp = stages.forward[s](*inputs, x)
      backward.append(vjp)
      features[:nlocal, :w] = jax.device_get(out)[:nlocal]
      yield w  # forward communication: owners' features to their ghost rows
      x = np.zeros((na, w), self.dtype)
      x[:n] = features[rows, :w]
    # the last stage's forward and backward passes in one program (no residuals stored)
    energies, (g_r, g_x) = stages.last(*inputs, x)
    grads = [g_r]
    for s in reversed(range(len(widths))):
      w = widths[s]
      features[:, :w] = 0.0  # rows dropped or not read get no gradient
      features[rows, :w] = jax.device_get(g_x)[:n]
      yield w  # reverse communication: ghost rows' gradients added to their owners
      cotangent = np.zeros((na, w), self.dtype)
      cotangent[:nlocal] = features[:nlocal, :w]
      g_r, g_x = stages.backward(backward[s], cotangent)
      grads.append(g_r)
    grad_pos, grad_eps = stages.finish(r_vjp, grads)
    self.compilations += int(stages.traces > traces)  # one per new shape, as unstaged
    return jax.device_get((energies, -grad_pos, grad_eps, *closest))


class _Stages:
  """The jitted stages of one architecture, shared by rank evaluators.

  ``pairs(positions, cell, dst, src, shifts)`` returns the pair vectors (strained by a zero
  strain), their VJP in ``(positions, strain)`` and the closest real pair's squared distance
  and index. ``forward[s](params, species, dst, src, atom_mask, r, x)`` for every stage but
  the last returns its output features, flattened to ``(N, width)`` rows, and their VJP in
  ``(r, x)``; ``backward(vjp, cotangent)`` applies one. ``last(...)`` (same arguments)
  returns the per-atom energies and the gradient of their sum in ``(r, x)`` from one program.
  ``finish(pairs_vjp, grads)`` sums the stages' gradients in ``r`` per pair (so the strain
  derivative is one sum over pairs, as the whole model's) into ``(dE/dR, dE/dε)``.
  """

  def __init__(self, potential: potentials.Potential) -> None:
    self.traces = 0  # programs built so far
    self.widths, shapes = _feature_shapes(potential)
    stages = [self._stage(potential, s, shapes) for s in range(potential.num_stages)]
    self.pairs = jax.jit(self._counted(_pairs))
    self.forward = [jax.jit(self._counted(f)) for f in stages[:-1]]
    self.backward = jax.jit(self._counted(lambda vjp, cotangent: vjp(cotangent)))

    def last_with_gradient(*args):
      energies, vjp = stages[-1](*args)
      return energies, vjp(jnp.ones_like(energies))  # ghost and padded rows are masked

    self.last = jax.jit(self._counted(last_with_gradient))
    self.finish = jax.jit(self._counted(lambda vjp, grads: vjp(sum(grads[1:], grads[0]))))

  def _counted(self, fn):
    def traced(*args):
      self.traces += 1  # runs when jit traces, i.e. builds a program
      return fn(*args)

    return traced

  @staticmethod
  def _stage(potential, s, shapes):
    """Stage ``s``: ``(params, species, dst, src, atom_mask, r, x) -> (output, VJP in (r,
    x))``."""
    fn = potential.stage_fn(s)
    last = s == potential.num_stages - 1
    committee = potential.config.committee

    def flat(y):  # (K, N, ...) or (N, ...) -> (N, width)
      y = jnp.moveaxis(y, 0, 1) if committee > 1 else y
      return y.reshape(y.shape[0], -1)

    def unflat(x):  # inverse of flat for stage s's input
      if x is None:
        return None
      y = x.reshape(x.shape[0], *shapes[s - 1])
      return jnp.moveaxis(y, 1, 0) if committee > 1 else y

    def stage(params, species, dst, src, atom_mask, r, x):
      def run(r, x):
        out = fn(
          params,
          species,
          r,
          dst,
          src,
          features=unflat(x),
          atom_mask=atom_mask,
          indices_are_sorted=True,
        )
        return out if last else flat(out)

      return jax.vjp(run, r, x)

    return stage


def _pairs(positions, cell, dst, src, shifts):
  """Strained pair vectors ``r``, their VJP in ``(positions, strain)``, and the closest real
  pair's ``(d², index)``, for the overlap check on the host."""

  def run(positions, strain):
    return observables.strained(pair_vectors(positions, dst, src, shifts, cell), strain)

  r, vjp = jax.vjp(run, positions, jnp.zeros((3, 3), positions.dtype))
  d2 = jnp.where(dst < positions.shape[0], jnp.sum(r * r, axis=-1), jnp.inf)
  return r, vjp, (jnp.min(d2), jnp.argmin(d2))


def _feature_shapes(potential: potentials.Potential) -> tuple[list[int], list[tuple]]:
  """Per-row width and shape (after the atom axis; a committee's member axis first) of the
  features each stage but the last hands on."""
  species = jnp.zeros(1, jnp.int32)
  none = jnp.zeros(0, jnp.int32)
  r = jnp.zeros((0, 3), jnp.float32)
  x, widths, shapes = None, [], []
  for s in range(potential.num_stages - 1):
    x = jax.eval_shape(
      lambda p, x, s=s: potential.stage_fn(s)(p, species, r, none, none, features=x),
      potential.params,
      x,
    )
    shape = x.shape[1:] if potential.config.committee == 1 else (x.shape[0], *x.shape[2:])
    shapes.append(tuple(shape))
    widths.append(int(np.prod(shape)))
  return widths, shapes


def _shared_stages(potential: potentials.Potential) -> _Stages:
  # jit compiles per dtype and shape itself; the stages depend on the architecture only
  key = (potential.config, tuple(potential.species))
  return COMPILED.get("lammps-stages", key, lambda: _Stages(potential))


def keep_rows(
  x: np.ndarray, tags: np.ndarray, nlocal: int, cell: np.ndarray, periodic: np.ndarray
) -> np.ndarray:
  """Indices of one row per atom and image along the non-``periodic`` directions (the local
  row where there is one), in row order (local rows are the first ``nlocal``).

  Copies of one atom differ by whole lattice vectors, so their fractional coordinates differ
  by integers: relative to any one copy (the first row with that tag), the rounded
  differences along the other directions tell images apart; those along ``periodic`` ones
  are ignored (the periodic list makes the images).
  """
  if len(x) == 0:
    return np.zeros(0, np.int64)
  frac = x @ np.linalg.inv(cell)
  _, first, inverse = np.unique(tags, return_index=True, return_inverse=True)
  image = np.rint(frac - frac[first[inverse.ravel()]]).astype(np.int64)
  image[:, periodic] = 0
  base = 2 * int(np.abs(image).max()) + 1  # one integer key per (tag, image)
  key = tags.astype(np.int64)
  for d in range(3):
    key = key * base + image[:, d] + base // 2
  _, keep = np.unique(key, return_index=True)  # first occurrence: local rows win
  keep = np.sort(keep)
  if np.count_nonzero(keep < nlocal) != nlocal:
    raise ValueError("two local atoms share an atom ID; give every atom its own ID")
  return keep
