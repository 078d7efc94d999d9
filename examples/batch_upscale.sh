#!/usr/bin/env bash
# Upscale every scan under IN_DIR into OUT_DIR/<scan>_sr.tif, skipping scans already done.
#
#   examples/batch_upscale.sh IN_DIR OUT_DIR [extra microct-sr upscale options...]
#   MODEL=runs/r1/model.pt examples/batch_upscale.sh scans/ sr/ --device cuda --batch-size 8
#
# A scan is a sub-folder (NRecon reconstruction or numbered slices) or a volume file (.tif,
# .nii.gz, .mha, .nrrd); other files are ignored. Outputs are written atomically (temporary
# name, then rename), so an existing OUT_DIR/<scan>_sr.tif is always complete: re-running the
# script after a crash, a Ctrl-C or a kill resumes with the scans not yet done. Exit status of
# `upscale`:
# 0 done, 2 bad input (logged with its error message, skipped), 130 interrupted (the loop
# stops), other: logged. The log is OUT_DIR/batch_upscale.log.
set -u

if [ $# -lt 2 ]; then
    echo "usage: $0 IN_DIR OUT_DIR [upscale options...]" >&2
    exit 2
fi
in_dir=$1
out_dir=$2
shift 2
mkdir -p "$out_dir"
model_opt=()
if [ -n "${MODEL:-}" ]; then
    model_opt=(--model "$MODEL")
fi

# The scan's name without its volume suffix (only these: a dot inside a name such as
# rat.01 or tibia_L.2024-01-05 is part of the name); empty for files that are not volumes.
scan_stem() {
    local name=$1 lower
    lower=$(printf '%s' "$name" | tr '[:upper:]' '[:lower:]')
    if [ -d "$2" ]; then printf '%s' "$name"; return; fi
    for suffix in .ome.tiff .ome.tif .nii.gz .tiff .tif .nii .mha .mhd .nrrd .nhdr; do
        case "$lower" in
            *"$suffix") printf '%s' "${name:0:${#name}-${#suffix}}"; return ;;
        esac
    done
}

done_n=0; skipped=0; failed=0; ignored=0
log="$out_dir/batch_upscale.log"
declare -A seen=()
for scan in "${in_dir%/}"/*; do
    name=$(basename "$scan")
    stem=$(scan_stem "$name" "$scan")
    if [ -z "$stem" ]; then  # notes, logs, spreadsheets: not scans
        ignored=$((ignored + 1))
        continue
    fi
    if [ -n "${seen[$stem]:-}" ]; then  # rat.tif and rat.nii.gz would share an output
        echo "error: $scan and ${seen[$stem]} would both write ${stem}_sr.tif; rename one" >&2
        failed=$((failed + 1))
        continue
    fi
    seen[$stem]=$scan
    out="$out_dir/${stem}_sr.tif"
    if [ -e "$out" ]; then
        skipped=$((skipped + 1))
        continue
    fi
    echo "== $scan -> $out" >&2
    microct-sr upscale "$scan" "$out" "${model_opt[@]}" --quiet --json "$@" \
        > "$out_dir/${stem}_sr.json"
    status=$?
    case $status in
        0) done_n=$((done_n + 1)) ;;
        130) echo "interrupted; re-run to resume" >&2; rm -f "$out_dir/${stem}_sr.json"; exit 130 ;;
        *) failed=$((failed + 1))
           # a failed --json run prints {"error", "exit_code", "path"}: log its reason
           reason=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["error"])' \
                    "$out_dir/${stem}_sr.json" 2>/dev/null)
           rm -f "$out_dir/${stem}_sr.json"
           echo "$(date -u +%FT%TZ) $scan: exit $status${reason:+: $reason}" >> "$log"
           echo "failed ($status): $scan (see messages above; logged in $log)" >&2 ;;
    esac
done
echo "upscaled $done_n, already done $skipped, failed $failed, not scans (ignored) $ignored" >&2
[ "$failed" -eq 0 ]
