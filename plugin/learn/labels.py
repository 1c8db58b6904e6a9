"""Labels from the reference, computed safely and never lost.

* :func:`label_one` - energy, forces and stress of one frame; :class:`LabelError` if not finite.
* :class:`LabelPool` - labels in worker processes with a timeout per call; a crash, an exception
  (SCF not converged, ...), a timeout or a non-finite result fails that frame only.
* :class:`LabelFile` - an append-only extxyz store, fsynced per frame, with failures kept in a
  sibling ``failures.jsonl``; a frame cut by a kill mid-write is dropped on read and repair.
* :func:`isolated_atom_energies` - each element's lone-atom energy from the reference.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from multiprocessing.connection import wait
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from ase import Atoms

from .reference import check_spec, reference_from_spec

_STARTUP_TIMEOUT = 300.0  # building a reference (importing a DFT code) may be slow; not a label
_REASON_CHARS = 500


class LabelError(RuntimeError):
  """A reference call that gave no usable label (non-finite energy, forces or stress)."""


def label_one(calc, atoms: Atoms, *, stress: bool) -> dict:
  """Energy (eV), forces (eV/Å, (n, 3)) and, if ``stress`` and the cell is periodic in all three
  directions, stress (eV/Å^3, 3x3) of one frame; LabelError if any value is not finite.

  Labels a copy, so the caller's atoms keep their own calculator."""
  a = atoms.copy()
  a.calc = calc
  result = {
    "energy": float(a.get_potential_energy()),
    "forces": np.array(a.get_forces(), np.float64).reshape(len(a), 3),
  }
  if stress and np.all(a.pbc):
    result["stress"] = np.array(a.get_stress(voigt=False), np.float64).reshape(3, 3)
  return checked(result)


def checked(result: dict) -> dict:
  """``result`` (energy, forces[, stress]) if every value is finite, else LabelError."""
  bad = [k for k, v in result.items() if not np.all(np.isfinite(v))]
  if bad:
    raise LabelError(f"non-finite {', '.join(bad)} from the reference")
  return result


def failure_reason(e: BaseException) -> str:
  """One line for failures.jsonl: the exception type and the start of its message."""
  text = " ".join(str(e).split()) or repr(e)
  return f"{type(e).__name__}: {text}"[:_REASON_CHARS]


def _payload(atoms: Atoms) -> dict:
  """A frame as plain arrays (what crosses the pipe to a worker)."""
  p = {
    "numbers": np.asarray(atoms.numbers),
    "positions": np.asarray(atoms.positions, np.float64),
    "cell": np.asarray(atoms.cell[:], np.float64),
    "pbc": np.asarray(atoms.pbc, bool),
    "info": dict(atoms.info),
  }
  for name in ("initial_magmoms", "initial_charges"):  # spin and charge for tblite's uhf/charge
    if atoms.has(name):
      p[name] = np.asarray(atoms.arrays[name])
  return p


def _atoms(p: dict) -> Atoms:
  a = Atoms(numbers=p["numbers"], positions=p["positions"], cell=p["cell"], pbc=p["pbc"])
  a.info.update(p["info"])
  if "initial_magmoms" in p:
    a.set_initial_magnetic_moments(p["initial_magmoms"])
  if "initial_charges" in p:
    a.set_initial_charges(p["initial_charges"])
  return a


def _worker(conn, spec: str, path: list, threads: int) -> None:
  """A worker's life: build the reference once, then label one frame per message until None.

  Messages in: (task id, payload, stress) or None. Out: ("ready",), ("fatal", reason) or
  (task id, result, reason)."""
  sys.path[:] = path + [p for p in sys.path if p not in path]  # `tests.refs:...`, cwd modules
  os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # before the reference loads OpenMP
  try:
    calc = reference_from_spec(spec)
  except BaseException as e:  # reported to the parent, which raises it
    conn.send(("fatal", failure_reason(e)))
    return
  conn.send(("ready",))
  while True:
    try:
      msg = conn.recv()
    except EOFError:  # the parent is gone
      return
    if msg is None:
      return
    task, payload, stress = msg
    try:
      conn.send((task, label_one(calc, _atoms(payload), stress=stress), None))
    except Exception as e:  # any reference failure fails this frame only
      conn.send((task, None, failure_reason(e)))


@contextlib.contextmanager
def _main_hidden():
  """Hide the parent's ``__main__`` while a worker spawns: "spawn" would import it in the
  child and run a user's script's top level again (``learn(...)`` without an ``if __name__ ==
  "__main__"`` guard starts workers in every worker). The worker needs nothing from it."""
  main = sys.modules.get("__main__")
  saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if main and k in main.__dict__}
  try:
    if main is not None:
      main.__spec__ = None
      main.__dict__.pop("__file__", None)
    yield
  finally:
    if main is not None:
      main.__dict__.update(saved)


class _Slot:
  """One worker process, its pipe, and the call it is running (if any)."""

  def __init__(self, ctx, spec: str, threads: int):
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(
      target=_worker, args=(child, spec, list(sys.path), threads), daemon=True
    )
    with _main_hidden():
      self.proc.start()
    child.close()  # so the parent sees EOF when the worker dies
    self.ready = False
    self.started = time.monotonic()
    self.task: Optional[tuple] = None  # (task id, frame index, deadline)

  def stop(self, grace: float = 1.0) -> None:
    """Terminate, then kill, and reap the process."""
    if self.proc.is_alive():
      self.proc.terminate()
      self.proc.join(grace)
    if self.proc.is_alive():
      self.proc.kill()
    self.proc.join()
    self.conn.close()

  def exit_reason(self) -> str:
    self.proc.join(2.0)
    code = self.proc.exitcode
    return f"worker process died (exit code {code})"


class LabelPool:
  """Labels frames with a reference, in worker processes or in-process.

  ``reference`` is a spec string (see :mod:`plugin.learn.reference`) or, with ``workers=0``,
  a calculator object. ``workers > 0`` starts that many processes with the "spawn" context
  (the parent runs JAX's thread pools, which fork would copy in a broken state); each builds
  the reference once. A call that runs past ``timeout`` seconds has its worker killed and
  replaced. ``workers=0`` labels in the calling process: no timeout is possible there (a hung
  reference hangs the caller) and a reference that kills its process kills the caller.

  Use as a context manager (or call :meth:`close`) so the workers are stopped."""

  def __init__(self, reference, workers: int = 0, timeout: float = 600.0):
    if workers < 0:
      raise ValueError(f"workers must be >= 0, got {workers}")
    if isinstance(reference, str):
      self.spec: Optional[str] = check_spec(reference)
      self._calc = None
    elif workers:
      raise ValueError(
        "a calculator object cannot be sent to worker processes: pass a spec string "
        "('gfn2', 'emt', 'module:callable') or use workers=0"
      )
    else:
      self.spec, self._calc = None, reference
    self.workers, self.timeout = workers, float(timeout)
    self._ctx = multiprocessing.get_context("spawn")
    self._threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    self._slots: list[_Slot] = []
    self._task = 0

  def __enter__(self) -> "LabelPool":
    self._start()
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  @property
  def calc(self):
    """The in-process calculator (workers=0), built from the spec on first use."""
    if self._calc is None:
      self._calc = reference_from_spec(self.spec)
    return self._calc

  def _start(self) -> None:
    while len(self._slots) < self.workers:
      self._slots.append(_Slot(self._ctx, self.spec, self._threads))

  def close(self) -> None:
    """Ask idle workers to exit, stop the rest; the pool can be started again after."""
    for s in self._slots:
      if s.task is None and s.proc.is_alive():
        try:
          s.conn.send(None)
        except OSError:
          pass
    deadline = time.monotonic() + 2.0
    for s in self._slots:
      s.proc.join(max(0.0, deadline - time.monotonic()))
      s.stop()
    self._slots = []

  def label(self, frames: Sequence[Atoms], *, stress: bool) -> Iterator[tuple]:
    """Yield ``(index, result, None)`` or ``(index, None, reason)`` per frame, in completion
    order (in frame order for workers=0). ``result`` is :func:`label_one`'s dict."""
    if not self.workers:
      yield from self._label_here(frames, stress)
    else:
      yield from self._label_workers(frames, stress)

  def _label_here(self, frames, stress):
    for i, atoms in enumerate(frames):
      try:
        yield i, label_one(self.calc, atoms, stress=stress), None
      except Exception as e:  # one frame's failure is recorded, not fatal
        yield i, None, failure_reason(e)

  def _replace(self, k: int) -> None:
    self._slots[k].stop()
    self._slots[k] = _Slot(self._ctx, self.spec, self._threads)

  def _label_workers(self, frames, stress):
    self._start()
    pending = deque(range(len(frames)))
    busy = 0
    try:
      while pending or busy:
        for k, s in enumerate(self._slots):  # one frame per ready, idle worker
          if pending and s.ready and s.task is None:
            self._task += 1
            try:
              s.conn.send((self._task, _payload(frames[pending[0]]), stress))
            except OSError:  # died while idle: the frame waits for its replacement
              self._replace(k)
              continue
            s.task = (self._task, pending.popleft(), time.monotonic() + self.timeout)
            busy += 1
        now = time.monotonic()
        deadlines = [s.task[2] for s in self._slots if s.task]
        deadlines += [s.started + _STARTUP_TIMEOUT for s in self._slots if not s.ready]
        handles = [h for s in self._slots for h in (s.conn, s.proc.sentinel)]
        ready = wait(handles, max(0.0, min(deadlines, default=now + 60.0) - now))
        done = []  # (slot index, frame index, result, reason, replace the worker)
        for k, s in enumerate(self._slots):
          if s.conn in ready or s.proc.sentinel in ready:
            done.append(self._receive(k, s))
          elif s.task and time.monotonic() >= s.task[2]:
            done.append((k, s.task[1], None, f"timeout after {self.timeout:g} s", True))
          elif not s.ready and time.monotonic() >= s.started + _STARTUP_TIMEOUT:
            self.close()
            raise RuntimeError(
              f"reference {self.spec!r}: a worker was not ready after {_STARTUP_TIMEOUT:g} s"
            )
        for k, i, result, reason, replace in done:
          if i is not None:
            self._slots[k].task = None
            busy -= 1
          if replace:
            self._replace(k)
          if i is not None:
            yield i, result, reason
    finally:  # abandoned mid-iteration (break, error): stop workers busy with stale calls
      for s in self._slots:
        if s.task is not None:
          s.stop()
      self._slots = [s for s in self._slots if s.task is None]  # refilled by the next call

  def _receive(self, k: int, s: _Slot):
    """Read what a worker said (or find it dead): (slot, frame index or None, result, reason,
    replace)."""
    index = s.task[1] if s.task else None
    try:
      msg = s.conn.recv() if s.conn.poll() else None
    except (EOFError, OSError):
      msg = None
    if msg is None:  # died: a crash in the reference (segfault, os._exit, out of memory)
      if not s.ready:
        reason = s.exit_reason()
        self.close()
        raise RuntimeError(f"reference {self.spec!r}: worker failed to start ({reason})")
      return k, index, None, s.exit_reason(), True
    if msg[0] == "ready":
      s.ready = True
      return k, None, None, None, False
    if msg[0] == "fatal":
      self.close()
      raise RuntimeError(f"reference {self.spec!r} could not be built in a worker: {msg[1]}")
    task, result, reason = msg
    if s.task is None or task != s.task[0]:  # a stale reply; cannot happen with one call each
      return k, None, None, None, False
    return k, index, result, reason, False


_RESERVED = ("energy", "free_energy", "forces", "stress")


class LabelFile:
  """An append-only extxyz file of labelled frames and a sibling ``failures.jsonl``.

  Every :meth:`append` and :meth:`fail` is flushed and fsynced before it returns, so a kill
  loses at most the call in progress. A frame cut mid-write is dropped by :meth:`read` and cut
  off by :meth:`repair`, which the first append of each LabelFile runs."""

  def __init__(self, path):
    self.path = Path(path)
    self.failures_path = self.path.with_name("failures.jsonl")
    self._repaired = False

  def _complete_bytes(self) -> int:
    """Length of the file's prefix made of complete frames (count line, comment line, that
    many atom lines, each ending in a newline)."""
    if not self.path.exists():
      return 0
    data = self.path.read_bytes()
    lines = data.splitlines(keepends=True)
    pos = end = 0
    i = 0
    while i < len(lines):
      head = lines[i]
      try:
        n = int(head.strip())
      except ValueError:
        break
      block = lines[i : i + n + 2]
      if n < 0 or len(block) < n + 2 or not all(b.endswith(b"\n") for b in block):
        break
      pos += sum(len(b) for b in block)
      end = pos
      i += n + 2
    return end

  def read(self) -> list[Atoms]:
    """All complete frames (each with a SinglePointCalculator holding its labels)."""
    import ase.io

    end = self._complete_bytes()
    if not end:
      return []
    with open(self.path, "rb") as fh:
      text = fh.read(end).decode()
    return ase.io.read(io.StringIO(text), ":", format="extxyz")

  def repair(self) -> int:
    """Truncate a frame cut mid-write (and a cut failures line); returns the bytes dropped."""
    dropped = 0
    if self.path.exists():
      end = self._complete_bytes()
      dropped = self.path.stat().st_size - end
      if dropped:
        os.truncate(self.path, end)
    if self.failures_path.exists():
      data = self.failures_path.read_bytes()
      end = data.rfind(b"\n") + 1
      if end < len(data):
        os.truncate(self.failures_path, end)
        dropped += len(data) - end
    self._repaired = True
    return dropped

  def append(self, atoms: Atoms, result: dict, *, reference: str, round: int, source: str):
    """Write one labelled frame (info: reference, round, source) and fsync it."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    if not self._repaired:
      self.repair()
    a = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    a.info.update(reference=reference, round=int(round), source=source)
    a.calc = SinglePointCalculator(a, **{k: result[k] for k in _RESERVED if k in result})
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open(self.path, "a") as fh:
      ase.io.write(fh, a, format="extxyz")
      fh.flush()
      os.fsync(fh.fileno())

  def fail(self, atoms: Atoms, reason: str, *, reference: str, round: int, source: str):
    """Record one failed call (with the frame, to inspect it) in failures.jsonl and fsync."""
    if not self._repaired:
      self.repair()
    record = {
      "round": int(round),
      "source": source,
      "reference": reference,
      "reason": reason,
      "numbers": np.asarray(atoms.numbers).tolist(),
      "positions": np.asarray(atoms.positions, float).tolist(),
      "cell": np.asarray(atoms.cell[:], float).tolist(),
      "pbc": np.asarray(atoms.pbc, bool).tolist(),
    }
    self.failures_path.parent.mkdir(parents=True, exist_ok=True)
    with open(self.failures_path, "a") as fh:
      fh.write(json.dumps(record) + "\n")
      fh.flush()
      os.fsync(fh.fileno())

  def failures(self) -> list[dict]:
    """The recorded failures (a line cut mid-write is skipped)."""
    if not self.failures_path.exists():
      return []
    out = []
    for line in self.failures_path.read_text().splitlines():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
    return out


def _lone_atom(z: int, box: float, magmom: Optional[float] = None) -> Atoms:
  a = Atoms(numbers=[z], positions=[[box / 2] * 3], cell=[box] * 3, pbc=False)
  if magmom is not None:
    a.set_initial_magnetic_moments([magmom])
  return a


def isolated_atom_energies(pool_or_calc, numbers, *, box: float = 20.0) -> dict[int, float]:
  """Each element's energy as one atom in a ``box`` Å non-periodic cell, from the reference.

  ``pool_or_calc``: a :class:`LabelPool`, a calculator object or a spec string. An element
  whose closed-shell call fails is retried with one unpaired electron (an initial magnetic
  moment of 1, which tblite reads as uhf=1); LabelError if both fail. tblite 0.8 needs no
  retry: GFN1/GFN2 are spin-restricted unless spin polarisation is asked for, and a lone H,
  N or Cu gives the same energy with uhf=0 or 1 (uhf=1 on an even-electron atom, O or C, is
  refused: "number unpaired electrons (1) is not compatible")."""
  elements = sorted({int(z) for z in np.asarray(numbers).ravel()})
  pool = pool_or_calc if isinstance(pool_or_calc, LabelPool) else LabelPool(pool_or_calc, 0)

  def run(atoms: list[Atoms]) -> list[tuple]:
    out = [None] * len(atoms)
    for i, result, reason in pool.label(atoms, stress=False):
      out[i] = (result, reason)
    return out

  first = run([_lone_atom(z, box) for z in elements])
  retry = [z for z, (result, _) in zip(elements, first) if result is None]
  second = dict(zip(retry, run([_lone_atom(z, box, 1.0) for z in retry]))) if retry else {}
  energies = {}
  for z, (result, reason) in zip(elements, first):
    if result is None:
      result, reason2 = second[z]
      if result is None:
        raise LabelError(
          f"isolated atom Z={z}: the reference failed ({reason}) and failed again with one "
          f"unpaired electron ({reason2})"
        )
    energies[z] = result["energy"]
  return energies
