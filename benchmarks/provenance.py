"""Where and when a benchmark ran, recorded by the script beside its figures."""

from __future__ import annotations

import os
import pathlib
import subprocess


def provenance() -> dict:
  """Machine, date and commit of a measurement (recorded by the script, not typed)."""
  import datetime
  import platform

  try:
    commit = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"],
      capture_output=True,
      text=True,
      cwd=pathlib.Path(__file__).parent,
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=no"],
      capture_output=True,
      text=True,
      cwd=pathlib.Path(__file__).parent,
    ).stdout.strip()
  except OSError:
    commit, dirty = "unknown", ""
  return {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": commit + ("+changes" if dirty else ""),
    "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
    "python": platform.python_version(),
  }
