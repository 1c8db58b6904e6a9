"""Start-up time: ``eqattn md --steps 200`` and the ASE calculator's first call, cold vs warm
persistent compilation cache (``plugin.cache``).

Each measurement is a new Python process in a new empty directory, timed from outside (so
Python start-up and imports count), with ``EQATTN_CACHE_DIR`` pointing at a fresh folder for
the cold run and at the same folder again for the warm one:

* ``eqattn md --steps 200``: the shipped ethanol model, NVT 300 K (the command's defaults);
* ASE: ``Calculator(potentials.load("ethanol"))`` and the first ``get_forces()`` on ethanol,
  timed inside the process (imports reported apart), the cache enabled by
  ``plugin.enable_compilation_cache``.

With ``--breakdown`` each process runs again with ``JAX_LOG_COMPILES=1``, and the time JAX
spends tracing, lowering to MLIR and compiling with XLA is summed from its log; the rest
(imports, neighbour lists, the steps themselves, output) is what remains.

Run::

    python benchmarks/startup.py               # the table in the README
    python benchmarks/startup.py --breakdown   # also where the time goes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ASE_SNIPPET = """
import json, sys, time
t0 = time.perf_counter()
from ase.build import molecule
import potentials, plugin
from plugin.ase import Calculator
plugin.enable_compilation_cache(sys.argv[1])
t1 = time.perf_counter()
atoms = molecule("CH3CH2OH")
atoms.calc = Calculator(potentials.load("ethanol"))
atoms.get_forces()
t2 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "first_call": t2 - t1}))
"""

LOG = re.compile(
  r"Finished (tracing|jaxpr to MLIR module conversion|XLA compilation) .* in "
  r"([0-9.e+-]+) sec"
)
PHASES = {
  "tracing": "tracing",
  "jaxpr to MLIR module conversion": "lowering",
  "XLA compilation": "xla",
}


def run(argv, cache: Path, log: bool):
  env = dict(
    os.environ,
    EQATTN_CACHE_DIR=str(cache),
    PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
  )
  if log:
    env["JAX_LOG_COMPILES"] = "1"
  with tempfile.TemporaryDirectory() as cwd:
    t0, c0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
  if proc.returncode:
    raise SystemExit(f"{argv} failed:\n{proc.stderr[-3000:]}")
  phases = {"cpu": cpu, **{v: 0.0 for v in PHASES.values()}}
  for kind, seconds in LOG.findall(proc.stderr):
    phases[PHASES[kind]] += float(seconds)
  phases["hits"] = proc.stderr.count("Persistent compilation cache hit")
  return wall, proc.stdout, phases


def _children_cpu() -> float:
  """CPU seconds (user + system) of finished child processes: on a busy shared machine the
  closest figure to the wall time the same run takes on an idle core."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def md(cache, log=False):
  argv = [sys.executable, "-m", "plugin.cli", "md", "--steps", "200"]
  wall, _, phases = run(argv, cache, log)
  return {"wall": wall, **phases}


def ase_first_call(cache, log=False):
  wall, out, phases = run([sys.executable, "-c", ASE_SNIPPET, str(cache)], cache, log)
  return {"wall": wall, **json.loads(out.strip().splitlines()[-1]), **phases}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument(
    "--breakdown",
    action="store_true",
    help="also time tracing / lowering / XLA compilation from JAX's log",
  )
  args = ap.parse_args(argv)
  import jax

  print(
    f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
    f"(affinity {len(os.sched_getaffinity(0))}), jax {jax.__version__}"
  )
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, fn in (("eqattn md --steps 200", md), ("ASE first call, ethanol", ase_first_call)):
      cache = Path(tmp) / name.split()[0]
      cold, warm = fn(cache), fn(cache)
      rows.append((name, cold, warm))
      if args.breakdown:
        # Logged runs: cold in a new folder, then warm on that one.
        logged = Path(tmp) / (name.split()[0] + "-log")
        rows.append((name + " (logged)", fn(logged, True), fn(logged, True)))
  print("\n| what | cold cache: wall (CPU) s | warm cache: wall (CPU) s |\n|---|---:|---:|")
  for name, cold, warm in rows:
    if "(logged)" not in name:
      extra = (
        f" (imports {cold['imports']:.1f} / {warm['imports']:.1f}, first call "
        f"{cold['first_call']:.2f} / {warm['first_call']:.2f})"
        if "first_call" in cold
        else ""
      )
      print(
        f"| {name}: process{extra} | {cold['wall']:.1f} ({cold['cpu']:.1f}) | "
        f"{warm['wall']:.1f} ({warm['cpu']:.1f}) |"
      )
  if args.breakdown:
    print(
      "\n| process | cache | wall | CPU | tracing | lowering | XLA compile or cache load "
      "| rest | cache hits |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for name, cold, warm in rows:
      if "(logged)" in name:
        for label, r in (("cold", cold), ("warm", warm)):
          rest = r["wall"] - r["tracing"] - r["lowering"] - r["xla"]
          print(
            f"| {name.replace(' (logged)', '')} | {label} | {r['wall']:.1f} | "
            f"{r['cpu']:.1f} | {r['tracing']:.1f} | {r['lowering']:.1f} | {r['xla']:.1f} | "
            f"{rest:.1f} | {r['hits']} |"
          )


if __name__ == "__main__":
  main()
