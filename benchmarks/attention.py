"""Forward + backward time of potentials.SelfAttention vs e3x.nn.SelfAttention, side by side.

Both layers are built with identical constructor arguments and run on identical inputs (random
atoms, each with its k nearest neighbours as pairs, scalar input features, e3x's own
reciprocal-Bernstein basis with a smooth cutoff). Timed: one jitted call computing the loss
sum(out**2) and its gradient with respect to parameters, features and basis (the basis gradient
is what forces need). Runs alternate between the two implementations so that machine noise hits
both alike; the table reports medians and the ratio ours / e3x.

    python benchmarks/attention.py                 # the README table (degrees 2 and 4)
    python benchmarks/attention.py --heads 4 --repeats 100

Needs the `bench` extra (pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import potentials


def make_inputs(
  num_atoms: int, neighbors: int, features: int, num_basis: int, degree: int, seed: int = 0
):
  import e3x

  rng = np.random.default_rng(seed)
  box = (num_atoms / 0.08) ** (1 / 3)  # ~0.08 atoms/A^3, liquid-like density
  pos = rng.uniform(0, box, size=(num_atoms, 3))
  d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
  np.fill_diagonal(d, np.inf)
  src = np.argsort(d, axis=1)[:, :neighbors].ravel()
  dst = np.repeat(np.arange(num_atoms), neighbors)
  cutoff = float(d[dst, src].max()) + 0.5
  r = jnp.asarray(pos[src] - pos[dst], jnp.float32)
  basis, cut = e3x.nn.basis(
    r,
    max_degree=degree,
    num=num_basis,
    radial_fn=e3x.nn.reciprocal_bernstein,
    cutoff_fn=functools.partial(e3x.nn.smooth_cutoff, cutoff=cutoff),
    return_cutoff=True,
  )
  x = jnp.asarray(rng.normal(size=(num_atoms, 1, 1, features)), jnp.float32)
  idx = dict(
    dst_idx=jnp.asarray(dst, jnp.int32),
    src_idx=jnp.asarray(src, jnp.int32),
    num_segments=num_atoms,
    indices_are_sorted=True,
  )
  return x, basis, cut, idx


def make_step(module, x, basis, cut, idx):
  params = module.init(jax.random.PRNGKey(0), x, basis, cut, **idx)

  def loss(params, x, basis):
    return jnp.sum(module.apply(params, x, basis, cut, **idx) ** 2)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  jax.block_until_ready(step(params, x, basis))  # compile
  return lambda: jax.block_until_ready(step(params, x, basis))


def measure(steps: dict, repeats: int) -> dict:
  times = {k: [] for k in steps}
  for _ in range(repeats):
    for k, f in steps.items():  # interleaved
      t = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t)
  return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--degrees", type=int, nargs="+", default=[2, 4])
  ap.add_argument("--atoms", type=int, default=64)
  ap.add_argument("--neighbors", type=int, default=30)
  ap.add_argument("--features", type=int, default=32)
  ap.add_argument("--basis", type=int, default=16)
  ap.add_argument("--heads", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=60)
  args = ap.parse_args(argv)
  import e3x

  print(
    f"# SelfAttention fwd+bwd: {args.atoms} atoms x {args.neighbors} neighbours, "
    f"F={args.features}, K={args.basis}, heads={args.heads}, float32; "
    f"jax {jax.__version__}, e3x {e3x.__version__}, {jax.devices()[0].platform} "
    f"({platform.processor() or platform.machine()})"
  )
  print("| max_degree | ours (ms) | e3x (ms) | ours / e3x |")
  print("|---|---|---|---|")
  rows = []
  for L in args.degrees:
    x, basis, cut, idx = make_inputs(args.atoms, args.neighbors, args.features, args.basis, L)
    kw = dict(max_degree=L, num_heads=args.heads)
    steps = {
      "ours": make_step(potentials.SelfAttention(**kw), x, basis, cut, idx),
      "e3x": make_step(e3x.nn.SelfAttention(**kw), x, basis, cut, idx),
    }
    t = measure(steps, args.repeats)
    ratio = t["ours"] / t["e3x"]
    rows.append((L, t["ours"], t["e3x"], ratio))
    print(f"| {L} | {t['ours']:.2f} | {t['e3x']:.2f} | {ratio:.2f} |", flush=True)
  return rows


if __name__ == "__main__":
  main()
