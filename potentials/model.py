"""The equivariant self-attention energy model and its configuration.

``EnergyModel`` maps (species indices, pair vectors, pair list) to per-atom energies. It is a
pure flax module; :class:`potentials.Potential` bundles it with parameters, species and
metadata. Units: eV and Å.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import radial as radial_lib
from .attention import SelfAttention
from .force_readout import ForceReadout
from .layers import Dense, Embed, Gate, Tensor, change_max_degree_or_type, max_degree_of
from .so3 import safe_norm

RADIAL_FUNCTIONS = ("reciprocal_bernstein", "bessel", "gaussian")
CUTOFF_FUNCTIONS = ("smooth", "cosine")


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
    heads: readout heads on the shared network (a *shallow ensemble*: ``heads`` members that
      differ only in their last layer). With more than one, :class:`EnergyModel` returns
      ``(N, heads)`` per-atom energies; a :class:`potentials.Potential` averages them and
      reads their spread as an uncertainty (:mod:`potentials.ensemble`). Costs one extra
      backward pass per head where member forces are asked for (see ``force_heads``).
    force_heads: with ``heads > 1``, every head also reads out its member's force deviation
      from the mean force (:class:`potentials.force_readout.ForceReadout`, a pass over the
      pairs in the forward pass), so the force uncertainty costs no backward pass per head.
      The readout does not change energies or forces; after training it is fitted to the
      members' differentiated deviations. Off by default; old model files load with it off.
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
  heads: int = 1
  committee: int = 1
  force_heads: bool = False

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
      (self.heads >= 1, f"heads must be >= 1, got {self.heads}"),
      (self.committee >= 1, f"committee must be >= 1, got {self.committee}"),
      (
        not self.force_heads or (self.heads > 1 and self.committee == 1),
        "force_heads reads out the members of a shallow ensemble: it needs heads > 1 and "
        f"committee = 1 (a committee's member forces cost no extra), got heads={self.heads}, "
        f"committee={self.committee}",
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
_COULOMB = 14.399645  # e^2 / (4 pi eps0) in eV Å


def zbl_pair_energy(r: jax.Array, z1: jax.Array, z2: jax.Array, r_off: float) -> jax.Array:
  """ZBL repulsion between nuclear charges z1, z2 at distance r (eV), times a smooth switch
  that is 1 at r = 0 and reaches 0 (with all derivatives) at ``r_off``. Finite at r = 0 pairs
  only because callers never pass real pairs at r = 0; padded pairs are masked by callers."""
  a = 0.46850 / (z1**0.23 + z2**0.23)
  safe_r = jnp.where(r > 0, r, 1.0)
  x = safe_r / a
  phi = sum(c * jnp.exp(-d * x) for c, d in zip(_ZBL_C, _ZBL_D))
  e = _COULOMB * z1 * z2 / safe_r * phi
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


class EnergyModel(nn.Module):
  """Per-atom energies from species and pairs.

  ``E_i = scale[s_i] * (f(i) - f(lone atom of species s_i)) + shift[s_i]``, so ``shift`` is the
  energy of an isolated atom and ``scale`` the energy scale of the learned part.

  Inputs: ``species (N,)`` indices into the model's species list, ``atomic_numbers (S,)``
  (constant table, for the repulsion), ``r (pairs, 3)`` pair vectors ``R[src] - R[dst]``,
  ``dst_idx``/``src_idx (pairs,)`` with padding index N, ``atom_mask (N,)`` (False for padded
  atoms). Output: ``(N,)`` per-atom energies (eV), ``(N, heads)`` with several readout heads;
  padded atoms get exactly 0. With ``member_forces=True`` (needs ``force_heads``) it returns
  ``(energies (N, heads), deviations (N, heads, 3))``: every member's force deviation from the
  mean force (eV/Å, :mod:`potentials.force_readout`). With
  ``include_shift=False`` the per-element shifts are left out (add ``shift[species]`` in
  float64 to keep float32 runs from rounding energies of ~1e3 eV per atom).

  Staged evaluation (a domain decomposition that exchanges features between hops, LAMMPS):
  ``stage=s`` (``0 <= s < config.num_stages``) runs one hop only. Stage 0 starts from
  ``species``; a later stage takes ``features``, the previous stage's output ``(N, P,
  (L+1)**2, F)``. Every stage but the last returns its output features (rows of atoms that
  are no pair's ``dst`` are meaningless there); the last returns the per-atom energies as
  the whole model does. Chaining all stages equals the whole model.
  """

  config: ModelConfig
  num_species: int

  @nn.compact
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
    cfg = self.config
    if member_forces and not cfg.force_heads:
      raise ValueError("member_forces=True needs a model with force_heads")
    if stage is not None and not 0 <= stage < cfg.num_stages:
      raise ValueError(f"stage must be in [0, {cfg.num_stages}), got {stage}")
    if stage is not None and member_forces:
      raise ValueError("member_forces is for the whole model, not one stage")
    if (features is None) != (stage is None or stage == 0):
      raise ValueError("features are the input of stages after the first, and only of those")
    n = species.shape[0]
    valid = (dst_idx < n) & (src_idx < n)
    ylm, rbf, cut = radial_lib.basis_parts(
      r,
      max_degree=cfg.max_degree,
      num=cfg.num_basis,
      radial_fn=cfg.radial_fn(),
      cutoff_fn=cfg.cutoff_fn(),
    )
    basis = radial_lib.combine(ylm, rbf * cut[:, None])
    cut = jnp.where(valid, cut, 0)
    pair_kw = dict(
      dst_idx=dst_idx, src_idx=src_idx, num_segments=n, indices_are_sorted=indices_are_sorted
    )
    embed = Embed(self.num_species, cfg.features, name="embed")
    blocks = []
    for it in range(cfg.num_iterations):
      last = it == cfg.num_iterations - 1
      degree = 0 if last else cfg.max_degree  # only scalars are read after the last block
      blocks.append(
        (
          degree,
          SelfAttention(
            max_degree=degree,
            num_heads=cfg.num_heads,
            include_pseudotensors=cfg.include_pseudotensors and not last,
            use_fused_tensor=cfg.use_fused_tensor,
            name=f"attention_{it}",
          ),
          Dense(cfg.features, name=f"mlp_{it}_in"),
          Gate(name=f"mlp_{it}_gate"),
          Dense(cfg.features, name=f"mlp_{it}_out"),
          _Product(degree, cfg.include_pseudotensors and not last, name=f"product_{it}")
          if cfg.product
          else None,
          _RadialMLP(cfg.radial_mlp, name=f"radial_{it}") if cfg.radial_mlp else None,
        )
      )
    hidden = nn.Dense(cfg.features, name="readout_hidden")
    readout = nn.Dense(cfg.heads, name="readout")
    density = (
      nn.Dense(cfg.features, use_bias=False, name="density") if cfg.density_features else None
    )

    def stages(species, ylm, rbf, basis, cut, first, stop, x=None, **kw):
      """Features after stages ``[first, stop)`` (``x``: the input of stage ``first`` > 0)."""
      offset = int(density is not None)  # stage 0 is the density alone when there is one
      if first == 0:
        x = embed(species).astype(r.dtype)
        if density is not None:
          rho = _neighbour_density(species, basis, cut, num_species=self.num_species, **kw)
          x = x.at[:, 0, 0, :].add(density(rho))
      for block in blocks[max(first - offset, 0) : stop - offset]:
        x = apply_block(block, x, ylm, rbf, basis, cut, **kw)
      return x

    def apply_block(block, x, ylm, rbf, basis, cut, **kw):
      degree, attention, mlp_in, gate, mlp_out, product, radial = block
      b = basis if radial is None else radial_lib.combine(ylm, radial(rbf) * cut[:, None])
      y = attention(x, b, cut, **kw)
      pseudo = y.shape[-3] == 2
      if product is None:
        x = change_max_degree_or_type(x, degree, pseudo) + y
      else:  # the product reads all degrees, also in a last block that keeps only scalars
        L_z = max(max_degree_of(x.shape), degree)
        z = change_max_degree_or_type(x, L_z, pseudo) + change_max_degree_or_type(y, L_z, pseudo)
        x = change_max_degree_or_type(z, degree) + product(z)
      return x + mlp_out(gate(mlp_in(x)))

    def head(x):
      out = readout(nn.silu(hidden(x[:, 0, 0, :])))
      return (out[:, 0] if cfg.heads == 1 else out), x[:, 0, 0, :]

    def network(species, ylm, rbf, basis, cut, **kw):
      return head(stages(species, ylm, rbf, basis, cut, 0, cfg.num_stages, **kw))

    if stage is not None and stage < cfg.num_stages - 1:
      return stages(species, ylm, rbf, basis, cut, stage, stage + 1, features, **pair_kw)
    if stage is None:
      e, x = network(species, ylm, rbf, basis, cut, **pair_kw)
    else:  # the last stage
      e, x = head(stages(species, ylm, rbf, basis, cut, stage, stage + 1, features, **pair_kw))
    # The same network on one lone atom per species (no pairs): subtracting its output makes
    # an isolated atom's energy exactly its element's shift, the reference energy.
    none = jnp.zeros((0,), dst_idx.dtype)
    e_iso, _ = network(
      jnp.arange(self.num_species),
      ylm[:0],
      rbf[:0],
      basis[:0],
      cut[:0],
      dst_idx=none,
      src_idx=none,
      num_segments=self.num_species,
      indices_are_sorted=True,
    )
    scale = self.param("scale", nn.initializers.ones, (self.num_species,), jnp.float32)
    shift = self.param("shift", nn.initializers.zeros, (self.num_species,), jnp.float32)
    per_atom = lambda v: v[species] if cfg.heads == 1 else v[species][:, None]
    e = (e - e_iso[species]) * per_atom(jnp.asarray(scale, e.dtype))
    if include_shift:  # callers that sum in float64 add the (large) shifts themselves
      e = e + per_atom(jnp.asarray(shift, e.dtype))
    if cfg.repulsion and atomic_numbers is not None:
      rep = _repulsion(
        r, jnp.asarray(atomic_numbers, r.dtype)[species], valid, cfg.repulsion_cutoff, **pair_kw
      )
      e = e + (rep if cfg.heads == 1 else rep[:, None])
    if atom_mask is not None:
      e = jnp.where(atom_mask if cfg.heads == 1 else atom_mask[:, None], e, 0.0)
    if not cfg.force_heads or not (member_forces or self.is_initializing()):
      return e
    readout = ForceReadout(cfg.heads, name="force_readout")
    d = readout(jax.lax.stop_gradient(x), rbf, cut, r, **pair_kw)
    if atom_mask is not None:
      d = jnp.where(atom_mask[:, None, None], d, 0.0)
    return (e, d) if member_forces else e


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


def _repulsion(r, z, valid, cutoff, *, dst_idx, src_idx, num_segments, indices_are_sorted):
  """Per-atom ZBL repulsion ``(N,)`` from pair vectors ``r`` and nuclear charges ``z``:
  each unordered pair appears twice in the full list, half of it goes to each centre."""
  zi = jnp.take(z, dst_idx, mode="fill", fill_value=1.0)
  zj = jnp.take(z, src_idx, mode="fill", fill_value=1.0)
  e_pair = jnp.where(valid, zbl_pair_energy(safe_norm(r), zi, zj, cutoff), 0.0)
  return 0.5 * jax.ops.segment_sum(
    e_pair, dst_idx, num_segments=num_segments, indices_are_sorted=indices_are_sorted
  )
