#!/usr/bin/env bash
# Every GPU check and measurement of this project, one after another on one GPU:
#
#   bash eval/gpu_suite.sh MODEL OUT_DIR [STEP ...]
#
# STEP (default: all, in this order): kernels e2e speed accuracy prefix profile summary
#   kernels   kernel tests at GPU shapes (fresh seeds), then the recorded seed that has failed there
#   e2e       eval/e2e_smoke.py: OpenAI API, top-p 1 == dense, repeatability, CUDA graph on/off, multi-turn
#   speed     eval/bench_decode.py at SPEED_CONTEXTS x SPEED_BATCHES (text prompts), top-p SPEED_TOP_P, servers
#             SPEED_BACKENDS (default dense,rabitq; rabitq-sparse: every decode step sparse); with
#             SPEED_AT=accuracy at the accuracy step's cheapest configuration within 1 point of dense at
#             SPEED_PICK_CONTEXT (eval/operating_point.py; run the accuracy step first)
#   accuracy  eval/accuracy.py at ACC_CONTEXTS, ACC_TOP_P x ACC_TEMPERATURE (score temperatures; unset: the
#             server's default), ACC_SAMPLES per task, ACC_PARALLEL servers at once
#   prefix    eval/prefix_sharing.py (the main workload) with PREFIX_ARGS
#   profile   eval/profile_decode.py on the Llama-3.1-8B shape with random weights (needs no model)
#   ab        eval/ab_step.py: one layer's decode step, this tree's kernels vs the tree at AB_BASE
#             (e.g. `git archive HEAD~1 sglang_rabitq kernels | tar -x -C ab-base` before the call),
#             with AB_ARGS (shapes, contexts, batches; ab_step.py's defaults if unset)
#   summary   eval/summary.py over what the steps above wrote
# Steps joined by a comma (e2e,accuracy) run at the same time: for steps that time nothing. Each one
# starts once every server already started has sized its KV pool (SGLang sizes it from the free
# memory it sees), so give them memory fractions that fit together (MEM_FRACTION).
# RABITQ_ARGS (environment): extra flags for every rabitq server of every step.
# Each step writes OUT_DIR/<step>.log and its results under OUT_DIR; OUT_DIR/progress records every
# step's start, end and exit status. A failing step does not stop the next one.
set -u
MODEL=${1:?usage: bash eval/gpu_suite.sh MODEL OUT_DIR [STEP ...]}
OUT=${2:?usage: bash eval/gpu_suite.sh MODEL OUT_DIR [STEP ...]}
shift 2
STEPS=${*:-kernels e2e speed accuracy prefix profile summary}
SPEED_CONTEXTS=${SPEED_CONTEXTS:-8192,32768}
SPEED_BATCHES=${SPEED_BATCHES:-16}
SPEED_TOP_P=${SPEED_TOP_P:-0.9}
SPEED_BACKENDS=${SPEED_BACKENDS:-dense,rabitq}
SPEED_PICK_CONTEXT=${SPEED_PICK_CONTEXT:-32768}
ACC_CONTEXTS=${ACC_CONTEXTS:-8192,32768}
ACC_TOP_P=${ACC_TOP_P:-0.9,0.95}
ACC_TEMPERATURE=${ACC_TEMPERATURE:-}
ACC_SAMPLES=${ACC_SAMPLES:-5}
ACC_PARALLEL=${ACC_PARALLEL:-1}
PREFIX_ARGS=${PREFIX_ARGS:---docs 2 --doc-tokens 16000 --users 16 --concurrency 4,16 --chats 4 --turns 3}
MEM_FRACTION=${MEM_FRACTION:-0.8}  # --mem-fraction-static of the speed, accuracy and prefix servers
RABITQ_ARGS=${RABITQ_ARGS:-}  # extra flags for every rabitq server, e.g. "--rabitq-center none"
FAILING_SEED=773259024  # gpu_kernel_tests.md: failed on the GPU only (its inputs changed since; still replayed)

cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

run_step() {
    case $1 in
    kernels)
        python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_plan.py tests/test_kernel_sass.py \
            tests/test_compile_once.py
        local rc=$?
        RABITQ_TEST_SEED=$FAILING_SEED python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k decode_layer
        return $rc ;;
    e2e) python3 eval/e2e_smoke.py --model "$MODEL" --out "$OUT/e2e_smoke.json" --rabitq-args="$RABITQ_ARGS" ;;
    speed)
        local top_p=$SPEED_TOP_P temp=- args=$RABITQ_ARGS
        if [ "${SPEED_AT:-}" = accuracy ]; then  # the accuracy step's cheapest configuration within 1 point
            read -r top_p temp < <(python3 eval/operating_point.py "$OUT/accuracy.json" --context "$SPEED_PICK_CONTEXT") \
                || { echo "no operating point in $OUT/accuracy.json"; return 2; }
            echo "speed at the accuracy run's operating point: top-p $top_p, score temperature $temp"
        fi
        [ "$temp" = - ] || args="$args --rabitq-score-temperature $temp"
        python3 eval/bench_decode.py --model "$MODEL" --contexts "$SPEED_CONTEXTS" --batches "$SPEED_BATCHES" \
            --top-p "$top_p" --out "$OUT/speed.json" --log-dir "$OUT/logs" --mem-fraction-static "$MEM_FRACTION" \
            --backends "$SPEED_BACKENDS" --rabitq-args="$args" ;;
    accuracy) python3 eval/accuracy.py --model "$MODEL" --contexts "$ACC_CONTEXTS" --top-p "$ACC_TOP_P" \
        --score-temperature "$ACC_TEMPERATURE" --samples "$ACC_SAMPLES" --parallel "$ACC_PARALLEL" --out "$OUT/accuracy.json" --log-dir "$OUT/logs" \
        --mem-fraction-static "$MEM_FRACTION" --rabitq-args="$RABITQ_ARGS" ;;
    # shellcheck disable=SC2086  # PREFIX_ARGS is a list of arguments
    prefix) python3 eval/prefix_sharing.py --model "$MODEL" $PREFIX_ARGS --out "$OUT/prefix_sharing.json" \
        --log-dir "$OUT/logs" --mem-fraction-static "$MEM_FRACTION" --rabitq-args="$RABITQ_ARGS" ;;
    ab) [ -n "${AB_BASE:-}" ] || { echo "set AB_BASE to the tree to compare against"; return 2; }
        # shellcheck disable=SC2086  # AB_ARGS is a list of arguments
        python3 eval/ab_step.py --base "$AB_BASE" ${AB_ARGS:-} --out "$OUT/ab_step.json" ;;
    profile) python3 eval/profile_decode.py --dummy llama8b --context 8192 --batch 1 --out "$OUT/profile.json" \
        --log-dir "$OUT/logs" ;;
    summary) python3 eval/summary.py --accuracy "$OUT/accuracy.json" --speed "$OUT/speed.json" \
        --prefix "$OUT/prefix_sharing.json" --out-dir "$OUT" ;;
    *) echo "unknown step $1 (steps: kernels e2e speed accuracy prefix profile ab summary)"; return 2 ;;
    esac
}

# every server log under OUT/logs has its KV pool sized, twice in a row POLL_S apart (90 polls at most)
wait_servers_sized() {
    local settled=0
    for _ in $(seq 90); do
        sleep "${POLL_S:-10}"
        local started sized
        started=$(find "$OUT/logs" -name '*.log' 2>/dev/null | wc -l)
        sized=$(grep -l "max_total_num_tokens=" "$OUT"/logs/*.log 2>/dev/null | wc -l)
        if [ "$started" -eq "$sized" ]; then settled=$((settled + 1)); else settled=0; fi
        [ "$settled" -ge 2 ] && return 0
    done
}

run_logged() {
    echo "$(date -u +%FT%TZ) start $1" >> "$OUT/progress"
    run_step "$1" > "$OUT/$1.log" 2>&1
    local rc=$?
    echo "$(date -u +%FT%TZ) end $1 rc=$rc" >> "$OUT/progress"
}

for group in $STEPS; do
    IFS=, read -ra members <<< "$group"
    pids=()
    for i in "${!members[@]}"; do
        [ "$i" -gt 0 ] && wait_servers_sized
        run_logged "${members[$i]}" &
        pids+=($!)
    done
    wait "${pids[@]}"
done
cat "$OUT/progress"
