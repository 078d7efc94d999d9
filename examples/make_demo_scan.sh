#!/usr/bin/env bash
# Make a demo pair of scans with no data at all:
#   DIR/hr_scan  procedural trabecular bone, 128 x 256 x 256 voxels at 10 um (NRecon-style folder)
#   DIR/lr_scan  its simulated 8x LR scan: 16 x 32 x 32 at 80 um, 225 views, Poisson noise,
#                Hamming FBP, random rigid motion (NRecon-style folder + simulation.json truth)
# Then e.g.:  microct-sr upscale DIR/lr_scan DIR/sr.tif
# Usage: examples/make_demo_scan.sh DIR [SEED]      (about half a minute on 2 cores)
#        DEMO_SHAPE="Z Y X" overrides the HR size (Y and X multiples of 8), e.g. for tests.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 DIR [SEED]" >&2
    exit 2
fi
dir=$1
seed=${2:-0}
shape=${DEMO_SHAPE:-128 256 256}
mkdir -p "$dir"
echo "1/2 phantom: procedural trabecular bone ($shape voxels at 10 um) -> $dir/hr_scan" >&2
# shellcheck disable=SC2086  # $shape is three numbers
microct-sr phantom "$dir/hr_scan" --shape $shape --spacing-um 10 --bvtv 0.25 \
    --thickness-um 80 --seed "$seed" --overwrite
echo "2/2 simulate: 8x LR scan with random motion -> $dir/lr_scan" >&2
microct-sr simulate "$dir/hr_scan" "$dir/lr_scan" --factor 8 --views 225 --random-motion \
    --seed "$seed" --overwrite
echo "HR scan (10 um):      $dir/hr_scan" >&2
echo "LR scan (80 um):      $dir/lr_scan   (motion and noise truth: $dir/lr_scan/simulation.json)" >&2
echo "next: microct-sr upscale $dir/lr_scan $dir/sr.tif" >&2
