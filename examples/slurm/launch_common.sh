# Sourced by the sbatch scripts next to it: what every topology shares. Not a job script itself.
#
# Knobs (environment variables; sbatch passes your environment on):
#   CONFIG                 the run's YAML (a recipe from examples/configs/), required
#   ATROPOS_MEGATRON_DIR   the checkout to run from (default: the directory you ran sbatch in)
#   ATROPOS_MEGATRON_VENV  its virtualenv (default: $ATROPOS_MEGATRON_DIR/.venv)
#   MODEL_PATH, OUTPUT_DIR, NUM_GPUS, BATCH_SIZE, MAX_EPOCHS (= steps), INFERENCE_BACKEND
#   (sglang | vllm | reference; vllm needs a recipe that says so, e.g. qwen2.5-7b_1node_vllm.yaml),
#   LORA_RANK (0 = full fine-tuning), ATROPOS_API_URL: see
#   `atropos-megatron launch --help`.
# Arguments after the script name are key=value config overrides:
#   CONFIG=examples/configs/qwen3-32b_2+2nodes.yaml sbatch examples/slurm/multi_node.sbatch optimizer.lr=5e-7

set -uo pipefail

REPO=${ATROPOS_MEGATRON_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO" || exit 2
VENV=${ATROPOS_MEGATRON_VENV:-$REPO/.venv}
if [[ -x "$VENV/bin/atropos-megatron" ]]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi
if ! command -v atropos-megatron >/dev/null; then
    echo "error: atropos-megatron is not on PATH; set ATROPOS_MEGATRON_VENV to its virtualenv" >&2
    exit 2
fi
if [[ -z "${CONFIG:-}" ]]; then
    echo "error: set CONFIG to the run's YAML, e.g. CONFIG=examples/configs/qwen2.5-7b_1node.yaml" >&2
    exit 2
fi

# launch_job [key=value ...]: plan the job once, run every node's part, return the launchers' status.
# Sets PLAN (the plan file) and STOP_SIGNAL (USR1 or TERM when a signal made this script stop the run).
launch_job() {
    # Once, in the batch step: node addresses are resolved here and every node reads the same plan.
    PLAN=$(atropos-megatron launch plan --config "$CONFIG" "$@") || return 2
    STOP_SIGNAL=""
    # Slurm's time-limit warning (#SBATCH --signal=B:USR1@<s>) and `scancel --batch` reach only this
    # shell. The nodes are asked to stop through the plan: the trainer checkpoints first, then the
    # services it talks to stop.
    trap 'STOP_SIGNAL=USR1; atropos-megatron launch stop --plan "$PLAN" --reason "SIGUSR1 (time limit near)"' USR1
    trap 'STOP_SIGNAL=TERM; atropos-megatron launch stop --plan "$PLAN" --reason "SIGTERM"' TERM
    # One launcher per node; --kill-on-bad-exit: a node that fails ends the step on every node.
    srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
        atropos-megatron launch run --plan "$PLAN" &
    local srun_pid=$! status=0
    while true; do
        wait "$srun_pid"
        status=$?
        # A trapped signal makes `wait` return early (status > 128) while srun still runs.
        kill -0 "$srun_pid" 2>/dev/null || break
    done
    trap - USR1 TERM
    return "$status"
}

# run_finished: true once the trainer completed every step of this job's plan.
run_finished() {
    [[ -f "$(dirname "$PLAN")/status/finished" ]]
}
