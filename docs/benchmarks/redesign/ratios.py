"""The new/old table of the plugin/ redesign from run.sh's logs (one per round):

python docs/benchmarks/redesign/ratios.py docs/benchmarks/redesign/round*.log
"""

import re
import sys


def _row(bench: str, cells: list):
  """``(measure, value)`` of one table row of a benchmark's output, or None."""
  if bench == "md" and len(cells) == 8 and "List" in cells[2]:
    return f"JAX-MD per step, {cells[0]}-atom small cell (ms)", float(cells[5])
  if bench == "md" and len(cells) == 8 and cells[0].isdigit():
    return f"MD per step, {cells[0]} atoms (ms)", float(cells[4])
  if bench == "calculator" and len(cells) == 5 and cells[0].isdigit():
    return f"calculator get_forces, {cells[0]} atoms (ms)", float(cells[3])
  if bench == "replicas" and len(cells) == 7 and cells[1].isdigit():
    return f"replicas {cells[0]} B={cells[2]} (µs/replica-step)", float(cells[4])
  return None


def parse(path: str) -> dict:
  """``{(round, tree, bench): {measure: value}}`` of one log; a section headed with another
  round's number (a run cut short) is skipped."""
  out, cur = {}, None
  rnd = int(re.search(r"round(\d)", path).group(1))
  for line in open(path):
    m = re.match(r"=== (?:round (\d) )?(old|new) (md|calculator|replicas)", line)
    if m:
      cur = (rnd, m.group(2), m.group(3)) if int(m.group(1) or rnd) == rnd else None
      if cur:
        out[cur] = {}
      continue
    if cur and line.startswith("|") and "---" not in line:
      row = _row(cur[2], [c.strip() for c in line.strip().strip("|").split("|")])
      if row:
        out[cur][row[0]] = row[1]
  return out


def main(paths) -> None:
  data = {}
  for p in paths:
    data.update(parse(p))
  measures = list(dict.fromkeys(m for v in data.values() for m in v))
  print("| measure | round | old | new | new/old |")
  print("|---|---:|---:|---:|---:|")
  for m in measures:
    for rnd in sorted({k[0] for k in data}):
      old = next((v[m] for k, v in data.items() if k[:2] == (rnd, "old") and m in v), None)
      new = next((v[m] for k, v in data.items() if k[:2] == (rnd, "new") and m in v), None)
      if old and new:
        print(f"| {m} | {rnd} | {old:g} | {new:g} | {new / old:.3f} |")


if __name__ == "__main__":
  main(sys.argv[1:])
