#!/usr/bin/env bash
# Shared helper, sourced by slurm/train_vae.sh and slurm/train_ldm.sh: defines radiodiff_torchrun,
# which runs one torchrun per node of the allocation (srun) with a c10d rendezvous on the first node.
#   RADIODIFF_NPROC_PER_NODE  processes per node (default: the GPUs Slurm gave the node, else the GPUs
#                             nvidia-smi sees, else 1, so that CPU-only clusters need no setting)
#   RADIODIFF_MASTER_ADDR     rendezvous host (default: the first node's name; set it where node names do
#                             not resolve, e.g. 127.0.0.1 on tools/local_slurm.sh's one-machine cluster)
#   RADIODIFF_MASTER_PORT     rendezvous port (default: derived from the job id, so that jobs sharing a
#                             node do not collide; in 10000-29999, below Linux's ephemeral range 32768-60999
#                             so that no outgoing connection already holds it)
#   RADIODIFF_SITE_ENV        a site file sourced first (default: slurm/site.env when it exists) for the
#                             cluster's network and filesystem settings, e.g.
#                               export NCCL_SOCKET_IFNAME=ib0          # the interface NCCL bootstraps on
#                               export NCCL_IB_HCA=mlx5_0,mlx5_1       # InfiniBand adapters to use
#                               export NCCL_DEBUG=WARN                 # INFO to debug a hang
#                               export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a failed collective ends the job
set -euo pipefail

site_env=${RADIODIFF_SITE_ENV:-${RADIODIFF_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/site.env}
if [ -f "$site_env" ]; then
  # shellcheck disable=SC1090
  source "$site_env"
fi
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

rdzv_addr=${RADIODIFF_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
rdzv_port=${RADIODIFF_MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
nproc_per_node=${RADIODIFF_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}}
[ "${nproc_per_node:-0}" -gt 0 ] || nproc_per_node=1

# radiodiff_torchrun <console script> <hydra overrides...>
# Signals: --signal=USR1@N (without B:), `scancel --signal=USR1` and the SIGTERM of `scancel` or of a time
# limit reach every process of the job step: torchrun and its workers. torchrun dies of SIGUSR1 and stops
# its workers on SIGTERM, and srun then ends the whole step, killing the workers while they save.
# `trap "" USR1 TERM` makes the step's shell ignore both; an ignored signal stays ignored across exec and
# is inherited by torchrun's workers, whose training code installs its own handler for both
# (radiodiff/train/preemption.py). On SIGTERM Slurm sends SIGKILL after KillWait (30 s by default): the
# workers save at the next step boundary, so a step must take well under that. The workers then save a
# checkpoint, exit 75, and rank 0 requeues the job (torchrun reports 75 as 1, so this script cannot
# requeue on the exit code).
radiodiff_torchrun() {
  local script  # torchrun runs it with python -u (unbuffered logs)
  script=$(command -v "$1") || { echo "radiodiff: $1 not found: activate the environment before sbatch" >&2; return 1; }
  echo "radiodiff: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_JOB_NUM_NODES node(s) x" \
    "$nproc_per_node process(es), rendezvous $rdzv_addr:$rdzv_port"
  # srun of Slurm 22.05-23.02 does not inherit sbatch's --cpus-per-task: pass it on.
  srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    bash -c 'trap "" USR1 TERM; exec "$@"' torchrun \
    torchrun --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$nproc_per_node" \
    --rdzv_backend=c10d --rdzv_endpoint="$rdzv_addr:$rdzv_port" --rdzv_id="$SLURM_JOB_ID" \
    "$script" "${@:2}"
}
