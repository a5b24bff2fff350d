#!/usr/bin/env bash
# Training with DeepSpeed's launcher over the nodes of a hostfile ("HOST slots=N" per line).
# By default DeepSpeed reaches the nodes with passwordless ssh + pdsh:
#
#   HOSTFILE=hostfile launch/deepspeed.sh parallel.ep_size=4 hydra.run.dir=/shared/run1
#
# Without ssh, run the same command on every node with NO_SSH=1 and its NODE_RANK (0..N-1);
# a hostfile that lists only this machine (localhost) needs neither.
#
# Arguments are Hydra overrides for mpoe-train. gloo on CPU, nccl on GPUs (automatic).
set -euo pipefail
HOSTFILE=${HOSTFILE:-hostfile}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}

# Validates the hostfile and the config for its world size before anything starts.
"$PYTHON" -m mpoe.train.preflight --hostfile "$HOSTFILE" -- "$@" >/dev/null

SSH_ARGS=()
if [ "${NO_SSH:-0}" = "1" ] || grep -Eq '^[[:space:]]*(localhost|127\.0\.0\.1)[[:space:]]' "$HOSTFILE" \
   && [ "$(grep -Ecv '^[[:space:]]*(#|$)' "$HOSTFILE")" = "1" ]; then
  SSH_ARGS=(--no_ssh --node_rank "${NODE_RANK:-0}")
fi

exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${SSH_ARGS[@]}" \
  --no_local_rank --module mpoe.train "$@"
