"""``eqattn learn``: its arguments, the checks made before any work, and the run.

::

    eqattn learn START.xyz [MORE.xyz ...] --reference gfn2 --temperatures 300,600 \\
        --time-limit 60 --out learn/

Cheap to import (no JAX): the ``eqattn`` parser adds these arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import LearnOptions, default_workers
from .reference import check_spec

DEFAULTS = LearnOptions()  # the parser's defaults


def add_arguments(p: argparse.ArgumentParser, *, temperatures, positive) -> None:
  """``temperatures``/``positive``: the command line's shared value parsers."""
  p.add_argument("starts", nargs="+", metavar="START", help="start structure file(s) (any format)")
  p.add_argument(
    "--reference",
    default=DEFAULTS.reference,
    help="teacher: gfn2, gfn1 (tblite), emt (ASE), or module:callable returning an ASE calculator",
  )
  p.add_argument(
    "--temperatures",
    type=temperatures,
    default=",".join(f"{t:g}" for t in DEFAULTS.temperatures),
    help="K, comma list: the exploration ladder (the highest decides when to stop)",
  )
  p.add_argument("--time-limit", type=positive(float), default=DEFAULTS.time_limit,
                 help="minutes for the whole command")  # fmt: skip
  p.add_argument("--max-labels", type=positive(int), default=DEFAULTS.max_labels,
                 help="reference calls at most")  # fmt: skip
  p.add_argument(
    "--uncertainty-target",
    type=positive(float),
    default=DEFAULTS.uncertainty_target,
    help="eV/Å: stop when a whole round at the top temperature stays under it",
  )
  p.add_argument(
    "--workers",
    type=int,
    default=None,
    help=f"label worker processes (default: cores - 1, here {default_workers()}; 0: in-process)",
  )
  p.add_argument("--label-timeout", type=positive(float), default=DEFAULTS.label_timeout,
                 help="seconds per reference call")  # fmt: skip
  p.add_argument("--test", help="labelled structures (energies, forces) to report errors on")
  p.add_argument("--out", default="learn", help="the run's folder")
  p.add_argument("--resume", action="store_true", help="continue the run in --out")
  p.add_argument("--seed", type=int, default=DEFAULTS.seed)


def prepare(args) -> tuple:
  """``(starts, options, test)`` from the arguments, every check made before any work
  (ValueError naming the fix)."""
  from plugin.data import read_images

  from .run import check_run, read_test

  starts = []
  for path in args.starts:
    if not Path(path).exists():
      raise ValueError(f"start structure {path!r} does not exist")
    try:
      starts.append(read_images(path, index=-1)[0])
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
      raise ValueError(f"cannot read {path}: {e}") from None
  check_spec(args.reference)
  options = LearnOptions(
    reference=args.reference,
    temperatures=tuple(args.temperatures),
    time_limit=args.time_limit,
    max_labels=args.max_labels,
    uncertainty_target=args.uncertainty_target,
    workers=default_workers() if args.workers is None else args.workers,
    label_timeout=args.label_timeout,
    seed=args.seed,
  )
  test = read_test(args.test) if args.test else None
  check_run(Path(args.out), options, starts, args.resume)
  return starts, options, test


def run(prepared: tuple, args) -> int:
  """The run, then a summary line and where the files are."""
  from .run import learn

  starts, options, test = prepared
  result = learn(starts, out=args.out, options=options, resume=args.resume, test=test)
  r = result.report
  print(
    f"learnt in {r['minutes']:.1f} min from {r['reference_calls']} reference calls "
    f"({r['failed_calls']} failed), {len(r['rounds'])} rounds, stopped: {r['stop_reason']}"
  )
  final = r.get("final") or {}
  if final.get("test"):
    print(f"test file: forces MAE {final['test']['forces_mae_meV_A']:.1f} meV/Å")
  print(f"model: {Path(args.out) / 'model.eqm'}; report: {Path(args.out) / 'report.json'}")
  return 0
