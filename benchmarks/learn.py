"""Active learning against uniform sampling, side by side (``plugin.learn``, issue 33).

From one start structure, three models of one architecture (the shallow ensemble ``learn``
trains) get the same training time:

* **learn**: ``plugin.learn.learn`` with its defaults, within ``--minutes`` and ``--max-labels``;
* **uniform**: as many reference calls as learn made, spent on frames taken at fixed intervals
  from reference MD at learn's temperatures (baseline a);
* **ceiling**: ``--ceiling-frames`` (>= 2000) such frames (baseline b).

All are evaluated on independent reference MD trajectories (other seeds) at an in-range and an
above-range temperature (force MAE meV/Å, energy MAE meV/atom); the learnt model then runs
``--stable-ps`` of NVT at the top temperature under ``plugin.md.run``'s default guards, and
the cost per MD step is measured against the reference's::

    python benchmarks/learn.py --system ptni --minutes 20 --out out/learn/ptni \\
        --json docs/benchmarks/learn/ptni.json
    python benchmarks/learn.py --report docs/benchmarks/learn/*.json   # the docs' table

Systems (none tuned on: not ethanol, copper, acetamide, Ni-Al, DMSO, Cu-Au, Ag-Pd): ``ptni``
(Pt3Ni fcc, 32 atoms, EMT), ``glycine`` (GFN2-xTB, needs tblite), ``si`` (64 Si, CHGNet as
teacher through ``module:callable``: ``learn:chgnet`` (this file), needs chgnet installed).
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import numpy as np

import potentials
from plugin import enable_compilation_cache, md
from plugin.ase import Calculator
from plugin.data import frame_from_atoms, read_images
from plugin.learn import LearnOptions, learn, loop, reference_from_spec
from potentials import training

SYSTEMS = {  # name: (reference spec, temperatures K, test temperatures: in range, above)
  "ptni": ("emt", (300.0, 900.0), (600.0, 1200.0)),
  "glycine": ("gfn2", (300.0, 600.0), (450.0, 800.0)),
  "si": ("learn:chgnet", (300.0, 900.0), (600.0, 1200.0)),
}


def chgnet():
  """CHGNet (its wheel carries the weights) as an ASE calculator on the CPU."""
  from chgnet.model.dynamics import CHGNetCalculator

  return CHGNetCalculator(use_device="cpu")


def start_structure(name: str):
  import ase.build

  if name == "ptni":
    a = ase.build.bulk("Pt", "fcc", a=3.87, cubic=True).repeat((2, 2, 2))
    numbers = a.numbers.copy()
    numbers[np.random.default_rng(0).permutation(len(a))[: len(a) // 4]] = 28
    a.numbers = numbers
    return a
  if name == "glycine":
    from ase import Atoms

    return Atoms(
      "NCCOOHHHHH",
      positions=[
        [-1.60, 0.35, 0.00], [-0.38, -0.42, 0.00], [0.87, 0.43, 0.00], [0.85, 1.65, 0.00],
        [2.01, -0.28, 0.00], [-1.58, 0.97, 0.80], [-0.38, -1.07, 0.88], [-0.38, -1.07, -0.88],
        [2.78, 0.31, 0.00], [-1.58, 0.97, -0.80],
      ],
    )  # fmt: skip
  return ase.build.bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))


def reference_set(args, spec, temps, label: str, frames: int, seed: int) -> list:
  """Reference MD frames (cached as extxyz in --out), ``frames`` per temperature."""
  out = []
  for k, t in enumerate(temps):
    path = Path(args.out) / f"{label}-{t:g}K-s{seed}.extxyz"
    if not path.exists():
      tmp = path.with_suffix(".tmp.extxyz")
      start = start_structure(args.system)
      dt = LearnOptions().timestep_for(start.numbers)
      md.run_ase(
        start, reference_from_spec(spec), ensemble="nvt_langevin", timestep=dt,
        steps=(frames + 10) * args.interval, temperature=t, interval=args.interval,
        seed=seed + k, traj=str(tmp),
      )  # fmt: skip
      tmp.rename(path)
    images = read_images(str(path))[10:][:frames]  # the first 10 frames: equilibration
    for a in images:
      a.info["temperature_K"] = t
    out.extend(images)
  return out


def train_on(images, minutes: float, seed: int, species) -> potentials.Potential:
  """The learn recipe's model and trainer on ``images`` for ``minutes``."""
  o = LearnOptions()
  pot = potentials.Potential.create(
    seed, species=species, readout_heads=o.readout_heads, force_heads=True
  )
  frames = [frame_from_atoms(a, pot.cutoff) for a in images]
  cfg = training.TrainConfig(time_limit=minutes, split="random", test_fraction=0.0)
  return training.train(pot, frames, cfg, progress=False).potential


def errors(pot, images) -> dict:
  """learn's own figures (meV/Å, meV/atom) on reference frames."""
  return loop.errors(pot, [frame_from_atoms(a, pot.cutoff) for a in images])


def stability(pot, start, temperature: float, ps: float) -> dict:
  dt = LearnOptions().timestep_for(start.numbers)
  steps = int(round(ps * 1000 / dt))
  r = md.run(start, pot, ensemble="nvt_langevin", temperature=temperature, timestep=dt,
             total_steps=steps, chunk=min(500, steps))  # fmt: skip
  return {"ps_requested": ps, "ps_stable": r.steps * dt / 1000, "stopped": r.stopped,
          "reason": r.reason}  # fmt: skip


def cost(pot, start, spec: str, repeats: int = 20) -> dict:
  """ms per energy+forces call: the learnt model (ASE calculator, warm) and the reference."""
  out = {}
  for name, calc in (("eqattn", Calculator(pot)), ("reference", reference_from_spec(spec))):
    a = start.copy()
    a.calc = calc
    a.get_forces()
    t = time.perf_counter()
    for k in range(repeats):
      a.positions[0, 0] += 1e-4 * (-1) ** k
      a.get_forces()
    out[f"{name}_ms"] = 1e3 * (time.perf_counter() - t) / repeats
  out["speed_up"] = out["reference_ms"] / out["eqattn_ms"]
  return out


def run(args) -> dict:
  from provenance import provenance  # benchmarks/ is the script's folder

  spec, temps, test_temps = SYSTEMS[args.system]
  enable_compilation_cache()  # as the eqattn command does
  Path(args.out).mkdir(parents=True, exist_ok=True)
  start = start_structure(args.system)
  species = sorted({potentials.elements.symbol(z) for z in start.numbers})
  test = reference_set(args, spec, test_temps, "test", args.test_frames, seed=1000)
  options = LearnOptions(reference=spec, temperatures=temps, time_limit=args.minutes,
                         max_labels=args.max_labels)  # fmt: skip
  result = learn([start], out=Path(args.out) / "learn", options=options, resume=args.resume)
  report = result.report
  calls = report["reference_calls"]
  train_minutes = sum(r.get("train_minutes", 0) for r in report["rounds"])
  train_minutes += (report.get("final") or {}).get("train_minutes", 0)
  pool = reference_set(args, spec, temps, "pool", args.ceiling_frames // len(temps), seed=0)
  uniform = pool[:: max(1, len(pool) // calls)][:calls]
  learnt = read_images(str(Path(args.out) / "learn" / "labels.extxyz"))
  makers = {
    "learn": lambda: result.potential,
    "uniform": lambda: train_on(uniform, train_minutes, 0, species),
    "ceiling": lambda: train_on(pool, train_minutes, 0, species),
    # learn's labels in one training of the same length: data against training
    "learn_labels_one_run": lambda: train_on(learnt, train_minutes, 0, species),
  }
  rows = {}
  for name in args.models:
    pot = makers[name]()
    rows[name] = {f"{t:g}K": errors(pot, [a for a in test if a.info["temperature_K"] == t])
                  for t in test_temps}  # fmt: skip
  return {
    "system": args.system,
    "reference": spec,
    "temperatures": temps,
    "minutes_asked": args.minutes,
    "learn_minutes": report["minutes"],
    "reference_calls": calls,
    "uniform_frames": len(uniform),
    "ceiling_frames": len(pool),
    "train_minutes_each": train_minutes,
    "stop_reason": report["stop_reason"],
    "rounds": len(report["rounds"]),
    "errors": rows,
    "stability": stability(result.potential, start, max(temps), args.stable_ps),
    "cost": cost(result.potential, start, spec),
    "provenance": provenance(),
  }


def table(paths) -> str:
  """The docs' table: force / energy MAE (meV/Å, meV/atom) per model and test temperature."""
  f = lambda x: f"{x['forces_mae_meV_A']:.1f} / {x['energy_mae_meV_atom']:.2f}" if x else "-"  # noqa: E731
  lines = [
    "| system (reference) | calls | learn min | T test | learn F / E | uniform F / E | "
    "ceiling F / E | learn's labels, one training F / E | learn / uniform | learn / ceiling | "
    "stable ps at top T | model / reference cost |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for path in paths:
    r = json.loads(Path(path).read_text())
    e = r["errors"]
    for t, m in e["learn"].items():
      u, c = e.get("uniform", {}).get(t), e.get("ceiling", {}).get(t)  # a learn-only run: -
      one = e.get("learn_labels_one_run", {}).get(t)
      ratio = lambda b: f"{m['forces_mae_meV_A'] / b['forces_mae_meV_A']:.2f}" if b else "-"  # noqa: E731
      s = r["stability"]
      stop = f" ({s['stopped']})" if s["stopped"] else ""
      cost = r["cost"]
      lines.append(
        f"| {r['system']} ({r['reference']}) | {r['reference_calls']} | "
        f"{r['learn_minutes']:.1f} | {t} | {f(m)} | {f(u)} | {f(c)} | {f(one)} | "
        f"{ratio(u)} | {ratio(c)} | "
        f"{s['ps_stable']:.1f} of {s['ps_requested']:g}{stop} | "
        f"{cost['eqattn_ms']:.1f} / {cost['reference_ms']:.1f} ms |"
      )
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--system", choices=sorted(SYSTEMS), default="ptni")
  ap.add_argument("--minutes", type=float, default=60.0)
  ap.add_argument("--max-labels", type=int, default=600)
  ap.add_argument("--ceiling-frames", type=int, default=2000)
  ap.add_argument("--test-frames", type=int, default=100, help="per test temperature")
  ap.add_argument("--interval", type=int, default=20, help="reference MD steps between frames")
  ap.add_argument("--stable-ps", type=float, default=10.0)
  ap.add_argument("--out", default="out/learn")
  ap.add_argument("--resume", action="store_true")
  ap.add_argument(
    "--models",
    nargs="+",
    default=["learn", "uniform", "ceiling", "learn_labels_one_run"],
    help="which models to train and evaluate (results merged into an existing --json)",
  )
  ap.add_argument("--json")
  ap.add_argument("--report", nargs="+")
  args = ap.parse_args()
  if args.report:
    print(table(sorted(p for pattern in args.report for p in glob.glob(pattern))))
    return
  result = run(args)
  if args.json and Path(args.json).exists():  # models measured before keep their rows
    before = json.loads(Path(args.json).read_text())
    result["errors"] = {**before.get("errors", {}), **result["errors"]}
    result.setdefault("earlier_provenance", before.get("provenance"))
  text = json.dumps(result, indent=1)
  print(text)
  if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(text)
  print(table([args.json]) if args.json else "")


if __name__ == "__main__":
  main()
