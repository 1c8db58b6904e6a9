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
    if L == 0:
      y = jnp.einsum("...pqf,pfo->...pqo", x, kernel[:, 0], precision=self.precision)
    else:
      # One matmul per degree block; cheaper than expanding the kernel over m.
      blocks = [jnp.einsum("...pqf,pfo->...pqo", x[..., l * l:(l + 1) ** 2, :], kernel[:, l],
                           precision=self.precision) for l in range(L + 1)]
      y = jnp.concatenate(blocks, axis=-2)
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


def _couple(x1: jax.Array, x2: jax.Array, path, cartesian_order: bool, precision) -> jax.Array:
  """Unweighted coupling of one path: blocks (..., 2l1+1, F) x (..., 2l2+1, F) -> (..., 2l3+1, F)."""
  (i1, l1), (i2, l2), (_, l3) = path
  a = x1[..., i1, l1 * l1:(l1 + 1) ** 2, :]
  b = x2[..., i2, l2 * l2:(l2 + 1) ** 2, :]
  if l1 == 0:  # C(0, l, l) is the identity
    return a * b
  if l2 == 0:
    return a * b
  c = jnp.asarray(so3.clebsch_gordan(l1, l2, l3, cartesian_order), dtype=x1.dtype)
  return jnp.einsum("...af,...bf,abc->...cf", a, b, c, precision=precision)


def _assemble(blocks: dict, P3: int, L3: int, like: jax.Array) -> jax.Array:
  """Stack per-(parity, degree) blocks into (..., P3, (L3+1)**2, F), zeros where absent."""
  channels = []
  for i3 in range(P3):
    parts = []
    for l3 in range(L3 + 1):
      blk = blocks.get((i3, l3))
      if blk is None:
        blk = jnp.zeros((*like.shape[:-2], 2 * l3 + 1, like.shape[-1]), like.dtype)
      parts.append(blk)
    channels.append(jnp.concatenate(parts, axis=-2) if len(parts) > 1 else parts[0])
  return jnp.stack(channels, axis=-3)


def _path_counts(paths) -> dict:
  counts: dict = {}
  for _, _, out in paths:
    counts[out] = counts.get(out, 0) + 1
  return counts


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
    blocks: dict = {}
    for n, path in enumerate(paths):
      out = path[2]
      term = _couple(x1, x2, path, self.cartesian_order, self.precision) * (
          kernel[n] / math.sqrt(counts[out]))
      blocks[out] = term if out not in blocks else blocks[out] + term
    like = jnp.broadcast_to(x1[..., :1, :1, :], jnp.broadcast_shapes(
        x1.shape[:-3], x2.shape[:-3]) + (1, 1, F))
    return _assemble(blocks, P3, L3, like[..., 0, :, :])


class FusedTensor(nn.Module):
  """Tensor product with path weights factorised as ``w1[p1,l1] * w2[p2,l2] * w3[p3,l3]``.

  Same shapes and path set as :class:`Tensor`, with ``O(L F)`` instead of ``O(L**3 F)``
  parameters: inputs are scaled per block, all paths into an output block are summed without
  weights, then the output block is scaled.

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
    x1 = x1 * k1[:, so3.degree_of_index(L1)]
    x2 = x2 * k2[:, so3.degree_of_index(L2)]
    counts = _path_counts(paths)
    blocks: dict = {}
    for path in paths:
      out = path[2]
      term = _couple(x1, x2, path, self.cartesian_order, self.precision)
      blocks[out] = term if out not in blocks else blocks[out] + term
    blocks = {out: b * (k3[out[0], out[1]] / math.sqrt(counts[out])) for out, b in blocks.items()}
    like = jnp.broadcast_to(x1[..., :1, :1, :], jnp.broadcast_shapes(
        x1.shape[:-3], x2.shape[:-3]) + (1, 1, F))
    return _assemble(blocks, P3, L3, like[..., 0, :, :])


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
