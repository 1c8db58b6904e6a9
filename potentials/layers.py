"""Equivariant layers on irreps features ``(..., P, (L+1)**2, F)``.

``P = 1`` holds proper tensors only (degree l has parity (-1)**l); ``P = 2`` holds all even-
parity irreps at index 0 and all odd-parity ones at index 1 (see ``docs/conventions.md``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import so3

Dtype = Any
InitializerFn = Callable[..., jax.Array]
default_kernel_init = nn.initializers.lecun_normal()


# ----------------------------------------------------------------------------- shape helpers
def max_degree_of(shape: Sequence[int]) -> int:
  """Maximum degree L from a feature shape ``(..., P, (L+1)**2, F)``; validates P and Q."""
  if len(shape) < 3:
    raise ValueError(f"features need shape (..., P, (L+1)**2, F), got {tuple(shape)}")
  p, q = shape[-3], shape[-2]
  L = math.isqrt(q) - 1
  if (L + 1) ** 2 != q:
    raise ValueError(f"degree axis must have size (L+1)**2, got {q} in shape {tuple(shape)}")
  if p not in (1, 2):
    raise ValueError(f"parity axis must have size 1 or 2, got {p} in shape {tuple(shape)}")
  return L


def change_max_degree_or_type(
  x: jax.Array, max_degree: Optional[int] = None, include_pseudotensors: Optional[bool] = None
) -> jax.Array:
  """Truncate/zero-pad the degree axis and convert between P=1 and P=2 layouts."""
  L = max_degree_of(x.shape)
  P = x.shape[-3]
  if max_degree is not None and max_degree != L:
    if max_degree < L:
      x = x[..., : (max_degree + 1) ** 2, :]
    else:
      pad = [(0, 0)] * x.ndim
      pad[-2] = (0, (max_degree + 1) ** 2 - (L + 1) ** 2)
      x = jnp.pad(x, pad)
    L = max_degree
  if include_pseudotensors is None or include_pseudotensors == (P == 2):
    return x
  even = jnp.asarray(so3.degree_of_index(L) % 2 == 0)[:, None]
  if P == 2:  # keep natural parity: index 0 for even l, index 1 for odd l
    return jnp.where(even, x[..., 0, :, :], x[..., 1, :, :])[..., None, :, :]
  zero = jnp.zeros_like(x[..., 0, :, :])
  return jnp.stack(
    [jnp.where(even, x[..., 0, :, :], zero), jnp.where(even, zero, x[..., 0, :, :])], axis=-3
  )


def _blockwise_init(init: InitializerFn, num_blocks: int) -> InitializerFn:
  """Applies ``init`` to each (F_in, F_out) block separately so fan-in is per block."""

  def wrapped(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, num_blocks)
    blocks = [init(k, shape[-2:], dtype) for k in keys]
    return jnp.stack(blocks).reshape(shape)

  return wrapped


# ----------------------------------------------------------------------------- blocks
# Inside layers that work per pair, features are kept as components: a dict
# {(parity index p, degree l): tuple of 2l+1 arrays (..., F)}, one array per order m.
# Per-pair arrays are large and memory bound on CPU. With one array per component, the
# tensor product and the attention dot products are plain elementwise code, and so are their
# gradients: no per-pair slicing, padding, concatenation or transposition ever runs (XLA fuses
# those into gathers and matmul operands, and such fusions run 10-100x slower). Components are
# stacked back into (..., P, (L+1)**2, F) only for per-atom arrays.
Blocks = Dict[Tuple[int, int], Tuple[jax.Array, ...]]


def split_blocks(x: jax.Array) -> Blocks:
  """``(..., P, (L+1)**2, F) -> {(p, l): ((..., F),) * (2l+1)}``."""
  L = max_degree_of(x.shape)
  P, M, F = x.shape[-3:]
  # One split, not P*M slices: a slice's gradient is a zero-padded copy of all of x, and XLA
  # kept every one of those alive at once (21 per-pair copies of the basis in the copper
  # model's force program); split's gradient is a single concatenate.
  parts = jnp.split(x.reshape(x.shape[:-3] + (P * M, F)), P * M, axis=-2)
  comps = [c[..., 0, :] for c in parts]
  return {
    (p, l): tuple(comps[p * M + q] for q in range(l * l, (l + 1) ** 2))
    for p in range(P)
    for l in range(L + 1)
  }


def merge_blocks(blocks: Blocks, P: int, L: int) -> jax.Array:
  """Inverse of :func:`split_blocks`; missing blocks are zeros."""
  comps = [c for b in blocks.values() for c in b]
  lead = jnp.broadcast_shapes(*(c.shape[:-1] for c in comps))
  zero = jnp.zeros(lead + comps[0].shape[-1:], comps[0].dtype)
  rows = []
  for p in range(P):
    for l in range(L + 1):
      b = blocks.get((p, l))
      rows += [zero] * (2 * l + 1) if b is None else [jnp.broadcast_to(c, zero.shape) for c in b]
  return jnp.stack(rows, axis=-2).reshape(lead + (P, (L + 1) ** 2, zero.shape[-1]))


def blocks_layout(blocks: Blocks) -> Tuple[int, int]:
  """(P, L) of a block dict."""
  return max(p for p, _ in blocks) + 1, max(l for _, l in blocks)


def map_blocks(fn: Callable[[jax.Array], jax.Array], blocks: Blocks) -> Blocks:
  """Apply ``fn`` to every component."""
  return {k: tuple(fn(c) for c in b) for k, b in blocks.items()}


# ----------------------------------------------------------------------------- Dense
def dense_apply(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
  """``x (..., P, (L+1)**2, F) @ kernel (P, L+1, F, O)`` per (parity, degree) block.

  One contraction with the kernel expanded over m: a single output array.
  """
  L = max_degree_of(x.shape)
  return jnp.einsum(
    "...pqf,pqfo->...pqo", x, kernel[:, so3.degree_of_index(L)], precision=precision
  )


def dense_blocks(blocks: Blocks, kernel: jax.Array, precision: Any = None) -> Blocks:
  """The same on components: one plain matmul (rows x F @ F x O) per component."""
  return {
    (p, l): tuple(jnp.dot(c, kernel[p, l], precision=precision) for c in b)
    for (p, l), b in blocks.items()
  }


class Dense(nn.Module):
  """Linear map per (parity channel, degree); equivariant because it mixes features only.

  ``(..., P, (L+1)**2, F_in) -> (..., P, (L+1)**2, features)``, or block dict to block dict.
  The bias is added to the 0+ channel only (any other bias would break equivariance).

  Parameters: ``kernel (P, L+1, F_in, features)``, ``bias (features,)``.
  """

  features: int
  use_bias: bool = True
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: InitializerFn = default_kernel_init
  bias_init: InitializerFn = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    if isinstance(x, dict):
      P, L = blocks_layout(x)
      F = next(iter(x.values()))[0].shape[-1]
    else:
      L = max_degree_of(x.shape)
      P, F = x.shape[-3], x.shape[-1]
    kernel = self.param(
      "kernel",
      _blockwise_init(self.kernel_init, P * (L + 1)),
      (P, L + 1, F, self.features),
      self.param_dtype,
    )
    bias = (
      self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      if self.use_bias
      else None
    )
    if isinstance(x, dict):
      dt = self.dtype or jnp.result_type(*(c for b in x.values() for c in b), kernel)
      y = dense_blocks(map_blocks(lambda c: c.astype(dt), x), kernel.astype(dt), self.precision)
      if bias is not None:
        y[(0, 0)] = (y[(0, 0)][0] + bias.astype(dt),)
      return y
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = dense_apply(x, kernel, self.precision)
    if bias is not None:
      y = y.at[..., 0, 0, :].add(bias)
    return y


# ----------------------------------------------------------------------------- Tensor products
def _output_parity(p1: int, L1: int, p2: int, L2: int, L3: int, include_pseudotensors: bool):
  if not include_pseudotensors:
    return 1
  paths = so3.coupling_paths(p1, L1, p2, L2, L3, 2)
  natural = all((1 if i3 == 0 else -1) == (-1) ** l3 for _, _, (i3, l3) in paths)
  return 1 if natural else 2


def _path_counts(paths) -> dict:
  counts: dict = {}
  for _, _, out in paths:
    counts[out] = counts.get(out, 0) + 1
  return counts


@functools.lru_cache(maxsize=None)
def _sparse_cg(l1: int, l2: int, l3: int, cartesian_order: bool):
  """Nonzero coupling terms grouped by output order: ((c, ((a, b, value), ...)), ...)."""
  cg = so3.clebsch_gordan(l1, l2, l3, cartesian_order)
  return tuple(
    (c, tuple((a, b, float(cg[a, b, c])) for a, b in zip(*np.nonzero(cg[:, :, c]))))
    for c in range(2 * l3 + 1)
  )


def tensor_product_blocks(
  b1: Blocks, b2: Blocks, weights: jax.Array, paths: list, cartesian_order: bool = True
) -> Blocks:
  """Weighted sum over coupling paths on component dicts; ``weights (num_paths, F)``.

  Written out term by term from the nonzero coupling coefficients (real Clebsch-Gordan
  tensors are sparse: a few terms per output order) as elementwise products of components,
  which XLA fuses into a few loops, forwards and backwards. A path with a scalar operand is a
  broadcast product.
  """
  out: Dict[Tuple[int, int], list] = {}
  for n, ((i1, l1), (i2, l2), (i3, l3)) in enumerate(paths):
    if (i1, l1) not in b1 or (i2, l2) not in b2:
      continue  # an absent block is zero
    x, y, w = b1[(i1, l1)], b2[(i2, l2)], weights[n]
    if l1 == 0:
      terms = [x[0] * c * w for c in y]
    elif l2 == 0:
      terms = [c * y[0] * w for c in x]
    else:
      terms = []
      for _, coupling in _sparse_cg(l1, l2, l3, cartesian_order):
        acc = None
        for a, b, v in coupling:
          t = x[a] * y[b] * v
          acc = t if acc is None else acc + t
        terms.append(acc * w)
    key = (i3, l3)
    out[key] = terms if key not in out else [o + t for o, t in zip(out[key], terms)]
  return {k: tuple(v) for k, v in out.items()}


def tensor_product(
  x1: jax.Array,
  x2: jax.Array,
  weights: jax.Array,
  paths: list,
  P3: int,
  L3: int,
  cartesian_order: bool = True,
  precision: Any = None,
) -> jax.Array:
  """Array form of :func:`tensor_product_blocks`: ``(..., P, Q, F)`` in and out."""
  del precision  # elementwise products only
  out = tensor_product_blocks(split_blocks(x1), split_blocks(x2), weights, paths, cartesian_order)
  lead = jnp.broadcast_shapes(x1.shape[:-3], x2.shape[:-3])
  if not out:
    return jnp.zeros(lead + (P3, (L3 + 1) ** 2, x1.shape[-1]), x1.dtype)
  return merge_blocks(out, P3, L3)


def _layout(x) -> Tuple[int, int, int]:
  """(P, L, F) of an array or block dict."""
  if isinstance(x, dict):
    P, L = blocks_layout(x)
    return P, L, next(iter(x.values()))[0].shape[-1]
  return x.shape[-3], max_degree_of(x.shape), x.shape[-1]


def _tensor_apply(x1, x2, weights, paths, P3, L3, cartesian_order, dtype=None, norm=None):
  """Tensor product in the compute dtype; ``norm`` (constant per-path factors) is applied in
  that dtype too, so float32 parameters do not round constants of a float64 computation."""
  if isinstance(x1, dict) != isinstance(x2, dict):
    raise TypeError("both tensor-product inputs must be arrays, or both block dicts")
  leaves = (
    [c for b in [*x1.values(), *x2.values()] for c in b] if isinstance(x1, dict) else [x1, x2]
  )
  dt = dtype or jnp.result_type(*leaves, weights)
  weights = weights.astype(dt)
  if norm is not None:
    weights = weights * jnp.asarray(norm, dt)
  if isinstance(x1, dict):
    return tensor_product_blocks(x1, x2, weights, paths, cartesian_order)
  return tensor_product(x1.astype(dt), x2.astype(dt), weights, paths, P3, L3, cartesian_order)


def _plan(x1, x2, max_degree, include_pseudotensors):
  """Layouts, output parity/degree, coupling paths and their 1/sqrt(paths per output) factors."""
  (p1, L1, F), (p2, L2, F2) = _layout(x1), _layout(x2)
  if F != F2:
    raise ValueError(f"feature dimensions differ: {F} vs {F2}")
  L3 = max(L1, L2) if max_degree is None else max_degree
  P3 = _output_parity(p1, L1, p2, L2, L3, include_pseudotensors)
  paths = so3.coupling_paths(p1, L1, p2, L2, L3, P3)
  counts = _path_counts(paths)
  norm = np.asarray([1 / math.sqrt(counts[p[2]]) for p in paths])[:, None]
  return (p1, L1), (p2, L2), F, P3, L3, paths, norm


class Tensor(nn.Module):
  """Equivariant tensor product of two irreps features with one learned weight per path.

  ``x1 (..., P1, (L1+1)**2, F), x2 (..., P2, (L2+1)**2, F) -> (..., P3, (L3+1)**2, F)``
  with ``L3 = max_degree`` (default ``max(L1, L2)``). Every coupling path
  ``(p1, l1) x (p2, l2) -> (p1*p2, l3)`` allowed by the triangle rule is used;
  ``P3 = 2`` when ``include_pseudotensors`` and a pseudotensor can arise, else 1.
  Each path's output is divided by sqrt(number of paths into its output block).

  Parameters: ``kernel (num_paths, F)``.
  """

  max_degree: Optional[int] = None
  include_pseudotensors: bool = True
  cartesian_order: bool = True
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: InitializerFn = nn.initializers.normal(stddev=1.0)

  @nn.compact
  def __call__(self, x1, x2):
    (p1, L1), (p2, L2), F, P3, L3, paths, norm = _plan(
      x1, x2, self.max_degree, self.include_pseudotensors
    )
    kernel = self.param("kernel", self.kernel_init, (len(paths), F), self.param_dtype)
    return _tensor_apply(x1, x2, kernel, paths, P3, L3, self.cartesian_order, self.dtype, norm)


class FusedTensor(nn.Module):
  """Tensor product with path weights factorised as ``w1[p1,l1] * w2[p2,l2] * w3[p3,l3]``.

  Same shapes and path set as :class:`Tensor`, with ``O(L F)`` instead of ``O(L**3 F)``
  parameters; the product of the three factors is each path's weight.

  Parameters: ``kernel1 (P1, L1+1, F)``, ``kernel2 (P2, L2+1, F)``, ``kernel3 (P3, L3+1, F)``.
  """

  max_degree: Optional[int] = None
  include_pseudotensors: bool = True
  cartesian_order: bool = True
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: InitializerFn = nn.initializers.normal(stddev=1.0)

  @nn.compact
  def __call__(self, x1, x2):
    (p1, L1), (p2, L2), F, P3, L3, paths, norm = _plan(
      x1, x2, self.max_degree, self.include_pseudotensors
    )
    k1 = self.param("kernel1", self.kernel_init, (p1, L1 + 1, F), self.param_dtype)
    k2 = self.param("kernel2", self.kernel_init, (p2, L2 + 1, F), self.param_dtype)
    k3 = self.param("kernel3", self.kernel_init, (P3, L3 + 1, F), self.param_dtype)
    weights = jnp.stack(
      [k1[i1, l1] * k2[i2, l2] * k3[i3, l3] for (i1, l1), (i2, l2), (i3, l3) in paths]
    )
    return _tensor_apply(x1, x2, weights, paths, P3, L3, self.cartesian_order, self.dtype, norm)


def make_tensor(use_fused_tensor: bool, **kwargs) -> nn.Module:
  """The tensor-product layer selected by ``use_fused_tensor``."""
  return (FusedTensor if use_fused_tensor else Tensor)(**kwargs)


# ----------------------------------------------------------------------------- nonlinearity
class Gate(nn.Module):
  """Gated nonlinearity: ``silu`` on the 0+ channel, every other (parity, degree) block scaled
  by ``sigmoid`` of a learned linear function of the 0+ scalars (which are invariant).

  ``(..., P, (L+1)**2, F) -> same shape``. Parameters: ``gate/kernel (F, (P*(L+1)-1)*F)``.
  """

  activation: Callable[[jax.Array], jax.Array] = nn.silu
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  kernel_init: InitializerFn = default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    L = max_degree_of(x.shape)
    P, F = x.shape[-3], x.shape[-1]
    scalars = x[..., 0, 0, :]
    act = self.activation(scalars)
    if P == 1 and L == 0:
      return act[..., None, None, :]
    gates = nn.Dense(
      F * (P * (L + 1) - 1),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=self.kernel_init,
      name="gate",
    )(scalars)
    gates = jax.nn.sigmoid(gates).reshape(*gates.shape[:-1], P * (L + 1) - 1, F)
    # Gate per (p, l) block, the 0+ slot holding a dummy 1 that is replaced below.
    gates = jnp.concatenate([jnp.ones_like(gates[..., :1, :]), gates], axis=-2)
    gates = gates.reshape(*gates.shape[:-2], P, L + 1, F)[..., so3.degree_of_index(L), :]
    y = x * gates
    return y.at[..., 0, 0, :].set(act)


class Embed(nn.Module):
  """Element embedding: integer species ``(..., N) -> (..., N, 1, 1, features)`` scalars."""

  num_embeddings: int
  features: int
  param_dtype: Dtype = jnp.float32
  embedding_init: InitializerFn = nn.initializers.normal(stddev=1.0)

  @nn.compact
  def __call__(self, species: jax.Array) -> jax.Array:
    table = self.param(
      "embedding", self.embedding_init, (self.num_embeddings, self.features), self.param_dtype
    )
    return jnp.take(table, species, axis=0, mode="clip")[..., None, None, :]
