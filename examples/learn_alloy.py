"""Learn a potential for a system eqattn has never seen, from a reference, then simulate it.

A Pt3Ni alloy (32 atoms) with ASE's EMT as the reference (it stands in for your DFT code or
universal model: ``--reference mymodule:make_calculator``). ``plugin.learn.learn`` labels
rattled copies, trains, explores with MD replicas at 300 and 900 K on the model, labels what
the model is unsure of, fine-tunes, and stops when a round at 900 K stays certain or the
budget is spent; then 2 ps of NVT run on the learnt model::

    python examples/learn_alloy.py                       # 10 minutes, folder learn-ptni/
    python examples/learn_alloy.py --minutes 60 --out my-run
    python examples/learn_alloy.py --resume              # continue a run that was cut short

The same from the shell: ``eqattn learn ptni.xyz --reference emt --temperatures 300,900
--time-limit 10 --out learn-ptni``.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

import json

import numpy as np
from ase import Atoms
from ase.build import bulk

from plugin import md
from plugin.learn import LearnOptions, learn


def alloy() -> Atoms:
  a = bulk("Pt", "fcc", a=3.87, cubic=True).repeat((2, 2, 2))
  numbers = a.numbers.copy()
  numbers[np.random.default_rng(0).permutation(len(a))[: len(a) // 4]] = 28  # a quarter Ni
  a.numbers = numbers
  return a


def main(argv: Optional[List[str]] = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--minutes", type=float, default=10.0, help="time limit of the learning")
  ap.add_argument("--reference", default="emt")
  ap.add_argument("--out", default="learn-ptni")
  ap.add_argument("--resume", action="store_true")
  ap.add_argument("--md-ps", type=float, default=2.0, help="NVT on the learnt model")
  ap.add_argument("--options", default="{}", help="JSON of other LearnOptions fields")
  args = ap.parse_args(argv)
  options = LearnOptions(
    reference=args.reference,
    temperatures=(300.0, 900.0),
    time_limit=args.minutes,
    **json.loads(args.options),
  )
  result = learn([alloy()], out=args.out, options=options, resume=args.resume)
  report = result.report
  print(f"{report['reference_calls']} reference calls, stopped: {report['stop_reason']}")
  dt = options.timestep_for(alloy().numbers)
  run = md.run(alloy(), result.potential, ensemble="nvt_langevin", temperature=900.0,
               timestep=dt, total_steps=int(args.md_ps * 1000 / dt))  # fmt: skip
  print(f"NVT 900 K on the learnt model: {run.steps * dt / 1000:.2f} ps, stopped: {run.stopped}")
  return {"report": report, "md": run}


if __name__ == "__main__":
  main()
