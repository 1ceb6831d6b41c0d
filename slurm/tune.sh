#!/usr/bin/env bash
# Ray Tune sweep of stage-1 (VAE-GAN) training over loss.disc_start and loss.kl_weight, with the trials
# spread over a Ray cluster started on the allocation.
#   sbatch -N 4 --gpus-per-node=4 slurm/tune.sh out_dir=/scratch/sweeps/vae data.shards=/data/shards/dpm \
#     train.max_steps=20000 train.val_every=2000 'tune.disc_start=[0,10001]' 'tune.kl_weight=[1e-6,1e-4]' \
#     tune.gpus_per_trial=1 tune.cpus_per_trial=4
# Resources are sbatch options (override them on the command line); "$@" are radiodiff-tune overrides.
# Preemption and time limits: Slurm signals this script 300 s before the time limit (B:USR1@300). It
# then stops the sweep with SIGTERM (running trials commit a checkpoint at their next update, pending
# ones never start; radiodiff-tune exits 75) and requeues the job: at once when the sweep has ended,
# at the latest after RADIODIFF_STOP_GRACE_S (240) seconds. A preempted job is requeued by Slurm
# (--requeue); its trials resume from their newest periodic checkpoint (train.ckpt_every). The
# requeued job runs the same sweep, which continues. Both runs log to one file. A plain scancel ends
# the sweep for good.
#SBATCH --job-name=radiodiff-tune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
echo "radiodiff: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: sweep on $SLURM_JOB_NUM_NODES node(s)"
source "${RADIODIFF_HOME:-$SLURM_SUBMIT_DIR}/slurm/ray_cluster.sh"  # submit from the repository root

requeue() {
  echo "radiodiff: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" || echo "radiodiff: scontrol requeue $SLURM_JOB_ID failed" >&2
}
stopping=0
stop_then_requeue() {
  [ "$stopping" = 1 ] && return
  stopping=1
  echo "radiodiff: time limit near (SIGUSR1): stopping the sweep (running trials save), then requeueing"
  kill -TERM "$tune_pid" 2>/dev/null || true
  (sleep "${RADIODIFF_STOP_GRACE_S:-240}"; echo "radiodiff: the sweep did not stop in time"; requeue) &
}
trap stop_then_requeue USR1
# In the background, so that the trap runs while the sweep does (bash runs traps between commands, and
# `wait` returns early, with a status above 128, when one arrives).
radiodiff-tune ray.address=auto "$@" &
tune_pid=$!
status=0
wait "$tune_pid" || status=$?
while [ "$status" -gt 128 ] && kill -0 "$tune_pid" 2>/dev/null; do
  status=0
  wait "$tune_pid" || status=$?
done
if [ "$stopping" = 1 ] && [ "$status" != 0 ]; then  # 75: stopped; a sweep that had just finished is done
  requeue
fi
exit "$status"
