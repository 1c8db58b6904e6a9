"""JAX-MD NVT (Langevin) then NVE of ethanol with the shipped ``ethanol`` model.

Written against JAX-MD's own API, as a JAX-MD user would: ``space.free()``, the neighbour list
and energy function from ``plugin.jax_md.neighbor_list``, ``simulate.nvt_langevin`` and
``simulate.nve``, and jitted chunks of steps in a ``lax.fori_loop`` with the list updated at
every step. (``plugin.md.run`` packages all of this, with trajectories and resume.)::

    python examples/jax_md_ethanol.py                  # 0.5 ps NVT + 0.5 ps NVE at 300 K, float32
    python examples/jax_md_ethanol.py --x64            # the same in float64

Units inside JAX-MD: Å, eV, amu, time in Å sqrt(amu/eV) (= 10.18 fs), kT in eV.
"""

from __future__ import annotations

import argparse
import time
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from ase.build import molecule
from jax_md import quantity, simulate, space

import potentials
from plugin import jax_md as eq_jax_md
from plugin.md import FS, KB  # 1 fs and k_B in JAX-MD's metal units


def make_chunk(apply_fn, steps: int):
  """``steps`` integrator steps in one jitted call; the list is updated before each step."""

  @jax.jit
  def chunk(state, nbrs):
    def body(_, carry):
      state, nbrs = carry
      nbrs = nbrs.update(state.position)
      return apply_fn(state, neighbor=nbrs), nbrs

    return jax.lax.fori_loop(0, steps, body, (state, nbrs))

  return chunk


def run_phase(name, chunk_fn, state, nbrs, neighbor_fn, energy_fn, chunks, chunk, dt_fs):
  """Runs ``chunks`` chunks; an overflowed neighbour list is re-allocated and the chunk redone
  from its start state, so no step uses a truncated list. Returns the state, list and the
  total energies (eV) after each chunk."""
  etot = []
  for c in range(chunks):
    new_state, new_nbrs = chunk_fn(state, nbrs)
    while bool(new_nbrs.did_buffer_overflow):
      nbrs = neighbor_fn.allocate(state.position)  # more room, from the chunk's start
      new_state, new_nbrs = chunk_fn(state, nbrs)
    state, nbrs = new_state, new_nbrs
    epot = float(energy_fn(state.position, nbrs))
    ekin = float(quantity.kinetic_energy(momentum=state.momentum, mass=state.mass))
    temp = float(quantity.temperature(momentum=state.momentum, mass=state.mass)) / KB
    etot.append(epot + ekin)
    print(
      f"{name} t {(c + 1) * chunk * dt_fs / 1000:6.3f} ps  T {temp:6.1f} K  "
      f"Epot {epot:10.4f} eV  Etot {epot + ekin:10.4f} eV",
      flush=True,
    )
  return state, nbrs, np.asarray(etot)


def main(argv: Optional[List[str]] = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="ethanol", help="shipped model name or .eqm path")
  ap.add_argument("--temperature", type=float, default=300.0, help="K")
  ap.add_argument("--dt", type=float, default=0.5, help="timestep in fs")
  ap.add_argument("--nvt-steps", type=int, default=1000)
  ap.add_argument("--nve-steps", type=int, default=1000)
  ap.add_argument("--chunk", type=int, default=200, help="steps per jitted call")
  ap.add_argument("--friction", type=float, default=0.02, help="Langevin friction in 1/fs")
  ap.add_argument("--x64", action="store_true", help="run in float64")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  if args.x64:
    jax.config.update("jax_enable_x64", True)
  dtype = jnp.float64 if args.x64 else jnp.float32

  atoms = molecule("CH3CH2OH")
  pot = potentials.load(args.model)
  displacement, shift = space.free()
  R = jnp.asarray(atoms.positions - atoms.positions.mean(axis=0), dtype)
  # For space.free the box only bounds the cell-list region; a 9-atom molecule needs none.
  neighbor_fn, energy_fn = eq_jax_md.neighbor_list(
    pot, displacement, 20.0, atomic_numbers=atoms.numbers, dr_threshold=0.5, disable_cell_list=True
  )
  nbrs = neighbor_fn.allocate(R)
  mass = jnp.asarray(atoms.get_masses(), dtype)
  dt = args.dt * FS
  kT = args.temperature * KB

  nvt_init, nvt_apply = simulate.nvt_langevin(
    energy_fn, shift, dt=dt, kT=kT, gamma=args.friction / FS
  )
  state = nvt_init(jax.random.PRNGKey(args.seed), R, mass=mass, neighbor=nbrs)
  start = time.perf_counter()
  nvt_chunks = max(1, args.nvt_steps // args.chunk)
  state, nbrs, _ = run_phase(
    "NVT",
    make_chunk(nvt_apply, args.chunk),
    state,
    nbrs,
    neighbor_fn,
    energy_fn,
    nvt_chunks,
    args.chunk,
    args.dt,
  )

  # NVE continues from the thermalised positions and momenta.
  _, nve_apply = simulate.nve(energy_fn, shift, dt=dt)
  state = simulate.NVEState(state.position, state.momentum, state.force, state.mass)
  nve_chunks = max(1, args.nve_steps // args.chunk)
  state, nbrs, etot = run_phase(
    "NVE",
    make_chunk(nve_apply, args.chunk),
    state,
    nbrs,
    neighbor_fn,
    energy_fn,
    nve_chunks,
    args.chunk,
    args.dt,
  )
  seconds = time.perf_counter() - start
  steps = (nvt_chunks + nve_chunks) * args.chunk
  etot = etot / len(atoms)
  t_ps = np.arange(1, len(etot) + 1) * args.chunk * args.dt / 1000
  drift = np.polyfit(t_ps, etot, 1)[0] * 1e3 if len(etot) > 2 else float("nan")
  print(
    f"{steps} steps in {seconds:.1f} s ({steps / seconds:.0f} steps/s incl. compilation); "
    f"NVE drift {drift:+.4f} meV/atom/ps, spread {np.ptp(etot) * 1e3:.4f} meV/atom "
    f"({'float64' if args.x64 else 'float32'})"
  )
  return {
    "drift_mev_atom_ps": float(drift),
    "spread_mev_atom": float(np.ptp(etot) * 1e3),
    "steps": steps,
    "final_positions": np.asarray(state.position),
  }


if __name__ == "__main__":
  main()
