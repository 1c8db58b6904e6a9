#!/bin/bash
cd /tmp
for b in md calculator replicas; do
  for tree in old new; do
    root=/tmp/old; [ $tree = new ] && root=/work/main
    case $b in
      md) args="--atoms 256 --chunks 3 --small-atoms 32";;
      calculator) args="--sizes 64 1000";;
      replicas) args="--systems ethanol copper --steps 300";;
    esac
    echo "=== $tree $b $(cd $root && git rev-parse --short HEAD) $(date +%H:%M:%S)"
    ( cd $root && PYTHONPATH=$root XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 0 python3 benchmarks/$b.py $args 2>&1 | grep -v cpu_aot | tail -14 )
  done
done
echo "=== done $(date +%H:%M:%S)"
