"""Energy-conservation regression suite on the shipped models (plugin.testing).

Short runs are in the default selection; the long ones (>= 20 ps) are marked slow:
``python3 -m pytest -m slow tests/test_conservation.py``.
"""

import jax.numpy as jnp
import pytest
from ase.build import molecule
from jax_md import space

import potentials
from plugin import jax_md as pj
from plugin import testing
from plugin.ase import Calculator


@pytest.fixture(scope="module")
def ethanol_model():
  return potentials.load("ethanol")


def _jax_md_args(pot, atoms):
  displacement, shift = space.free()
  neighbor_fn, energy_fn = pj.neighbor_list(pot, displacement, 100.0, species=atoms.numbers,
                                            dr_threshold=0.5)
  return dict(energy_fn=energy_fn, neighbor_fn=neighbor_fn, shift_fn=shift)


def test_ethanol_ase_short(ethanol_model):
  atoms = molecule("CH3CH2OH")
  report = testing.assert_energy_conserved(atoms, Calculator(ethanol_model), temperature=300,
                                           timestep=0.5, duration=0.5, warmup=0.05,
                                           max_drift=0.5)
  assert report.fluctuation < 0.5


def test_ethanol_jax_md_short(ethanol_model):
  atoms = molecule("CH3CH2OH")
  report = testing.assert_energy_conserved(atoms, temperature=300, timestep=0.5, duration=0.5,
                                           warmup=0.05, max_drift=0.5, dtype=jnp.float32,
                                           **_jax_md_args(ethanol_model, atoms))
  assert report.engine == "jax-md"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ase", "jax-md"])
def test_ethanol_long_float32(ethanol_model, engine):
  atoms = molecule("CH3CH2OH")
  kw = (dict(calculator=Calculator(ethanol_model)) if engine == "ase"
        else dict(dtype=jnp.float32, **_jax_md_args(ethanol_model, atoms)))
  testing.assert_energy_conserved(atoms, temperature=300, timestep=0.5, duration=20.0,
                                  warmup=1.0, sample_interval=20, max_drift=0.05, **kw)


@pytest.mark.slow
def test_ethanol_order_float64(ethanol_model):
  import jax
  if not jax.config.jax_enable_x64:
    pytest.skip("needs x64")
  atoms = molecule("CH3CH2OH")
  testing.assert_energy_conserved(atoms, Calculator(ethanol_model, dtype="float64"),
                                  temperature=300, timestep=0.5, duration=2.0, warmup=0.1,
                                  max_drift=0.5, order_range=(3.5, 4.5))
