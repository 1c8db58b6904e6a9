#!/bin/bash
# the old tree: git worktree add --detach /tmp/old d0516c2 (before the redesign)
# one round of the redesign's new/old check, replicas only (old then new), nothing else running
R=$1
cd /tmp
for tree in old new; do
  root=/tmp/old; [ $tree = new ] && root=/work/main
  echo "=== round $R $tree replicas $(cd $root && git rev-parse --short HEAD) $(date +%H:%M:%S)"
  ( cd $root && PYTHONPATH=$root XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 0 python3 benchmarks/replicas.py --systems ethanol copper --steps 300 2>&1 | grep -v cpu_aot | tail -14 )
done
echo "=== done $(date +%H:%M:%S)"
