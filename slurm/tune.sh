#!/usr/bin/env bash
# Ray Tune sweep of stage-1 (VAE-GAN) training over loss.disc_start and loss.kl_weight, with the trials
# spread over a Ray cluster started on the allocation.
#   sbatch -N 4 --gpus-per-node=4 slurm/tune.sh out_dir=/scratch/sweeps/vae data.shards=/data/shards/dpm \
#     train.max_steps=20000 train.val_every=2000 'tune.disc_start=[0,10001]' 'tune.kl_weight=[1e-6,1e-4]' \
#     tune.gpus_per_trial=1 tune.cpus_per_trial=4
# Resources are sbatch options (override them on the command line); "$@" are radiodiff-tune overrides.
#SBATCH --job-name=radiodiff-tune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
source "${RADIODIFF_HOME:-$SLURM_SUBMIT_DIR}/slurm/ray_cluster.sh"  # submit from the repository root
radiodiff-tune ray.address=auto "$@"
