"""The equivariant self-attention energy model and its configuration.

``EnergyModel`` maps (species indices, pair vectors, pair list) to per-atom energies. It is a
pure flax module; :class:`potentials.Potential` bundles it with parameters, species and
metadata. Units: eV and Å.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import deprecation
from . import radial as radial_lib
from .attention import SelfAttention
from .electrostatics import COULOMB
from .force_readout import ForceReadout
from .layers import Dense, Embed, Gate, Tensor, change_max_degree_or_type, max_degree_of
from .so3 import safe_norm

RADIAL_FUNCTIONS = ("reciprocal_bernstein", "bessel", "gaussian")
CUTOFF_FUNCTIONS = ("smooth", "cosine")
RENAMED = {"heads": "readout_heads"}  # ModelConfig's old field names (keywords, file keys)


@deprecation.renamed_fields(**RENAMED)
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of :class:`EnergyModel` (every field is stored in model files).

  Attributes:
    cutoff: pair cutoff radius in Å; the energy is C-infinity in positions for the 'smooth'
      cutoff function (C1 for 'cosine').
    features: feature channels per irrep.
    max_degree: highest degree l of equivariant features and of the angular basis.
    num_iterations: number of (SelfAttention + residual + equivariant MLP) blocks.
    num_heads: attention heads (must divide ``features``).
    num_basis: radial basis functions.
    radial: radial basis: 'reciprocal_bernstein', 'bessel' or 'gaussian'.
    cutoff_function: 'smooth' (exp(1 - 1/(1 - (r/rc)^2))) or 'cosine'.
    include_pseudotensors: keep odd-parity (pseudotensor) channels (P = 2; about 2x cost).
    use_fused_tensor: factorised tensor-product weights in attention (fewer parameters).
    repulsion: add a ZBL screened nuclear repulsion, switched off smoothly at
      ``repulsion_cutoff``, so MD stays stable when atoms get closer than in any training data.
    repulsion_cutoff: where the repulsion reaches zero (Å).
    density_features: add a per-atom neighbour density to the initial scalar features:
      ``rho_i = sum_j cut(r_ij) g(r_ij) (x) onehot(s_j)`` (radial basis ``g`` times neighbour
      species), mapped linearly to the feature channels. Softmax attention averages over
      neighbours and so cannot count them; without this, energies of under-coordinated atoms
      (surfaces, vacancies) are off by ~10 meV/atom. Model files written before this option
      existed load with it off.
    product: after each block's attention, add a learned equivariant tensor product of the
      atom's features with themselves (``Dense(Tensor(Dense(z), Dense(z)))``, per atom). A
      softmax average over neighbours is linear in the neighbours' values; the product
      raises the body order of each block (as symmetric products do in MACE-class models).
      Off by default: on ethanol it costs ~50 % more training time per epoch and trained
      worse at equal time (benchmarks/training_ablation.py).
    radial_mlp: width of a per-block radial MLP (0: off). Off, each block's attention filters
      and query-key encodings are linear in the ``num_basis`` radial functions; on, each block
      first maps them through ``Dense(w) -> silu -> Dense(w) -> silu -> Dense(w)`` (times the
      cutoff, so smoothness at the cutoff is kept), giving filters nonlinear in ``r`` with
      ``w`` radial channels (as the radial networks of NequIP/MACE-class models). Off by
      default: with w = 32 on ethanol an epoch took 2.4x as long and the model trained worse
      at equal time (benchmarks/training_ablation.py). Old model files load with it off.
    readout_heads: readout heads on the shared network (a *shallow ensemble*:
      ``readout_heads`` members that differ only in their last layer; not the attention's
      ``num_heads``). With more than one, :class:`EnergyModel` returns ``(N, readout_heads)``
      per-atom energies; a :class:`potentials.Potential` averages them and reads their spread
      as an uncertainty (:mod:`potentials.ensemble`). Costs one extra backward pass per head
      where member forces are asked for (see ``force_heads``). Its old name ``heads`` (keyword,
      attribute, model-file key) still works, deprecated.
    force_heads: with ``readout_heads > 1``, every head also reads out its member's force deviation
      from the mean force (:class:`potentials.force_readout.ForceReadout`, a pass over the
      pairs in the forward pass), so the force uncertainty costs no backward pass per head.
      The readout does not change energies or forces; after training it is fitted to the
      members' differentiated deviations. Off by default; old model files load with it off.
    electrostatics: learnt charges and their long-range electrostatics: a per-atom charge
      read out of the last scalar features (``charge_hidden``, ``charge_out``), made to sum to
      the structure's total charge (``atoms.info["charge"]``, default 0) and interacting as
      Gaussians of width ``charge_width`` (:mod:`potentials.electrostatics`: the open sum, or
      Ewald in periodic cells with its real-space part on the model's own pairs, so the
      model's cutoff is its real-space cutoff, and ``ewald_accuracy`` setting the split). The
      charges are trained from energies and forces alone. Single models for now
      (``readout_heads = committee = 1``); old model files load with it off.
    charge_width: the charges' Gaussian width ``sigma`` (Å): two interact through ``erf(r / 2
      sigma) / r``, the Coulomb law beyond ~4 sigma, finite at contact.
    charge_transfer: the charges move between atoms within the cutoff: each atom reads out an
      electronegativity ``chi_i`` and receives ``(chi_j - chi_i) fc(r_ij)`` from every
      neighbour (``fc``: the model's cutoff function), so the charges of a neutral structure
      sum to zero exactly and a neutral molecule farther than the cutoff from the rest stays
      neutral (the per-atom read-out shares a structure's excess over all its atoms, so two
      far-apart molecules could exchange charge, a long-range error of its own). A total
      charge is then shared by the learnt weights alone, which measured worse for an ion
      (ammonium-water, docs' benchmarks), so it is off by default (the per-atom read-out).
    ewald_accuracy: truncation of the Ewald sums, relative to the pair energy at the cutoff
      (``potentials.electrostatics.ewald_parameters``).
    committee: independently initialised (and trained) parameter sets of this architecture,
      stacked on a leading axis of every parameter (a *committee*; about ``committee`` times
      the cost). 1: one parameter set, no stacked axis (every file written before ensembles).
  """

  cutoff: float = 5.0
  # L = 1 with 48 channels, not L = 2 with 32: about half the time per epoch, and it trained
  # better at equal time on ethanol and on two systems nobody tuned for (an H C N O molecule
  # and a Ni-Al alloy: benchmarks/recipe_check.py, README)
  features: int = 48
  max_degree: int = 1
  num_iterations: int = 3
  num_heads: int = 2
  num_basis: int = 16
  radial: str = "reciprocal_bernstein"
  cutoff_function: str = "smooth"
  include_pseudotensors: bool = False
  use_fused_tensor: bool = False
  repulsion: bool = True
  repulsion_cutoff: float = 1.0
  density_features: bool = True
  product: bool = False
  radial_mlp: int = 0
  readout_heads: int = 1
  committee: int = 1
  force_heads: bool = False
  electrostatics: bool = False
  charge_width: float = 1.0
  charge_transfer: bool = False
  ewald_accuracy: float = 1e-6

  def __post_init__(self):
    checks = [
      (self.cutoff > 0, f"cutoff must be > 0 Å, got {self.cutoff}"),
      (self.features > 0, f"features must be > 0, got {self.features}"),
      (self.max_degree >= 0, f"max_degree must be >= 0, got {self.max_degree}"),
      (self.num_iterations >= 1, f"num_iterations must be >= 1, got {self.num_iterations}"),
      (
        self.num_heads >= 1 and self.features % self.num_heads == 0,
        f"num_heads ({self.num_heads}) must divide features ({self.features})",
      ),
      (self.num_basis >= 1, f"num_basis must be >= 1, got {self.num_basis}"),
      (self.readout_heads >= 1, f"readout_heads must be >= 1, got {self.readout_heads}"),
      (self.committee >= 1, f"committee must be >= 1, got {self.committee}"),
      (
        not self.force_heads or (self.readout_heads > 1 and self.committee == 1),
        "force_heads reads out the members of a shallow ensemble: it needs readout_heads > 1 "
        "and committee = 1 (a committee's member forces cost no extra), got "
        f"readout_heads={self.readout_heads}, "
        f"committee={self.committee}",
      ),
      (
        not self.electrostatics or (self.readout_heads == 1 and self.committee == 1),
        "electrostatics is for single models for now (readout_heads = committee = 1), got "
        f"readout_heads={self.readout_heads}, committee={self.committee}",
      ),
      (self.charge_width > 0, f"charge_width must be > 0 Å, got {self.charge_width}"),
      (
        0 < self.ewald_accuracy < 1,
        f"ewald_accuracy must be in (0, 1), got {self.ewald_accuracy}",
      ),
      (self.radial_mlp >= 0, f"radial_mlp must be >= 0 (0: off), got {self.radial_mlp}"),
      (self.radial in RADIAL_FUNCTIONS, f"radial must be one of {RADIAL_FUNCTIONS}"),
      (
        self.cutoff_function in CUTOFF_FUNCTIONS,
        f"cutoff_function must be one of {CUTOFF_FUNCTIONS}",
      ),
      (
        not self.repulsion or 0 < self.repulsion_cutoff <= self.cutoff,
        "repulsion_cutoff must be in (0, cutoff]",
      ),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(msg)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    d = deprecation.rename_keys(d, RENAMED, quiet=True)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(
        f"unknown model config keys {sorted(unknown)}; this eqattn knows "
        f"{sorted(known)} (is the model file from a newer eqattn?)"
      )
    # files older than an option: the model without it
    d = {"density_features": False, "product": False, "radial_mlp": 0, **d}
    return cls(**d)

  @property
  def heads(self) -> int:
    """Deprecated name of :attr:`readout_heads`."""
    deprecation.warn("ModelConfig.heads", "ModelConfig.readout_heads")
    return self.readout_heads

  @property
  def num_stages(self) -> int:
    """Hops over the pair graph from species to energies: ``num_iterations`` attention
    blocks, plus one for the neighbour density of the initial features. Each stage reads
    only neighbours within ``cutoff`` (see ``EnergyModel``'s ``stage``)."""
    return self.num_iterations + int(self.density_features)

  @property
  def receptive_field(self) -> float:
    """How far (Å) an atom's energy reaches: ``num_stages`` hops of ``cutoff``."""
    return self.num_stages * self.cutoff

  def radial_fn(self):
    if self.radial == "reciprocal_bernstein":
      return radial_lib.reciprocal_bernstein
    fn = {"bessel": radial_lib.bessel, "gaussian": radial_lib.gaussian}[self.radial]
    return functools.partial(fn, cutoff=self.cutoff)

  def cutoff_fn(self):
    fn = {"smooth": radial_lib.smooth_cutoff, "cosine": radial_lib.cosine_cutoff}
    return functools.partial(fn[self.cutoff_function], cutoff=self.cutoff)


# ZBL universal screening function: sum_i c_i exp(-d_i r/a).
_ZBL_C = (0.18175, 0.50986, 0.28022, 0.02817)
_ZBL_D = (3.19980, 0.94229, 0.40290, 0.20162)
# the least weight of an atom in the neutralisation of learnt charges (keeps sums positive)
CHARGE_WEIGHT_FLOOR = 1e-3


def zbl_pair_energy(r: jax.Array, z1: jax.Array, z2: jax.Array, r_off: float) -> jax.Array:
  """ZBL repulsion between nuclear charges z1, z2 at distance r (eV), times a smooth switch
  that is 1 at r = 0 and reaches 0 (with all derivatives) at ``r_off``. Finite at r = 0 pairs
  only because callers never pass real pairs at r = 0; padded pairs are masked by callers."""
  a = 0.46850 / (z1**0.23 + z2**0.23)
  safe_r = jnp.where(r > 0, r, 1.0)
  x = safe_r / a
  phi = sum(c * jnp.exp(-d * x) for c, d in zip(_ZBL_C, _ZBL_D))
  e = COULOMB * z1 * z2 / safe_r * phi
  return jnp.where(r > 0, e * radial_lib.smooth_cutoff(safe_r, r_off), 0.0)


class _Product(nn.Module):
  """``z (N, P, (L+1)**2, F) -> Dense(Tensor(Dense(z), Dense(z)))`` truncated to
  ``max_degree``: per-atom equivariant products (higher body order)."""

  max_degree: int
  include_pseudotensors: bool

  @nn.compact
  def __call__(self, z):
    f = z.shape[-1]
    t = Tensor(
      max_degree=self.max_degree, include_pseudotensors=self.include_pseudotensors, name="tensor"
    )(Dense(f, name="left")(z), Dense(f, name="right")(z))
    # zero-initialised output: a new model starts as the one without products (stable start)
    return Dense(f, use_bias=False, kernel_init=nn.initializers.zeros, name="out")(t)


class _RadialMLP(nn.Module):
  """``rbf (pairs, K) -> (pairs, width)``: smooth nonlinear radial channels for one block."""

  width: int

  @nn.compact
  def __call__(self, rbf):
    h = nn.silu(nn.Dense(self.width, name="hidden_0")(rbf))
    h = nn.silu(nn.Dense(self.width, name="hidden_1")(h))
    return nn.Dense(self.width, name="out")(h)


class _Pairs(NamedTuple):
  """One call's pair data: ``ylm``, ``rbf``, their product times the cutoff (``basis``), the
  cutoff (zero on padding pairs), which pairs are real, and the segment-sum keywords."""

  ylm: jax.Array
  rbf: jax.Array
  basis: jax.Array
  cut: jax.Array
  valid: jax.Array
  kw: dict


class EnergyModel(nn.Module):
  """Per-atom energies from species and pairs, as named methods.

  ``E_i = scale[s_i] * (f(i) - f(lone atom of species s_i)) + shift[s_i]``, so ``shift`` is the
  energy of an isolated atom and ``scale`` the energy scale of the learned part.

  Inputs: ``species (N,)`` indices into the model's species list, ``atomic_numbers (S,)``
  (constant table, for the repulsion), ``r (pairs, 3)`` pair vectors ``R[src] - R[dst]``,
  ``dst_idx``/``src_idx (pairs,)`` with padding index N, ``atom_mask (N,)`` (False for padded
  atoms).

  * :meth:`energies`: ``(N,)`` per-atom energies (eV), ``(N, heads)`` with several readout
    heads; padded atoms get exactly 0. With ``include_shift=False`` the per-element shifts are
    left out (add ``shift[species]`` in float64 to keep float32 runs from rounding energies of
    ~1e3 eV per atom).
  * :meth:`with_member_forces` (needs ``force_heads``): ``(energies (N, heads), deviations (N,
    heads, 3))``, every member's force deviation from the mean force (eV/Å,
    :mod:`potentials.force_readout`).
  * :meth:`stage` (a domain decomposition that exchanges features between hops, LAMMPS): hop
    ``s`` (``0 <= s < config.num_stages``) only. Stage 0 starts from ``species``; a later
    stage takes ``features``, the previous stage's output ``(N, P, (L+1)**2, F)``. Every stage
    but the last returns its output features (rows of atoms that are no pair's ``dst`` are
    meaningless there); the last returns the per-atom energies as :meth:`energies` does.
    Chaining all stages equals the whole model.
  * the pieces they are made of: :meth:`pairs`, :meth:`initial_features`, :meth:`block`,
    :meth:`head`.

  Calling the module (``apply`` without ``method``) gives :meth:`energies`; the flags
  ``member_forces=`` and ``stage=``/``features=`` of earlier releases still select the other
  two.
  """

  config: ModelConfig
  num_species: int

  def setup(self):
    cfg = self.config
    self.embed = Embed(self.num_species, cfg.features)
    self.density = nn.Dense(cfg.features, use_bias=False) if cfg.density_features else None
    for it in range(cfg.num_iterations):  # the names model files store
      degree, pseudo = self._block_degree(it)
      attention = SelfAttention(
        max_degree=degree,
        num_heads=cfg.num_heads,
        include_pseudotensors=pseudo,
        use_fused_tensor=cfg.use_fused_tensor,
      )
      setattr(self, f"attention_{it}", attention)
      setattr(self, f"mlp_{it}_in", Dense(cfg.features))
      setattr(self, f"mlp_{it}_gate", Gate())
      setattr(self, f"mlp_{it}_out", Dense(cfg.features))
      if cfg.product:
        setattr(self, f"product_{it}", _Product(degree, pseudo))
      if cfg.radial_mlp:
        setattr(self, f"radial_{it}", _RadialMLP(cfg.radial_mlp))
    self.readout_hidden = nn.Dense(cfg.features)
    self.readout = nn.Dense(cfg.readout_heads)
    self.scale = self.param("scale", nn.initializers.ones, (self.num_species,), jnp.float32)
    self.shift = self.param("shift", nn.initializers.zeros, (self.num_species,), jnp.float32)
    if cfg.force_heads:
      self.force_readout = ForceReadout(cfg.readout_heads)
    if cfg.electrostatics:
      self.charge_hidden = nn.Dense(cfg.features)
      self.charge_out = nn.Dense(2)  # a raw charge and its weight in the neutralisation

  def _block_degree(self, it: int):
    """``(degree, pseudotensors)`` of block ``it``: the last keeps only scalars (read out)."""
    last = it == self.config.num_iterations - 1
    return (0 if last else self.config.max_degree), self.config.include_pseudotensors and not last

  def pairs(self, r, dst_idx, src_idx, num_atoms: int, indices_are_sorted: bool) -> _Pairs:
    """The angular and radial basis of the pairs ``r (pairs, 3)``."""
    cfg = self.config
    valid = (dst_idx < num_atoms) & (src_idx < num_atoms)
    ylm, rbf, cut = radial_lib.basis_parts(
      r,
      max_degree=cfg.max_degree,
      num=cfg.num_basis,
      radial_fn=cfg.radial_fn(),
      cutoff_fn=cfg.cutoff_fn(),
    )
    basis = radial_lib.combine(ylm, rbf * cut[:, None])
    kw = dict(
      dst_idx=dst_idx,
      src_idx=src_idx,
      num_segments=num_atoms,
      indices_are_sorted=indices_are_sorted,
    )
    return _Pairs(ylm, rbf, basis, jnp.where(valid, cut, 0), valid, kw)

  def initial_features(self, species, p: _Pairs, dtype):
    """``(N, 1, 1, F)`` species embedding, plus the neighbour density where configured."""
    x = self.embed(species).astype(dtype)
    if self.density is not None:
      rho = _neighbour_density(species, p.basis, p.cut, num_species=self.num_species, **p.kw)
      x = x.at[:, 0, 0, :].add(self.density(rho))
    return x

  def block(self, it: int, x, p: _Pairs):
    """Attention block ``it``: self-attention over the pairs, residual, equivariant MLP."""
    degree, _ = self._block_degree(it)
    radial = getattr(self, f"radial_{it}", None) if self.config.radial_mlp else None
    b = p.basis if radial is None else radial_lib.combine(p.ylm, radial(p.rbf) * p.cut[:, None])
    y = getattr(self, f"attention_{it}")(x, b, p.cut, **p.kw)
    pseudo = y.shape[-3] == 2
    if not self.config.product:
      x = change_max_degree_or_type(x, degree, pseudo) + y
    else:  # the product reads all degrees, also in a last block that keeps only scalars
      L_z = max(max_degree_of(x.shape), degree)
      z = change_max_degree_or_type(x, L_z, pseudo) + change_max_degree_or_type(y, L_z, pseudo)
      x = change_max_degree_or_type(z, degree) + getattr(self, f"product_{it}")(z)
    mlp = (getattr(self, f"mlp_{it}_{part}") for part in ("in", "gate", "out"))
    mlp_in, gate, mlp_out = mlp
    return x + mlp_out(gate(mlp_in(x)))

  def _features(self, species, p: _Pairs, first: int, stop: int, x=None, dtype=jnp.float32):
    """Features after stages ``[first, stop)`` (``x``: the input of stage ``first`` > 0)."""
    offset = int(self.density is not None)  # stage 0 is the density alone when there is one
    if first == 0:
      x = self.initial_features(species, p, dtype)
    for it in range(max(first - offset, 0), stop - offset):
      x = self.block(it, x, p)
    return x

  def head(self, x):
    """``(energies (N,) or (N, heads), scalar features (N, F))`` of the last features."""
    out = self.readout(nn.silu(self.readout_hidden(x[:, 0, 0, :])))
    return (out[:, 0] if self.config.readout_heads == 1 else out), x[:, 0, 0, :]

  def _lone_atoms(self, p: _Pairs, dtype):
    """The network's output for one lone atom of every species (no pairs)."""
    none = jnp.zeros((0,), p.kw["dst_idx"].dtype)
    lone = _Pairs(
      p.ylm[:0],
      p.rbf[:0],
      p.basis[:0],
      p.cut[:0],
      p.valid[:0],
      dict(dst_idx=none, src_idx=none, num_segments=self.num_species, indices_are_sorted=True),
    )
    species = jnp.arange(self.num_species)
    return self.head(self._features(species, lone, 0, self.config.num_stages, dtype=dtype))[0]

  def _finish(self, e, species, r, p: _Pairs, atom_mask, atomic_numbers, include_shift):
    """Per-atom energies from the head's output: the lone atom's subtracted (an isolated
    atom's energy is exactly its element's shift), scaled and shifted, the repulsion added,
    padded atoms zeroed."""
    cfg = self.config
    e_iso = self._lone_atoms(p, r.dtype)
    per_atom = lambda v: v[species] if cfg.readout_heads == 1 else v[species][:, None]
    e = (e - e_iso[species]) * per_atom(jnp.asarray(self.scale, e.dtype))
    if include_shift:  # callers that sum in float64 add the (large) shifts themselves
      e = e + per_atom(jnp.asarray(self.shift, e.dtype))
    if cfg.repulsion and atomic_numbers is not None:
      z = jnp.asarray(atomic_numbers, r.dtype)[species]
      rep = _repulsion(r, z, p.valid, cfg.repulsion_cutoff, **p.kw)
      e = e + (rep if cfg.readout_heads == 1 else rep[:, None])
    if atom_mask is not None:
      e = jnp.where(atom_mask if cfg.readout_heads == 1 else atom_mask[:, None], e, 0.0)
    return e

  def _energies_and_scalars(
    self, species, r, dst_idx, src_idx, atom_mask, atomic_numbers, indices_are_sorted, shift
  ):
    p = self.pairs(r, dst_idx, src_idx, species.shape[0], indices_are_sorted)
    x = self._features(species, p, 0, self.config.num_stages, dtype=r.dtype)
    e, scalars = self.head(x)
    return self._finish(e, species, r, p, atom_mask, atomic_numbers, shift), scalars, p

  def energies(
    self,
    species,
    r,
    dst_idx,
    src_idx,
    atom_mask=None,
    atomic_numbers=None,
    indices_are_sorted: bool = False,
    include_shift: bool = True,
  ):
    """Per-atom energies ``(N,)`` (``(N, heads)`` with several heads), eV."""
    args = (atom_mask, atomic_numbers, indices_are_sorted, include_shift)
    return self._energies_and_scalars(species, r, dst_idx, src_idx, *args)[0]

  def energies_and_charges(
    self,
    species,
    r,
    dst_idx,
    src_idx,
    atom_mask=None,
    atomic_numbers=None,
    indices_are_sorted: bool = False,
    include_shift: bool = True,
  ):
    """``(energies (N,), (raw charges (N,), weights (N,)))`` of a model with
    ``electrostatics``: the local per-atom energies (eV; the electrostatic energy is added by
    the caller, who knows the frames, cells and total charges) and, read out of the same
    features, the charges before they are made to sum to the total charge and each atom's
    positive weight in that correction (:func:`potentials.electrostatics.neutral_charges`);
    padded atoms get 0."""
    if not self.config.electrostatics:
      raise ValueError("charges need a model with electrostatics")
    args = (atom_mask, atomic_numbers, indices_are_sorted, include_shift)
    e, scalars, p = self._energies_and_scalars(species, r, dst_idx, src_idx, *args)
    out = self.charge_out(nn.silu(self.charge_hidden(scalars)))
    q, w = out[:, 0], nn.softplus(out[:, 1]) + CHARGE_WEIGHT_FLOOR
    if self.config.charge_transfer:
      q = _transferred(q, p.cut, **p.kw)
    if atom_mask is not None:
      q, w = jnp.where(atom_mask, q, 0.0), jnp.where(atom_mask, w, 0.0)
    return e, (q, w)

  def with_member_forces(
    self,
    species,
    r,
    dst_idx,
    src_idx,
    atom_mask=None,
    atomic_numbers=None,
    indices_are_sorted: bool = False,
    include_shift: bool = True,
  ):
    """``(energies (N, heads), deviations (N, heads, 3))`` of a shallow ensemble with
    ``force_heads``: the members' force deviations read out in the forward pass."""
    if not self.config.force_heads:
      raise ValueError("member forces need a model with force_heads")
    args = (atom_mask, atomic_numbers, indices_are_sorted, include_shift)
    e, scalars, p = self._energies_and_scalars(species, r, dst_idx, src_idx, *args)
    d = self.force_readout(jax.lax.stop_gradient(scalars), p.rbf, p.cut, r, **p.kw)
    if atom_mask is not None:
      d = jnp.where(atom_mask[:, None, None], d, 0.0)
    return e, d

  def stage(
    self,
    s: int,
    species,
    r,
    dst_idx,
    src_idx,
    atom_mask=None,
    atomic_numbers=None,
    indices_are_sorted: bool = False,
    include_shift: bool = True,
    features=None,
  ):
    """Hop ``s`` only: its output features, or for the last stage the per-atom energies."""
    cfg = self.config
    if not 0 <= s < cfg.num_stages:
      raise ValueError(f"stage must be in [0, {cfg.num_stages}), got {s}")
    if (features is None) != (s == 0):
      raise ValueError("features are the input of stages after the first, and only of those")
    p = self.pairs(r, dst_idx, src_idx, species.shape[0], indices_are_sorted)
    x = self._features(species, p, s, s + 1, features, dtype=r.dtype)
    if s < cfg.num_stages - 1:
      return x
    e, _ = self.head(x)
    return self._finish(e, species, r, p, atom_mask, atomic_numbers, include_shift)

  def __call__(
    self,
    species,
    r,
    dst_idx,
    src_idx,
    atom_mask=None,
    atomic_numbers=None,
    indices_are_sorted: bool = False,
    include_shift: bool = True,
    member_forces: bool = False,
    stage=None,
    features=None,
  ):
    """:meth:`energies`; ``member_forces=True`` is :meth:`with_member_forces` and ``stage=``
    (with ``features=``) :meth:`stage`, the flags of earlier releases."""
    args = (species, r, dst_idx, src_idx, atom_mask, atomic_numbers, indices_are_sorted)
    if member_forces and not self.config.force_heads:
      raise ValueError("member_forces=True needs a model with force_heads")
    if stage is not None:
      if member_forces:
        raise ValueError("member_forces is for the whole model, not one stage")
      return self.stage(stage, *args, include_shift, features)
    if features is not None:
      raise ValueError("features are the input of stages after the first, and only of those")
    if member_forces:
      return self.with_member_forces(*args, include_shift)
    if self.config.force_heads and self.is_initializing():  # the readout's parameters too
      return self.with_member_forces(*args, include_shift)[0]
    if self.config.electrostatics and self.is_initializing():  # the charge readout's too
      return self.energies_and_charges(*args, include_shift)[0]
    return self.energies(*args, include_shift)


def _neighbour_density(
  species, basis, cut, *, num_species, dst_idx, src_idx, num_segments, indices_are_sorted
):
  """Per-atom ``(N, S * K)`` sums of the l = 0 radial basis times the cutoff over the pairs,
  split by neighbour species: lets a block count its neighbours (softmax cannot)."""
  s_j = jax.nn.one_hot(
    jnp.take(species, src_idx, mode="fill", fill_value=0), num_species, dtype=basis.dtype
  )
  g = basis[:, 0, 0, :] * cut[:, None]
  per_pair = (s_j[:, :, None] * g[:, None, :]).reshape(g.shape[0], num_species * g.shape[1])
  return jax.ops.segment_sum(
    per_pair, dst_idx, num_segments=num_segments, indices_are_sorted=indices_are_sorted
  )


def _transferred(chi, cut, *, dst_idx, src_idx, num_segments, indices_are_sorted):
  """``(N,)`` charges moved along the pairs: atom i receives ``(chi_j - chi_i) cut_ij`` from
  each neighbour j (the list holds both directions, so every transfer is given and taken)."""
  take = lambda idx: jnp.take(chi, idx, mode="fill", fill_value=0.0)  # noqa: E731
  flow = (take(src_idx) - take(dst_idx)) * cut
  return jax.ops.segment_sum(
    flow, dst_idx, num_segments=num_segments, indices_are_sorted=indices_are_sorted
  )


def _repulsion(r, z, valid, cutoff, *, dst_idx, src_idx, num_segments, indices_are_sorted):
  """Per-atom ZBL repulsion ``(N,)`` from pair vectors ``r`` and nuclear charges ``z``:
  each unordered pair appears twice in the full list, half of it goes to each centre."""
  zi = jnp.take(z, dst_idx, mode="fill", fill_value=1.0)
  zj = jnp.take(z, src_idx, mode="fill", fill_value=1.0)
  e_pair = jnp.where(valid, zbl_pair_energy(safe_norm(r), zi, zj, cutoff), 0.0)
  return 0.5 * jax.ops.segment_sum(
    e_pair, dst_idx, num_segments=num_segments, indices_are_sorted=indices_are_sorted
  )
