"""plugin.jax_md_import: importing eqattn changes no other package; the eqattn command (and
a script that asks) loads only the JAX-MD submodules it uses, and users' JAX-MD code keeps
working (submodules load on first use)."""

import subprocess
import sys
import types

from plugin import jax_md_import

FRESH = """
import sys
from plugin import jax_md_import
jax_md_import.install()
import plugin.md.engine, plugin.md.driver, plugin.md.replicas, plugin.testing
heavy = sorted({"jax_md.energy", "jax_md.nn", "jax_md.rigid_body", "e3nn_jax"} & set(sys.modules))
assert not heavy, heavy
import jax_md
from jax_md import minimize
assert jax_md.energy.lennard_jones_pair and minimize.fire_descent
assert "jax_md.energy" in sys.modules and "jax_md.minimize" in sys.modules
try:
  jax_md.no_such_module
except AttributeError as e:
  assert "no attribute 'no_such_module'" in str(e)
else:
  raise SystemExit("no AttributeError")
print("ok")
"""


def test_only_the_submodules_eqattn_uses_are_imported():
  done = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


UNTOUCHED = """
import sys
import plugin, plugin.ase, plugin.md, plugin.cli, plugin.testing, potentials
assert "jax_md" not in sys.modules or "eqattn" not in (sys.modules["jax_md"].__doc__ or "")
import plugin.jax_md
import jax_md
assert jax_md.energy.__name__ == "jax_md.energy" and "eqattn" not in (jax_md.__doc__ or "")
print("ok")
"""


def test_importing_eqattn_changes_no_other_package():
  done = subprocess.run(
    [sys.executable, "-c", UNTOUCHED], capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_an_imported_jax_md_is_left_alone(monkeypatch):
  mine = types.ModuleType("jax_md")
  monkeypatch.setitem(sys.modules, "jax_md", mine)
  jax_md_import.install()
  assert sys.modules["jax_md"] is mine
