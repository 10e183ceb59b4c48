#!/bin/bash
# paired rounds, CACHE=warm|cold: cp -r + sync, then `python -m convert` from each tree given (PYTHONPATH=tree)
I=/tmp/vipllava-bench-7b/input
prep() { rm -rf /tmp/s7-out /tmp/s7-cp; sync; echo 3 > /proc/sys/vm/drop_caches; [ "$CACHE" = cold ] || cat $I/original/* > /dev/null; }
for r in $(seq ${ROUNDS:-2}); do
  prep; t=$(date +%s.%N); cp -r $I/original /tmp/s7-cp; sync; c=$(echo "$(date +%s.%N)-$t" | bc); echo "$CACHE r$r cp+sync $c"
  for tree in "$@"; do
    prep; t=$(date +%s.%N)
    (cd /tmp && PYTHONPATH=$tree python -m convert --original $I/original --text-model $I/text-model --vision-model $I/vision-model --output /tmp/s7-out --quiet >/dev/null 2>&1) || echo FAIL
    o=$(echo "$(date +%s.%N)-$t" | bc); echo "$CACHE r$r $tree $o ratio $(echo "$o/$c" | bc -l | cut -c1-5)"
  done
done
rm -rf /tmp/s7-out /tmp/s7-cp
