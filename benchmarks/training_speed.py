"""Training throughput on this machine: epochs per minute by cores and batch size, and what
validation costs.

Each case runs in its own process pinned to the cores it is given (``taskset``), trains the
default model (``ModelConfig()``, ``TrainConfig()`` but ``batch_size`` and ``epochs``) on the
default split of a dataset, and reports the steady time of an epoch (the first epoch, which
compiles, left out) and of one pass over the selection frames training validates on::

    python benchmarks/training_speed.py                      # ethanol, 1 and 2 cores, batch 4/8/16
    python benchmarks/training_speed.py --data out/recipes/cuau.extxyz.gz --batch 8

Run it with both cores otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from provenance import provenance

ROOT = Path(__file__).resolve().parents[1]


def one(data: str, batch: int, epochs: int) -> dict:

  import potentials
  from potentials import training
  from plugin.data import read_frames, read_images

  images = read_images(data)
  species = sorted({s for a in images for s in a.get_chemical_symbols()})
  pot = potentials.Potential.create(0, species=species)
  frames = read_frames(images, pot.cutoff)
  cfg = training.TrainConfig(batch_size=batch, epochs=epochs)
  res = training.train(pot, frames, cfg, progress=False)
  seconds = [h["seconds"] for h in res.history]
  epoch_s = (seconds[-1] - seconds[0]) / (len(seconds) - 1)
  parts = training.split_parts(frames, cfg)
  valid = [frames[i] for i in parts["valid"]][: training.MAX_SELECTION_FRAMES]
  training.error_metrics(res.potential, valid, batch)  # compiles
  t0 = time.perf_counter()
  training.error_metrics(res.potential, valid, batch)
  valid_s = time.perf_counter() - t0
  return {
    "batch": batch,
    "train_frames": len(parts["train"]),
    "epoch_s": epoch_s,
    "epochs_per_min": 60 / epoch_s,
    "frames_per_s": len(parts["train"]) / epoch_s,
    "validation_s": valid_s,
    "validation_frames": len(valid),
    "validation_share": valid_s / (valid_s + epoch_s),
    "first_epoch_s": seconds[0],
    "finish_s": res.potential.metadata["training"]["finish_seconds"],
  }


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", default=str(ROOT / "data" / "ethanol.extxyz.gz"))
  ap.add_argument("--batch", type=int, nargs="+", default=[4, 8, 16])
  ap.add_argument("--cores", nargs="+", default=["0", "0,1"], help="taskset core lists")
  ap.add_argument("--epochs", type=int, default=4)
  ap.add_argument("--json", help="write the rows here")
  ap.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.one:
    print(json.dumps(one(args.data, *args.one)))
    return 0
  rows = []
  print("| cores | batch | epochs/min | frames/s | validation pass (s) | validation share |")
  print("|---|---:|---:|---:|---:|---:|")
  for cores in args.cores:
    for batch in args.batch:
      cmd = ["taskset", "-c", cores, sys.executable, __file__, "--data", args.data]
      cmd += ["--one", str(batch), str(args.epochs)]
      out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ)
      if out.returncode:
        raise SystemExit(out.stderr[-2000:])
      row = {"cores": cores, **json.loads(out.stdout.strip().splitlines()[-1])}
      rows.append(row)
      print(
        f"| {len(cores.split(','))} | {batch} | {row['epochs_per_min']:.1f} | "
        f"{row['frames_per_s']:.0f} | {row['validation_s']:.2f} | "
        f"{100 * row['validation_share']:.1f} % |",
        flush=True,
      )
  if args.json:
    Path(args.json).write_text(json.dumps({"rows": rows, "provenance": provenance()}, indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
