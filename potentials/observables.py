"""Energy, per-atom energies, forces, strain derivative (stress) and its per-atom split from a
padded pair graph.

:func:`compute` is the one place where these are derived from a model: the ASE calculator,
training and :class:`potentials.Potential` go through it (JAX-MD differentiates its own energy
function, in its own sign convention, and splits per-atom virials with
:func:`atom_strain_derivatives`). Conventions: ``docs/conventions.md``. Definitions:

* ``forces = -dE/dR`` (eV/Å);
* the strain derivative ``dE/dε`` (eV) of a symmetric strain ``ε`` that deforms positions
  and cell together, ``R' = R (I + ε)``, ``cell' = cell (I + ε)``, at ``ε = 0``. On a pair
  vector ``r = R[src] - R[dst] + shift @ cell`` that is ``r' = r (I + ε)``, which is how it is
  applied (open systems included: the derivative then is the virial of the pair forces);
* ``stress = (1/V) dE/dε`` (eV/Å³), ASE's sign (a compressed crystal has negative stress),
  and 0 for a frame without volume (``V = 0``: not fully periodic);
* per-atom strain derivatives ``W_i`` (eV, ``(N, 3, 3)``, only when asked): each pair's
  ``sym(r_k (x) dE/dr_k)`` split half to ``dst[k]``, half to ``src[k]``
  (:func:`atom_strain_derivatives`), so ``sum_i W_i = dE/dε``, periodic or open, and a pair
  between an atom and its own image goes wholly to that atom. Per-atom stress is ``W_i / V``
  (ASE's ``stresses``); the virial in the sign of JAX-MD and LAMMPS is ``-W_i``.

One system has ``positions (N, 3)``, ``cell (3, 3)``; a batch of frames packed into one padded
system has ``cell (B, 3, 3)`` plus ``atom_frame (N,)`` and ``pair_frame (pairs,)``, the frame
slot of each atom and pair (padding: ``B``), and gets per-frame energies and strain
derivatives.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from . import ensemble, ops

Array = jax.Array
# ``energies_fn(r) -> (N,)``: per-atom energies from pair vectors (pairs and species fixed)
EnergiesFn = Callable[[Array], Array]


class Observables(NamedTuple):
  """What :func:`compute` returns (``None`` where not asked for).

  ``energy``: scalar, or ``(B,)`` per frame; ``energies``: ``(N,)`` per atom;
  ``forces``: ``(N, 3)``; ``strain_derivative``: ``dE/dε`` ``(3, 3)`` or ``(B, 3, 3)``;
  ``stress``: ``(1/V) dE/dε`` (needs ``volumes``); ``pair_vectors``: ``(pairs, 3)``;
  ``atom_strain_derivatives``: per-atom ``dE/dε`` ``(N, 3, 3)`` (with ``atom_strain``);
  ``member_energies`` ``(M,)`` and ``member_forces`` ``(M, N, 3)``: an ensemble's members
  (with ``members``; the other fields are then the members' mean); ``aux``: what
  ``energies_fn`` returned beside the energies (with ``aux``); ``charges``: ``(N,)`` the
  charges of a ``long_range`` term.
  """

  energy: Array
  energies: Array
  forces: Optional[Array]
  strain_derivative: Optional[Array]
  stress: Optional[Array]
  pair_vectors: Array
  atom_strain_derivatives: Optional[Array] = None
  member_energies: Optional[Array] = None
  member_forces: Optional[Array] = None
  aux: Any = None
  charges: Optional[Array] = None


class LongRange(NamedTuple):
  """What a ``long_range`` term of :func:`compute` returns: ``energies (N,)`` per atom (eV),
  ``charges (N,)`` and ``shares (N,)``, each atom's share of its frame's strain derivative
  not carried by pairs (summing to 1 over a frame's atoms; ``docs/conventions.md``)."""

  energies: Array
  charges: Array
  shares: Array


# ``long_range(positions, cell, r, aux) -> LongRange``: a term that also reads positions and
# cell (strained with the pair vectors ``r``) and what ``energies_fn`` returned beside the
# energies (a model's raw charges)
LongRangeFn = Callable[[Array, Array, Array, Any], LongRange]


def voigt(s):
  """Symmetric ``(..., 3, 3)`` as ASE's Voigt ``(..., 6)``: ``xx yy zz yz xz xy`` (NumPy or
  JAX arrays)."""
  return s[..., [0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]


def strained_cell(cell: Array, strain: Array) -> Array:
  """``cell (I + sym(strain))``: rows are lattice vectors; ``(3, 3)`` or ``(B, 3, 3)``."""
  eye = jnp.eye(3, dtype=strain.dtype)
  return cell @ (eye + 0.5 * (strain + jnp.swapaxes(strain, -1, -2)))


def strained(r: Array, strain: Array, pair_frame: Optional[Array] = None) -> Array:
  """Pair vectors ``r (I + sym(strain))``; ``strain (3, 3)``, or ``(B, 3, 3)`` per frame with
  ``pair_frame`` (padded pairs, frame ``B``, are not strained)."""
  eye = jnp.eye(3, dtype=strain.dtype)
  if pair_frame is None:
    return r @ (eye + 0.5 * (strain + strain.T))
  deform = eye + 0.5 * (strain + jnp.swapaxes(strain, 1, 2))
  deform = jnp.concatenate([deform, eye[None]])
  return jnp.einsum("ei,eij->ej", r, deform[pair_frame])


def compute(
  energies_fn: EnergiesFn,
  positions: Array,
  *,
  dst: Array,
  src: Array,
  shifts: Optional[Array] = None,
  cell: Optional[Array] = None,
  atom_frame: Optional[Array] = None,
  pair_frame: Optional[Array] = None,
  volumes: Optional[Array] = None,
  forces: bool = True,
  strain: bool = True,
  atom_strain: bool = False,
  members: Union[bool, int] = False,
  aux: bool = False,
  long_range: Optional[LongRangeFn] = None,
) -> Observables:
  """The observables of ``energies_fn`` at ``positions`` on the pair graph ``(dst, src)``.

  Args:
    energies_fn: ``r (pairs, 3) -> (N,)`` per-atom energies; padded atoms and pairs must
      contribute exactly zero (the model masks them).
    positions: ``(N, 3)``.
    dst, src, shifts, cell: the pair graph (``r = R[src] - R[dst] + shifts @ cell``).
    atom_frame, pair_frame: for a batch of frames (both, with ``cell (B, 3, 3)``).
    volumes: ``(B,)`` (batch) or scalar: also return ``stress``.
    forces: differentiate in positions (else energies only).
    strain: also differentiate in a strain (``strain_derivative``; needs ``forces``).
    atom_strain: also return ``atom_strain_derivatives`` (needs ``forces``): the gradient in
      the pair vectors comes from the same backward pass, the split costs one scatter.
    members: ``energies_fn`` returns ``(N, M)``, an ensemble's per-atom member energies:
      also return every member's energy (``(M,)``, a batch ``(B, M)``) and forces; the other
      observables are the members' mean. An int ``K > 1`` says the members are a committee
      of K independent networks (``M = K * H``, committee-major): ``energies_fn`` then also
      takes pair vectors ``(K, pairs, 3)``, one copy per network, so H backward passes give
      every member's forces (K*H cost, not (K*H)^2); else one backward pass per member.
    aux: ``energies_fn`` returns ``(energies, aux)``; ``aux`` (any pytree, not
      differentiated) comes back in ``Observables.aux``, from the same forward pass.
    long_range: a term read from positions and cell as well as from pairs (electrostatics):
      ``energies_fn`` then returns ``(energies, aux)`` and ``long_range(positions, cell, r,
      aux)`` a :class:`LongRange` whose energies are added (its charges come back in
      ``Observables.charges``). Positions and cell are strained with the pairs, so stress
      includes the term; per-atom strain derivatives get the pairs' split plus ``shares``
      of the rest of their frame's. Not with ``members`` or ``aux``.
  """
  batched = atom_frame is not None
  if batched and (pair_frame is None or cell is None or cell.ndim != 3):
    raise ValueError("a batch needs atom_frame, pair_frame and cells of shape (B, 3, 3)")
  if atom_strain and not forces:
    raise ValueError("atom_strain=True needs forces=True (it is a gradient)")
  num_frames = cell.shape[0] if batched else None
  if long_range is not None and (members or aux):
    raise ValueError("a long_range term is for one model's energies, not with members or aux")
  if long_range is not None and atom_strain and not strain:
    raise ValueError("atom_strain with a long_range term needs strain=True (its split needs it)")
  if members:
    if aux:
      raise ValueError("aux is for energies_fn of one model, not with members")
    if atom_strain and batched:
      raise ValueError("atom_strain with members is for one system, not a batch")
    frames = (atom_frame, pair_frame, num_frames) if batched else None
    committee = 1 if members is True else int(members)
    return _members(
      energies_fn,
      positions,
      dst,
      src,
      shifts,
      cell,
      volumes,
      strain,
      atom_strain,
      frames,
      committee,
    )

  def total(positions, eps, dr):
    r = ops.pair_vectors(positions, dst, src, shifts, cell, pair_frame=pair_frame)
    if eps is not None:
      r = strained(r, eps, pair_frame)
    if dr is not None:
      r = r + dr  # zero: its gradient is dE/dr per pair
    e, extra = energies_fn(r) if aux or long_range else (energies_fn(r), None)
    if long_range is not None:
      pos, box = positions, cell
      if eps is not None:
        pos = strained(positions, eps, atom_frame)
        box = strained_cell(cell, eps)
      extra = long_range(pos, box, r, extra)
      e = e + extra.energies
    per_frame = jax.ops.segment_sum(e, atom_frame, num_segments=num_frames) if batched else None
    return jnp.sum(e if per_frame is None else per_frame), (e, per_frame, r, extra)

  if not forces:
    energy, (e, per_frame, r, extra) = total(positions, None, None)
    energy = energy if per_frame is None else per_frame
    return _with_long_range(Observables(energy, e, None, None, None, r, aux=extra), long_range)
  eps = jnp.zeros((num_frames, 3, 3) if batched else (3, 3), positions.dtype) if strain else None
  dr = jnp.zeros((dst.shape[0], 3), positions.dtype) if atom_strain else None
  (energy, (e, per_frame, r, extra)), (g_pos, g_eps, g_r) = jax.value_and_grad(
    total, argnums=(0, 1, 2), has_aux=True
  )(positions, eps, dr)
  stress = None
  if strain and volumes is not None:
    stress = stress_from(g_eps, volumes)
  per_atom = None
  if atom_strain:
    per_atom = atom_strain_derivatives(r, g_r, dst=dst, src=src, num_atoms=positions.shape[0])
    if long_range is not None:
      per_atom = per_atom + rest_by_share(per_atom, g_eps, extra.shares, atom_frame)
  energy = energy if per_frame is None else per_frame
  out = Observables(energy, e, -g_pos, g_eps, stress, r, per_atom, aux=extra)
  return _with_long_range(out, long_range)


def _with_long_range(out: Observables, long_range) -> Observables:
  """The long-range term's charges in their field (``aux`` stays for ``energies_fn``'s)."""
  if long_range is None:
    return out
  return out._replace(aux=None, charges=out.aux.charges)


def rest_by_share(per_atom, strain_derivative, shares, atom_frame=None):
  """Each atom's share (``shares (N,)``, :class:`LongRange`'s) of its frame's strain
  derivative not carried by the pairs' split ``per_atom (N, 3, 3)``; ``atom_frame`` for a
  batch (``strain_derivative (B, 3, 3)``)."""
  if atom_frame is None:
    return shares[:, None, None] * (strain_derivative - jnp.sum(per_atom, axis=0))
  num = strain_derivative.shape[0]
  rest = strain_derivative - jax.ops.segment_sum(per_atom, atom_frame, num_segments=num)
  rest = jnp.take(rest, atom_frame, axis=0, mode="fill", fill_value=0.0)
  return shares[:, None, None] * rest


def _members(
  energies_fn, positions, dst, src, shifts, cell, volumes, strain, atom_strain, frames, committee
):
  """:func:`compute` for an ensemble: one forward pass, backward passes batched by ``vmap``
  over cotangents of the members' energies, means by linearity. ``frames``: ``(atom_frame,
  pair_frame, B)`` for a batch, else None; ``committee``: K independent networks, each fed its
  own copy of the positions, so one cotangent per head reaches every network at once."""
  atom_frame, pair_frame, num_frames = frames or (None, None, None)
  vectors = lambda p: ops.pair_vectors(p, dst, src, shifts, cell, pair_frame=pair_frame)
  strain_of = lambda r, eps: strained(r, eps, pair_frame)

  def totals(positions, eps, dr):
    r = vectors(positions) if committee == 1 else jax.vmap(vectors)(positions)
    if eps is not None:
      r = strain_of(r, eps) if committee == 1 else jax.vmap(strain_of, (0, None))(r, eps)
    e = energies_fn(r if dr is None else r + dr)
    if frames is None:
      return jnp.sum(e, axis=0), (e, r)
    return jax.ops.segment_sum(e, atom_frame, num_segments=num_frames), (e, r)

  eps_shape = (3, 3) if frames is None else (num_frames, 3, 3)
  eps = jnp.zeros(eps_shape, positions.dtype) if strain else None
  dr = jnp.zeros((dst.shape[0], 3), positions.dtype) if atom_strain else None
  member_e, (g_pos, g_eps, g_r), (e, r) = ensemble.member_vjp(
    totals, positions, eps, dr, committee=committee, has_aux=True
  )
  m = member_e.shape[-1]
  mean = lambda g: None if g is None else jnp.sum(g, axis=0) / m
  g_eps, g_r = mean(g_eps), mean(g_r)
  if r.ndim == 3:
    r = r[0]
  stress = stress_from(g_eps, volumes) if strain and volumes is not None else None
  per_atom = None
  if atom_strain:
    per_atom = atom_strain_derivatives(r, g_r, dst=dst, src=src, num_atoms=positions.shape[-2])
  return Observables(
    jnp.mean(member_e, axis=-1),
    jnp.mean(e, axis=1),
    -jnp.mean(g_pos, axis=0),
    g_eps,
    stress,
    r,
    per_atom,
    member_e,
    -g_pos,
  )


def atom_strain_derivatives(
  r: Array, grad_r: Array, *, dst: Array, src: Array, num_atoms: int
) -> Array:
  """Per-atom strain derivatives ``(num_atoms, 3, 3)`` (eV) from the pair vectors ``r`` and
  ``grad_r = dE/dr`` ``(pairs, 3)``: pair ``k`` contributes ``sym(r_k (x) grad_r_k)`` (the
  ``dE/dε`` of ``r' = r (I + ε)``), half to ``dst[k]`` and half to ``src[k]``; padded pairs
  (ends ``>= num_atoms``) are dropped. The rows sum to the total ``dE/dε``."""
  w = r[:, :, None] * grad_r[:, None, :]
  half = 0.25 * (w + jnp.swapaxes(w, 1, 2))
  ends = jnp.concatenate([dst, src])
  return jax.ops.segment_sum(jnp.concatenate([half, half]), ends, num_segments=num_atoms)


def stress_from(strain_derivative: Array, volumes: Array) -> Array:
  """``(1/V) dE/dε``, and 0 where ``V`` is 0 (frames that are not fully periodic)."""
  volumes = jnp.asarray(volumes)
  vol = jnp.where(volumes > 0, volumes, 1.0)[..., None, None]
  return jnp.where((volumes > 0)[..., None, None], strain_derivative / vol, 0.0)
