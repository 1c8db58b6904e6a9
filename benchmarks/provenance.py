"""Where and when a benchmark ran, recorded by the script beside its figures."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import subprocess


def _git(*args: str) -> str:
  here = pathlib.Path(__file__).parent
  return subprocess.run(["git", *args], capture_output=True, text=True, cwd=here).stdout.strip()


def provenance() -> dict:
  """Machine, date and commit of a measurement (recorded by the script, not typed); the
  commit is marked ``+changes`` when tracked files differ from it."""
  try:
    commit, dirty = _git("rev-parse", "--short", "HEAD"), _git("status", "--porcelain", "-uno")
  except OSError:
    commit, dirty = "unknown", ""
  return {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": commit + ("+changes" if dirty else ""),
    "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
    "python": platform.python_version(),
  }
