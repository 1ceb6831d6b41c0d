#!/usr/bin/env bash
# Train the conditional latent diffusion model (stage 2) on a frozen VAE over the allocation: one
# torchrun per node (srun), one process per GPU, DeepSpeed ZeRO across all of them. Submit from the
# repository root, with the environment activated:
#   sbatch -N 4 --gpus-per-node=8 slurm/train_ldm.sh run_dir=/runs/ldm data.shards=/data/shards/dpm \
#     vae.checkpoint=/runs/vae
#   sbatch -N 2 --time=04:00:00 --cpus-per-task=32 slurm/train_ldm.sh run_dir=/runs/ldm data.shards=... \
#     vae.checkpoint=/runs/vae deepspeed.zero_stage=2 train.micro_batch=8
# Resources: whole nodes (--exclusive, all their memory with --mem=0) and 32 CPUs for the task that runs
# torchrun: 8 ranks x (1 + data.num_workers=2 loader workers) plus headroom. Resources are sbatch options (override them on the command line; no GPUs are requested here, so the
# script also runs on CPU-only clusters); "$@" are radiodiff-train-ldm overrides. Launch settings are
# environment variables read by slurm/torchrun.sh (RADIODIFF_NPROC_PER_NODE, RADIODIFF_MASTER_ADDR,
# RADIODIFF_MASTER_PORT).
# Preemption and time limits: Slurm sends SIGUSR1 300 s before the end; training saves a checkpoint and
# requeues the job, which resumes from run_dir's newest committed checkpoint, logging to the same file.
# Stop a job early the same way: scancel --signal=USR1 <jobid> (a plain scancel ends it for good).
#SBATCH --job-name=radiodiff-ldm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
source "${RADIODIFF_HOME:-$SLURM_SUBMIT_DIR}/slurm/torchrun.sh"  # submit from the repository root
radiodiff_torchrun radiodiff-train-ldm "$@"
