#!/bin/bash
# alternated runs: f78d837 (HEAD) vs db3fd26, scripts from the HEAD worktree for both
. /tmp/venv/bin/activate
S=/tmp/bench-head/benchmarks
O=/tmp/bench-out3
declare -A TREE=([49715a1]=/tmp/bench-49715a1 [db3fd26]=/tmp/bench-db3fd26)
run() { # side scenario pass
  local side=$1 sc=$2 p=$3 t=${TREE[$1]} out=$O/$1-$2-$3
  echo "$(date -u +%H:%M:%S) start $side $sc $p load $(cut -d' ' -f1-3 /proc/loadavg)" >> $O/log.txt
  cd $t
  case $sc in
    hit-path) PYTHONPATH=$t python $S/hit_path.py --json $out.json > $out.txt 2>&1 ;;
    bench-1x5k) PYTHONPATH=$t python -m aiocacheguard bench -n 5000 -p 1 --rounds 7 --plain --strategy guard --strategy ideal --strategy singleflight --json $out.json > $out.txt 2>&1 ;;
    bench-4x10k) PYTHONPATH=$t python -m aiocacheguard bench -n 10000 -p 4 --rounds 3 --plain --json $out.json > $out.txt 2>&1 ;;
    peers-4x10k) PYTHONPATH=$t python $S/peers.py -n 10000 -p 4 --rounds 3 --json $out.json > $out.txt 2>&1 ;;
  esac
  echo "$(date -u +%H:%M:%S) end   $side $sc $p rc $? load $(cut -d' ' -f1-3 /proc/loadavg)" >> $O/log.txt
}
for p in 1 2; do
  if (( p % 2 )); then order="49715a1 db3fd26"; else order="db3fd26 49715a1"; fi
  for sc in bench-1x5k hit-path; do
    for side in $order; do run $side $sc $p; done
  done
done
echo "$(date -u +%H:%M:%S) done" >> $O/log.txt
