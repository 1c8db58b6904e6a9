#!/usr/bin/env bash
# The oldest jax/jaxlib that pyproject.toml allows: a fresh venv with both pinned to the lower
# bound, eqattn with its test extra, then the README's test command (extra arguments go to
# pytest). CI (.ci/run) tests the newest allowed; run this before changing the bounds.
#   bash .ci/oldest-jax.sh                      # venv in .venv-oldest-jax/
#   VENV=/tmp/v bash .ci/oldest-jax.sh -x tests/test_ase.py
#   JAX_VERSION=0.11.2 VENV=/tmp/v11 bash .ci/oldest-jax.sh   # any other release, same way
set -euo pipefail
cd "$(dirname "$0")/.."
version=${JAX_VERSION:-$(python3 -c '
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(re.search(r">=\s*([0-9.]+)", next(d for d in deps if re.match(r"jax\W", d))).group(1))')}
venv=${VENV:-.venv-oldest-jax}
echo "jax $version (venv $venv)"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -e '.[test]' "jax==$version" "jaxlib==$version"
"$venv/bin/python" -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__)'
"$venv/bin/python" -m pytest "$@"
