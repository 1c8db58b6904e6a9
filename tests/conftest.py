"""Shared fixtures. Tests run with float64 enabled; float32 paths cast explicitly."""

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)


def random_cluster(n: int, seed: int = 0, box: float = 4.0) -> np.ndarray:
  """n atoms in a box with no two closer than 0.8 Å."""
  rng = np.random.default_rng(seed)
  pos = []
  while len(pos) < n:
    p = rng.uniform(0, box, 3)
    if all(np.linalg.norm(p - q) > 0.8 for q in pos):
      pos.append(p)
  return np.asarray(pos)


def all_pairs(pos: np.ndarray, cutoff: float):
  """Full directed pair list (dst sorted) of all pairs closer than cutoff."""
  n = len(pos)
  d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
  dst, src = np.nonzero((d < cutoff) & ~np.eye(n, dtype=bool))
  return dst.astype(np.int32), src.astype(np.int32)


def tiny_copper_potential(cutoff: float = 3.0):
  """A small random Cu model scaled to forces of ~1 eV/Å (as in a real metal at room
  temperature), so MD tests move atoms through a real landscape; shift = a lone atom's energy.
  Without density features: a random density term times the scale of 20 makes forces ~10x
  larger than that (the model tests cover density features)."""
  import jax.numpy as jnp
  import potentials
  p = potentials.Potential.create(0, species=["Cu"], cutoff=cutoff, features=8, max_degree=1,
                                  num_iterations=1, num_heads=2, num_basis=6,
                                  density_features=False)
  return p.replace(params=dict(p.params, scale=jnp.array([20.0], jnp.float32),
                               shift=jnp.array([-3.5], jnp.float32)))


@pytest.fixture(scope="session")
def cluster():
  pos = random_cluster(7, seed=3)
  dst, src = all_pairs(pos, 3.5)
  return pos, dst, src
