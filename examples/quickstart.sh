#!/usr/bin/env bash
# The whole job on a fresh machine, no data needed:
#   install microct-sr, make a demo scan (procedural bone at 10 um + its simulated 80 um scan),
#   upscale it with the bundled default model, and score the result against the HR volume.
# Usage: bash examples/quickstart.sh [DIR]     (DIR defaults to ./demo)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-demo}

python3 -m pip install -q -e "$root"
bash "$root/examples/make_demo_scan.sh" "$dir"

# The main job: an NRecon-style 80 um folder in, a 10 um ImageJ TIFF out.
microct-sr upscale "$dir/lr_scan" "$dir/sr.tif" --overwrite
microct-sr info "$dir/sr.tif"

# Scoring needs an LR scan aligned with the HR volume: the demo scan above has random motion
# (as a real animal would), so simulate a motionless one for the comparison.
microct-sr simulate "$dir/hr_scan" "$dir/lr_still" --overwrite --quiet
microct-sr upscale "$dir/lr_still" "$dir/sr_still.tif" --overwrite --quiet
microct-sr evaluate --hr "$dir/hr_scan" --sr "default=$dir/sr_still.tif" --lr "$dir/lr_still" \
    --bicubic --metrics psnr,ssim,morph --table "$dir/table.md" --overwrite
echo "result: $dir/sr.tif (open it in Fiji: 10 um in-plane, 80 um between slices); scores: $dir/table.md" >&2
