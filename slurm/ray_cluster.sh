#!/usr/bin/env bash
# Shared helper, sourced by the sbatch scripts that need Ray: starts a Ray cluster over the
# allocation (head on the first node, one worker per other node) and stops it on exit, and nothing
# else.
# Token authentication stays on: the token lives on the shared filesystem (RAY_AUTH_TOKEN_PATH).
set -euo pipefail

ray_head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# RAY_NODE_IP pins every node's address (a cluster of "nodes" on one machine: 127.0.0.1).
ray_head_ip=${RAY_NODE_IP:-$(srun --nodes=1 --ntasks=1 -w "$ray_head_node" --overlap hostname --ip-address | awk '{print $1}')}
ray_worker_ip_opt=${RAY_NODE_IP:+--node-ip-address=$RAY_NODE_IP}
ray_port=${RAY_PORT:-6379}
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token_$SLURM_JOB_ID}
export RAY_ADDRESS="$ray_head_ip:$ray_port"
if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then  # every node and the driver read this one token
  (umask 077 && mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")" &&
    python3 -c 'import secrets; print(secrets.token_hex(32), end="")' >"$RAY_AUTH_TOKEN_PATH")
fi
ray_cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}

ray_logs=${RAY_LOG_DIR:-.}/ray-$SLURM_JOB_ID  # the Ray daemons' output, one file per node
mkdir -p "$ray_logs"
ray_steps=()  # the srun steps running this job's Ray nodes (`ray start --block`)
# On exit, stop this job's Ray nodes, and only them: `ray stop` would stop every Ray on the node,
# another job's included (a shared node, or a cluster of "nodes" on one machine). SIGTERM reaches
# `ray start --block` through srun, and it stops the processes it started.
stop_ray() {
  kill -TERM "${ray_steps[@]}" 2>/dev/null || return 0
  for _ in $(seq "${RAY_STOP_WAIT_S:-30}"); do
    kill -0 "${ray_steps[@]}" 2>/dev/null || return 0
    sleep 1
  done
  kill -KILL "${ray_steps[@]}" 2>/dev/null || true
}
trap stop_ray EXIT
srun --nodes=1 --ntasks=1 -w "$ray_head_node" --overlap --output="$ray_logs/%N.log" \
  ray start --head --node-ip-address="$ray_head_ip" --port="$ray_port" --num-cpus="$ray_cpus" --block &
ray_steps+=($!)
sleep "${RAY_HEAD_WAIT_S:-10}"
if [ "$SLURM_JOB_NUM_NODES" -gt 1 ]; then
  srun --nodes=$((SLURM_JOB_NUM_NODES - 1)) --ntasks=$((SLURM_JOB_NUM_NODES - 1)) -x "$ray_head_node" --overlap \
    --output="$ray_logs/%N.log" \
    ray start --address="$RAY_ADDRESS" $ray_worker_ip_opt --num-cpus="$ray_cpus" --block &
  ray_steps+=($!)
  sleep "${RAY_WORKER_WAIT_S:-10}"
fi
