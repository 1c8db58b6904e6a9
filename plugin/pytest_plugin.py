"""pytest plugin (registered through the ``pytest11`` entry point when eqattn is installed).

Gives every test suite an ``energy_conservation`` fixture::

    def test_my_potential_conserves_energy(energy_conservation):
        atoms = ase.build.bulk("Cu", cubic=True).repeat(2)
        report = energy_conservation(atoms, MyCalculator(), temperature=600, timestep=2.0,
                                     duration=2.0, max_drift=0.5)
        assert report.fluctuation < 0.1

    # K independent replicas in one program: drift = mean, error = spread across them
    energy_conservation(atoms, energy_fn=..., neighbor_fn=..., shift_fn=..., replicas=8)

and the ``energy_conservation`` marker for tagging such (often slow) tests.
"""

import pytest


def pytest_configure(config):
  config.addinivalue_line(
    "markers", "energy_conservation: NVE energy-conservation check (eqattn plugin.testing)"
  )


@pytest.fixture
def energy_conservation():
  """``plugin.testing.assert_energy_conserved``: runs NVE, fails with the measured figures.
  ``replicas=K`` runs K independent copies (one compiled program on the JAX-MD engine) and
  bounds the mean drift with the standard error across them."""
  from plugin.testing import assert_energy_conserved

  return assert_energy_conserved
