"""The ASE calculator and the JAX-MD energy function agree on the same structures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk
from jax_md import quantity, space

import potentials
from plugin import jax_md as pj
from plugin.ase import Calculator


@pytest.fixture(scope="module")
def pot():
  p = potentials.Potential.create(
    3,
    species=["Cu", "O"],
    cutoff=3.0,
    features=8,
    max_degree=1,
    num_iterations=2,
    num_heads=2,
    num_basis=6,
  )
  return p.replace(
    params={
      **p.params,
      "scale": np.array([15.0, 10.0], np.float32),
      "shift": np.array([-3.5, -4.0], np.float32),
    }
  )


@pytest.mark.parametrize("shear", [0.0, 0.6])
def test_ase_and_jax_md_agree(pot, shear):
  atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
  atoms.symbols[[3, 17]] = "O"
  cell = atoms.cell[:].copy()
  cell[1, 0] += shear  # triclinic when sheared
  atoms.set_cell(cell, scale_atoms=True)
  atoms.rattle(0.08, seed=4)
  atoms.wrap()

  atoms.calc = Calculator(pot, dtype="float64")
  e_ase = atoms.get_potential_energy()
  f_ase = atoms.get_forces()
  s_ase = atoms.get_stress(voigt=False)

  box = jnp.asarray(atoms.cell[:].T)  # jax-md: lattice vectors as columns
  displacement, _ = space.periodic_general(box)
  neighbor_fn, energy_fn = pj.neighbor_list(
    pot,
    displacement,
    box,
    atomic_numbers=atoms.numbers,
    dr_threshold=0.1,
    fractional_coordinates=True,
  )
  frac = jnp.asarray(atoms.get_scaled_positions())
  nbrs = neighbor_fn.allocate(frac)
  e_jm = float(energy_fn(frac, nbrs))
  f_jm = -np.asarray(jax.grad(energy_fn)(frac, nbrs))
  s_jm = -np.asarray(quantity.stress(energy_fn, frac, box, neighbor=nbrs))  # jax-md sign: -ASE

  assert abs(e_jm - e_ase) <= 1e-8 * abs(e_ase)
  np.testing.assert_allclose(f_jm, f_ase, rtol=0, atol=1e-8 * np.abs(f_ase).max())
  assert np.abs(f_ase).max() > 1e-2
  np.testing.assert_allclose(s_jm, s_ase, rtol=0, atol=1e-8 * np.abs(s_ase).max())
  np.testing.assert_allclose(atoms.get_potential_energies().sum(), e_ase, rtol=1e-12)
