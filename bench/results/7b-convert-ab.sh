#!/bin/bash
# A/B of the converter, warm page cache then cold: main before this branch (4e9dd1f) vs this branch, alternating
cd /work/bench-stream
I=/work/bench-stream/7b/input
for round in 1 2; do
  for side in old new; do
    dir=/work/bench-stream/code; [ $side = old ] && dir=/work/bench-stream/code-old
    rm -rf /work/bench-stream/7b/out-ab
    sync; echo 3 > /proc/sys/vm/drop_caches
    cat $I/original/*.bin > /dev/null
    echo "== $side warm round $round"
    (cd $dir && PYTHONPATH=$dir HF_HUB_OFFLINE=1 python /work/bench-stream/threadcpu.py python -m convert --original $I/original --text-model $I/text-model --vision-model $I/vision-model --output /work/bench-stream/7b/out-ab --quiet | grep -E "wall|total|time ")
  done
done
rm -rf /work/bench-stream/7b/out-ab
