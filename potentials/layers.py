"""Equivariant layers on irreps features ``(..., P, (L+1)**2, F)``.

``P = 1`` holds proper tensors only (degree l has parity (-1)**l); ``P = 2`` holds all even-
parity irreps at index 0 and all odd-parity ones at index 1 (see ``shared/DESIGN.md``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence, Tuple

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


def change_max_degree_or_type(x: jax.Array, max_degree: Optional[int] = None,
                              include_pseudotensors: Optional[bool] = None) -> jax.Array:
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
  return jnp.stack([jnp.where(even, x[..., 0, :, :], zero),
                    jnp.where(even, zero, x[..., 0, :, :])], axis=-3)


def _blockwise_init(init: InitializerFn, num_blocks: int) -> InitializerFn:
  """Applies ``init`` to each (F_in, F_out) block separately so fan-in is per block."""
  def wrapped(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, num_blocks)
    blocks = [init(k, shape[-2:], dtype) for k in keys]
    return jnp.stack(blocks).reshape(shape)
  return wrapped


# ----------------------------------------------------------------------------- Dense
def dense_apply(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
  """``x (..., P, (L+1)**2, F) @ kernel (P, L+1, F, O)`` per (parity, degree) block.

  One plain matmul per block (rows x F @ F x O): XLA runs these without the transposes a
  batched-over-degree contraction needs.
  """
  L = max_degree_of(x.shape)
  blocks = [jnp.einsum("...qf,fo->...qo", x[..., p, l * l:(l + 1) ** 2, :], kernel[p, l],
                       precision=precision)
            for p in range(x.shape[-3]) for l in range(L + 1)]
  y = jnp.concatenate(blocks, axis=-2) if len(blocks) > 1 else blocks[0]
  return y.reshape(*y.shape[:-2], x.shape[-3], (L + 1) ** 2, kernel.shape[-1])


class Dense(nn.Module):
  """Linear map per (parity channel, degree); equivariant because it mixes features only.

  ``(..., P, (L+1)**2, F_in) -> (..., P, (L+1)**2, features)``. The bias is added to the
  0+ channel only (any other bias would break equivariance).

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
  def __call__(self, x: jax.Array) -> jax.Array:
    L = max_degree_of(x.shape)
    P, F = x.shape[-3], x.shape[-1]
    kernel = self.param("kernel", _blockwise_init(self.kernel_init, P * (L + 1)),
                        (P, L + 1, F, self.features), self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
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


def _pad_rows(x: jax.Array, lo: int, total: int) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[-2] = (lo, total - lo - x.shape[-2])
  return jnp.pad(x, pad)


def _expand_weights(weights: jax.Array, rows: dict, total: int) -> jax.Array:
  """(num_paths, F) path weights -> (total, F): row q gets the weight of path rows[deg(q)]."""
  wz = jnp.concatenate([weights, jnp.zeros_like(weights[:1])])
  zero = weights.shape[0]
  idx = np.full(total, zero)
  for l, n in rows.items():
    idx[l * l:(l + 1) ** 2] = n
  return wz[idx]


def tensor_product(x1: jax.Array, x2: jax.Array, weights: jax.Array, paths: list, P3: int,
                   L3: int, cartesian_order: bool = True, precision: Any = None) -> jax.Array:
  """Weighted sum over coupling paths; ``weights (num_paths, F)`` follow ``paths``' order.

  Paths with a scalar (l=0) operand are a broadcast product, merged per parity combination into
  one elementwise op over the whole degree axis; the others are grouped per (l1, l2) into one
  contraction with their coupling blocks stacked over l3. Every group's result is zero-padded to
  the full degree axis and summed, which XLA fuses into few loops (no slice/concat chains).
  """
  L1, L2 = max_degree_of(x1.shape), max_degree_of(x2.shape)
  Q3 = (L3 + 1) ** 2
  groups: dict = {}
  for n, ((i1, l1), (i2, l2), (i3, l3)) in enumerate(paths):
    if l2 == 0:
      key = ("x1", i1, i2, i3)
      groups.setdefault(key, {})[l1] = n
    elif l1 == 0:
      key = ("x2", i1, i2, i3)
      groups.setdefault(key, {})[l2] = n
    else:
      groups.setdefault((i1, l1, i2, l2, i3), {})[l3] = n
  out = [None] * P3

  def add(i3, term, lo):
    term = _pad_rows(term, lo, Q3)
    out[i3] = term if out[i3] is None else out[i3] + term

  for key, rows in groups.items():
    if key[0] in ("x1", "x2"):
      kind, i1, i2, i3 = key
      vec, sca = (x1[..., i1, :, :], x2[..., i2, :1, :]) if kind == "x1" else (
          x2[..., i2, :, :], x1[..., i1, :1, :])
      top = max(rows)
      vec = vec[..., : (top + 1) ** 2, :]
      add(i3, vec * sca * _expand_weights(weights, rows, (top + 1) ** 2), 0)
      continue
    i1, l1, i2, l2, i3 = key
    lo, hi = min(rows) ** 2, (max(rows) + 1) ** 2
    cg = np.zeros((2 * l1 + 1, 2 * l2 + 1, hi - lo))
    for l3 in rows:
      cg[:, :, l3 * l3 - lo:(l3 + 1) ** 2 - lo] = so3.clebsch_gordan(l1, l2, l3, cartesian_order)
    a = x1[..., i1, l1 * l1:(l1 + 1) ** 2, :]
    b = x2[..., i2, l2 * l2:(l2 + 1) ** 2, :]
    term = jnp.einsum("...af,...bf,abc->...cf", a, b, jnp.asarray(cg, dtype=x1.dtype),
                      precision=precision)
    w = _expand_weights(weights, {l: n for l, n in rows.items()}, hi)[lo:]
    add(i3, term * w, lo)
  shape = jnp.broadcast_shapes(x1.shape[:-3], x2.shape[:-3]) + (Q3, x1.shape[-1])
  return jnp.stack([jnp.zeros(shape, x1.dtype) if o is None else jnp.broadcast_to(o, shape)
                    for o in out], axis=-3)


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
  def __call__(self, x1: jax.Array, x2: jax.Array) -> jax.Array:
    L1, L2 = max_degree_of(x1.shape), max_degree_of(x2.shape)
    if x1.shape[-1] != x2.shape[-1]:
      raise ValueError(f"feature dimensions differ: {x1.shape} vs {x2.shape}")
    L3 = max(L1, L2) if self.max_degree is None else self.max_degree
    p1, p2 = x1.shape[-3], x2.shape[-3]
    P3 = _output_parity(p1, L1, p2, L2, L3, self.include_pseudotensors)
    paths = so3.coupling_paths(p1, L1, p2, L2, L3, P3)
    F = x1.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (len(paths), F), self.param_dtype)
    x1, x2, kernel = nn.dtypes.promote_dtype(x1, x2, kernel, dtype=self.dtype)
    counts = _path_counts(paths)
    norm = np.asarray([1 / math.sqrt(counts[p[2]]) for p in paths])[:, None]
    return tensor_product(x1, x2, kernel * norm.astype(kernel.dtype), paths, P3, L3,
                          self.cartesian_order, self.precision)


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
  def __call__(self, x1: jax.Array, x2: jax.Array) -> jax.Array:
    L1, L2 = max_degree_of(x1.shape), max_degree_of(x2.shape)
    L3 = max(L1, L2) if self.max_degree is None else self.max_degree
    p1, p2, F = x1.shape[-3], x2.shape[-3], x1.shape[-1]
    P3 = _output_parity(p1, L1, p2, L2, L3, self.include_pseudotensors)
    paths = so3.coupling_paths(p1, L1, p2, L2, L3, P3)
    k1 = self.param("kernel1", self.kernel_init, (p1, L1 + 1, F), self.param_dtype)
    k2 = self.param("kernel2", self.kernel_init, (p2, L2 + 1, F), self.param_dtype)
    k3 = self.param("kernel3", self.kernel_init, (P3, L3 + 1, F), self.param_dtype)
    x1, x2, k1, k2, k3 = nn.dtypes.promote_dtype(x1, x2, k1, k2, k3, dtype=self.dtype)
    counts = _path_counts(paths)
    weights = jnp.stack([k1[i1, l1] * k2[i2, l2] * k3[i3, l3] / math.sqrt(counts[(i3, l3)])
                         for (i1, l1), (i2, l2), (i3, l3) in paths])
    return tensor_product(x1, x2, weights, paths, P3, L3, self.cartesian_order, self.precision)


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
    gates = nn.Dense(F * (P * (L + 1) - 1), dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=self.kernel_init, name="gate")(scalars)
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
    table = self.param("embedding", self.embedding_init, (self.num_embeddings, self.features),
                       self.param_dtype)
    return jnp.take(table, species, axis=0, mode="clip")[..., None, None, :]
