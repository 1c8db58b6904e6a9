"""Energy + forces of the default eqattn model vs the same architecture built from e3x layers.

Systems: random liquid-like periodic boxes at a density that gives ~30 neighbours per atom
within the 5 Å cutoff, 64 / 512 / 4096 atoms. Both models get the identical pair list and
compute E and F = -dE/dR in one jitted call (float32). The e3x model has the same
hyperparameters (features 32, max_degree 2, 3 iterations, 2 heads, 16 reciprocal-Bernstein
functions, smooth cutoff, no pseudotensors, scalar-only last block) with e3x's SelfAttention,
Dense and gated silu. Runs alternate between the two; the table gives medians in microseconds
per atom and XLA's peak buffer estimate (arguments + outputs + temporaries) per compiled call.

    python benchmarks/model.py                  # README table
    python benchmarks/model.py --sizes 64 512 --repeats 20
"""

from __future__ import annotations

import argparse
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import potentials


def liquid_box(num_atoms: int, neighbors: float = 30.0, cutoff: float = 5.0, seed: int = 0):
  """Random positions in a cubic periodic box (min. distance 1.6 Å) and the full pair list."""
  import vesin

  density = neighbors / (4 / 3 * np.pi * cutoff**3)
  length = (num_atoms / density) ** (1 / 3)
  rng = np.random.default_rng(seed)
  pos = np.empty((0, 3))
  while len(pos) < num_atoms:  # random sequential addition keeps atoms apart
    cand = rng.uniform(0, length, size=(num_atoms, 3))
    for c in cand:
      if len(pos) == num_atoms:
        break
      d = pos - c
      d -= length * np.round(d / length)
      if len(pos) == 0 or np.min(np.sum(d * d, axis=1)) > 1.6**2:
        pos = np.vstack([pos, c])
  cell = np.eye(3) * length
  i, j, s = vesin.NeighborList(cutoff=cutoff, full_list=True).compute(
    points=pos, box=cell, periodic=True, quantities="ijS"
  )
  order = np.argsort(i, kind="stable")
  return pos, cell, i[order].astype(np.int32), j[order].astype(np.int32), s[order]


class E3xEnergyModel(nn.Module):
  """The eqattn architecture assembled from e3x modules (benchmark reference only)."""

  features: int = 32
  max_degree: int = 2
  num_iterations: int = 3
  num_heads: int = 2
  num_basis: int = 16
  cutoff: float = 5.0

  @nn.compact
  def __call__(self, species, r, dst, src):
    import e3x

    n = species.shape[0]
    basis, cut = e3x.nn.basis(
      r,
      max_degree=self.max_degree,
      num=self.num_basis,
      radial_fn=e3x.nn.reciprocal_bernstein,
      cutoff_fn=functools.partial(e3x.nn.smooth_cutoff, cutoff=self.cutoff),
      return_cutoff=True,
    )
    x = e3x.nn.Embed(num_embeddings=8, features=self.features)(species)
    for it in range(self.num_iterations):
      degree = 0 if it == self.num_iterations - 1 else self.max_degree
      y = e3x.nn.SelfAttention(
        max_degree=degree, num_heads=self.num_heads, include_pseudotensors=False
      )(x, basis, cut, dst_idx=dst, src_idx=src, num_segments=n, indices_are_sorted=True)
      x = e3x.nn.change_max_degree_or_type(x, max_degree=degree, include_pseudotensors=False) + y
      h = e3x.nn.silu(e3x.nn.Dense(self.features)(x))
      x = x + e3x.nn.Dense(self.features)(h)
    s = nn.silu(nn.Dense(self.features)(x[:, 0, 0, :]))
    return nn.Dense(1)(s)[:, 0]


def energy_forces_step(energies_fn, params, species, pos, cell, dst, src, shifts):
  def total(pos):
    r = pos[src] - pos[dst] + shifts @ cell
    return jnp.sum(energies_fn(params, species, r, dst, src))

  step = jax.jit(jax.value_and_grad(total))
  compiled = step.lower(pos).compile()
  mem = compiled.memory_analysis()
  peak = (
    mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    if mem is not None
    else float("nan")
  )
  jax.block_until_ready(step(pos))
  return (lambda: jax.block_until_ready(step(pos))), peak


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", type=int, nargs="+", default=[64, 512, 4096])
  ap.add_argument("--repeats", type=int, default=15)
  args = ap.parse_args(argv)

  pot = potentials.Potential.create(0, species=["Cu"], cutoff=5.0, repulsion=False)
  cfg = pot.config
  ours_fn = pot.atomic_energies_from_pairs_fn()
  ref = E3xEnergyModel(
    features=cfg.features,
    max_degree=cfg.max_degree,
    num_iterations=cfg.num_iterations,
    num_heads=cfg.num_heads,
    num_basis=cfg.num_basis,
    cutoff=cfg.cutoff,
  )
  print(
    f"# energy+forces, float32, jax {jax.__version__}, {jax.devices()[0].platform}; "
    f"eqattn default model ({cfg.features} features, L={cfg.max_degree}, "
    f"{cfg.num_iterations} iterations, {cfg.num_heads} heads)"
  )
  print(
    "| atoms | pairs/atom | ours (µs/atom) | e3x (µs/atom) | ours / e3x "
    "| ours peak MB | e3x peak MB |"
  )
  print("|---|---|---|---|---|---|---|")
  rows = []
  for n in args.sizes:
    pos, cell, dst, src, shifts = liquid_box(n)
    species = jnp.zeros(n, jnp.int32)
    arrays = (
      jnp.asarray(pos, jnp.float32),
      jnp.asarray(cell, jnp.float32),
      jnp.asarray(dst),
      jnp.asarray(src),
      jnp.asarray(shifts, jnp.float32),
    )
    ref_params = ref.init(
      jax.random.PRNGKey(0),
      species,
      arrays[0][arrays[3]] - arrays[0][arrays[2]],
      arrays[2],
      arrays[3],
    )
    ours = functools.partial(ours_fn, indices_are_sorted=True)
    steps = {}
    steps["ours"], mem_ours = energy_forces_step(
      lambda p, s, r, d, j: ours(p, s, r, d, j), pot.params, species, *arrays
    )
    steps["e3x"], mem_e3x = energy_forces_step(
      lambda p, s, r, d, j: ref.apply(p, s, r, d, j), ref_params, species, *arrays
    )
    times = {k: [] for k in steps}
    for _ in range(args.repeats):
      for k, f in steps.items():
        t = time.perf_counter()
        f()
        times[k].append(time.perf_counter() - t)
    us = {k: float(np.median(v)) / n * 1e6 for k, v in times.items()}
    ratio = us["ours"] / us["e3x"]
    rows.append((n, us["ours"], us["e3x"], ratio, mem_ours, mem_e3x))
    print(
      f"| {n} | {len(dst) / n:.1f} | {us['ours']:.1f} | {us['e3x']:.1f} | {ratio:.2f} | "
      f"{mem_ours / 2**20:.1f} | {mem_e3x / 2**20:.1f} |",
      flush=True,
    )
  return rows


if __name__ == "__main__":
  main()
