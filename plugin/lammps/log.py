"""Thermo tables from LAMMPS screen output or log files, for checks such as NVE drift::

    from plugin.lammps.log import read_thermo
    from plugin.testing import drift_statistics
    run = read_thermo("log.lammps")[-1]           # the last `run` of the input
    slope, error, rms = drift_statistics(run["Time"], run["TotEng"] / num_atoms)  # meV/atom/ps

(``thermo_style custom step time ... etotal`` with ``thermo_modify norm no``; ``Time`` is in
ps in metal units.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Union

import numpy as np

__all__ = ["read_thermo"]


def read_thermo(source: Union[str, os.PathLike]) -> List[Dict[str, np.ndarray]]:
  """One ``{column: values}`` per thermo table (``run`` command) in a log file or its text."""
  is_text = isinstance(source, str) and "\n" in source
  text = str(source) if is_text else Path(source).read_text()
  tables = []
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    words = lines[i].split()
    if words[:1] == ["Step"]:
      rows = []
      for line in lines[i + 1 :]:
        try:
          values = [float(v) for v in line.split()]
        except ValueError:
          break
        if len(values) != len(words):
          break
        rows.append(values)
      data = np.array(rows).reshape(-1, len(words))
      tables.append({name: data[:, k] for k, name in enumerate(words)})
      i += len(rows)
    i += 1
  return tables
