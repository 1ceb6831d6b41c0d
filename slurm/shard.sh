#!/usr/bin/env bash
# Shard RadioMapSeer into WebDataset tars with Ray tasks spread over the allocation.
#   sbatch -N 4 slurm/shard.sh data.root=/data/RadioMapSeer out=/data/shards/dpm
# Resources are sbatch options (override them on the command line); "$@" are radiodiff-shard overrides.
#SBATCH --job-name=radiodiff-shard
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
source "${RADIODIFF_HOME:-$SLURM_SUBMIT_DIR}/slurm/ray_cluster.sh"  # submit from the repository root
radiodiff-shard ray.address=auto "$@"
