#!/usr/bin/env bash
# Issue 23's validation in one run, for a QUIET machine (load average under ~0.5 before it starts;
# nothing else running: the calibration and the runs it predicts must see the same machine).
#
#   bash scripts/validate_sim.sh [--smoke] OUT_DIR
#
# 1. `orcinus bench calibrate` (the default model; stored as OUT_DIR/this-machine.json)
# 2. measured runs, the default model, default thread policy (none used for fitting):
#      A: random trace, 32 requests, prompts 32-256, outputs 16-64, max_num_seqs 8
#      B: the Orca paper's trace (prompts 32-512, outputs 1-128), 48 requests, max_num_seqs 16
#      C: random trace, 128 requests, prompts 16-128, outputs 16-64, max_num_seqs 64
#      each with the backends orca, static, paged, paged-chunked (`bench offline`, all at once);
#      S: `bench sweep --target engine`, the Orca trace, 48 requests, orca:16 and paged:16, Poisson
#         arrivals at 1 and 4 requests/s
# 3. `orcinus bench validate-sim` on all of them with --simulate OUT_DIR/this-machine.json:
#    OUT_DIR/validate.md (the table) and OUT_DIR/validate.json.
# ~15-20 min on the quiet 2-core Xeon (calibration ~3, A ~2, B ~3, C ~3, S ~4, validation ~1; more
# when others share the machine). OUT_DIR/timings.tsv says
# what each step took; OUT_DIR/load.txt the load average before and after each.
#
# --smoke: every step at toy scale (calibrate --quick, 4-8 requests per trace, 2-6 tokens each):
# ~1-2 min; proves the commands, its numbers mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; shift; fi
if [[ $# -ne 1 ]]; then
    echo "usage: bash scripts/validate_sim.sh [--smoke] OUT_DIR" >&2
    exit 2
fi
OUT="$1"
mkdir -p "$OUT/measured"
HW="$OUT/this-machine.json"
: > "$OUT/timings.tsv"
: > "$OUT/load.txt"

step() {  # step NAME COMMAND...: runs it, its output in OUT/NAME.log, its time in timings.tsv
    local name="$1"; shift
    echo "$(date -u +%H:%M:%S) $name: $(cut -d' ' -f1-3 /proc/loadavg) before" >> "$OUT/load.txt"
    local t0=$SECONDS
    echo "== $name: $*"
    if ! "$@" > "$OUT/$name.log" 2>&1; then
        echo "validate_sim: step $name failed; see $OUT/$name.log" >&2
        tail -20 "$OUT/$name.log" >&2
        exit 1
    fi
    printf '%s\t%d\n' "$name" $((SECONDS - t0)) >> "$OUT/timings.tsv"
    echo "$(date -u +%H:%M:%S) $name: $(cut -d' ' -f1-3 /proc/loadavg) after" >> "$OUT/load.txt"
}

load=$(cut -d' ' -f1 /proc/loadavg)
{ date -u; uname -a; nproc; cat /proc/loadavg; } > "$OUT/machine.txt"
if [[ $SMOKE -eq 0 ]] && awk -v l="$load" 'BEGIN { exit !(l > 1.0) }'; then
    echo "validate_sim: load average $load: this machine is not quiet; the numbers will not hold (continuing)" >&2
fi

BACKENDS="orca,static,paged,paged-chunked"
if [[ $SMOKE -eq 1 ]]; then
    CAL=(--quick)
    A=(--num-requests 4 --prompt-len 8:32 --output-len 2:6 --max-num-seqs 2)
    B=(--dataset orca --num-requests 4 --prompt-len 16:48 --output-len 2:6 --max-num-seqs 4)
    C=(--num-requests 8 --prompt-len 8:16 --output-len 2:4 --max-num-seqs 8)
    S=(--dataset orca --num-requests 4 --prompt-len 8:32 --output-len 2:4 --configs orca:4 paged:4 --rates 2,8)
else
    CAL=()
    A=(--num-requests 32 --prompt-len 32:256 --output-len 16:64 --max-num-seqs 8)
    B=(--dataset orca --num-requests 48 --max-num-seqs 16)
    C=(--num-requests 128 --prompt-len 16:128 --output-len 16:64 --max-num-seqs 64)
    S=(--dataset orca --num-requests 48 --configs orca:16 paged:16 --rates 1,4)
fi

step calibrate "$PY" -m orcinus bench calibrate "${CAL[@]}" --output "$HW"
for run in A B C; do
    declare -n args="$run"
    step "offline-$run" "$PY" -m orcinus bench offline --backends "$BACKENDS" "${args[@]}" --no-floor --no-progress \
        --output-json "$OUT/measured/$run.json"
    unset -n args
done
step sweep "$PY" -m orcinus bench sweep --target engine --arrival poisson "${S[@]}" --no-progress \
    --output-dir "$OUT/measured/sweep"
step validate "$PY" -m orcinus bench validate-sim "$OUT"/measured/{A,B,C}.json "$OUT/measured/sweep/sweep.json" \
    --simulate "$HW" --output-json "$OUT/validate.json" --markdown "$OUT/validate.md"
cat "$OUT/validate.md"
echo "validate_sim: done in ${SECONDS} s; everything is in $OUT"
