#!/bin/bash
# A/B of verify's data checks (files + mapping) at 7B: this branch (one pass) vs main before it (4e9dd1f), alternating
cd /work/bench-stream
for round in 1 2; do
  for side in new old; do
    dir=/work/bench-stream/code; [ $side = old ] && dir=/work/bench-stream/code-old
    (cd $dir && PYTHONPATH=$dir HF_HUB_OFFLINE=1 python -m bench.run --size 7b --workdir /work/bench-stream/7b --keep --steps verify \
       --verify-args '--only files --only mapping' --verify-timeout 1800 --section 7b-datapass-$side-$round \
       --json /work/bench-stream/results/7b-datapass-$side-$round.json \
       --note "verify --only files --only mapping, $side code (new: $(git -C $dir rev-parse --short HEAD)), A/B round $round")
  done
done
