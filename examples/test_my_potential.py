"""An energy-conservation test for your own potential, with eqattn's pytest fixture.

Installing eqattn registers a pytest plugin whose ``energy_conservation`` fixture runs NVE and
fails with the measured figures (drift in meV/atom/ps with its error bar, RMS fluctuation,
optionally the dt-halving ratio). Copy this file into your test suite and point ``MODEL`` and
``STRUCTURE`` at your own model file and a structure it describes; it works with any ASE
calculator (first test) and with any JAX-MD energy function (second test)::

    python -m pytest examples/test_my_potential.py   # or: python examples/test_my_potential.py
    EQATTN_MODEL=my_model.eqm EQATTN_STRUCTURE=my.xyz python -m pytest examples/test_my_potential.py

``EQATTN_PS`` sets the run length in ps (default 1), ``EQATTN_MAX_DRIFT`` the bound on
``|drift| + 2 sigma`` (default 0.05 meV/atom/ps; short runs need a looser one).
Bounds: LAMBench calls 0.5 meV/atom/ps
acceptable; a smooth conservative potential at a sensible timestep does far better.
"""

import os

import numpy as np
import pytest
from ase.build import molecule
from ase.io import read

import potentials
from plugin import testing
from plugin.ase import Calculator

MODEL = os.environ.get("EQATTN_MODEL", "ethanol")  # shipped name or .eqm path
STRUCTURE = os.environ.get("EQATTN_STRUCTURE")  # any ASE-readable file; default: ethanol
DURATION_PS = float(os.environ.get("EQATTN_PS", "1.0"))
# |drift| + 2 sigma bound, meV/atom/ps; short runs have wide error bars and need a looser one
MAX_DRIFT = float(os.environ.get("EQATTN_MAX_DRIFT", "0.05"))
TEMPERATURE_K = 300.0
TIMESTEP_FS = 0.5


@pytest.fixture(scope="module")
def potential():
  return potentials.load(MODEL)


@pytest.fixture
def atoms():
  return read(STRUCTURE) if STRUCTURE else molecule("CH3CH2OH")


def test_conserves_energy_with_ase(energy_conservation, potential, atoms):
  report = energy_conservation(
    atoms,
    Calculator(potential),
    temperature=TEMPERATURE_K,
    timestep=TIMESTEP_FS,
    duration=DURATION_PS,
    warmup=0.1 * DURATION_PS,
    max_drift=MAX_DRIFT,
  )
  print(report.summary())  # shown with pytest -s
  assert np.isfinite(report.fluctuation)


def test_conserves_energy_with_jax_md(energy_conservation, potential, atoms):
  # Any JAX-MD energy function works too, given with its neighbour list and shift function;
  # plugin.testing.jax_md_functions builds the three for an eqattn model and this structure.
  jm = testing.jax_md_functions(potential, atoms)
  energy_fn, neighbor_fn, shift = jm["energy_fn"], jm["neighbor_fn"], jm["shift_fn"]
  energy_conservation(
    atoms,
    energy_fn=energy_fn,
    neighbor_fn=neighbor_fn,
    shift_fn=shift,
    temperature=TEMPERATURE_K,
    timestep=TIMESTEP_FS,
    duration=DURATION_PS,
    warmup=0.1 * DURATION_PS,
    max_drift=MAX_DRIFT,
  )


if __name__ == "__main__":
  raise SystemExit(pytest.main([__file__, "-q", "-s", "-p", "no:cacheprovider"]))
