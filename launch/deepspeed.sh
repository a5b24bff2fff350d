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
# MASTER_ADDR: the first host's address. Over ssh DeepSpeed finds it itself (`hostname -I` there); with NO_SSH=1
# on several nodes give it. Over ssh, pdsh starts the workers with DeepSpeed's own short list of variables
# (NCCL_*, PYTHON*, ...): the ones mpoe and its libraries read too (MPOE_*, WANDB_*, HF_*, GLOO_*, TORCH_*,
# OMP_NUM_THREADS, DS_ACCELERATOR, ...) go in a DeepSpeed environment file (DS_ENV_FILE, as ~/.deepspeed_env
# would), written for each launch to $MPOE_CACHE/deepspeed_env (default ~/.cache/mpoe), readable by you only.
set -euo pipefail
HOSTFILE=${HOSTFILE:-hostfile}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}

# Validates the hostfile and the config for its world size before anything starts.
"$PYTHON" -m mpoe.train.preflight --hostfile "$HOSTFILE" -- "$@" >/dev/null

hosts=$(grep -Ecv '^[[:space:]]*(#|$)' "$HOSTFILE" || true)
only_this_machine() {
  [ "$hosts" = "1" ] && grep -Eq '^[[:space:]]*(localhost|127\.0\.0\.1)[[:space:]]' "$HOSTFILE"
}
ARGS=(--hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
if [ -n "${MASTER_ADDR:-}" ]; then
  ARGS+=(--master_addr "$MASTER_ADDR")
elif only_this_machine; then
  ARGS+=(--master_addr 127.0.0.1)
elif [ "${NO_SSH:-0}" = "1" ]; then
  echo "launch/deepspeed.sh: error: NO_SSH=1 with $hosts hosts needs MASTER_ADDR, the first host's address, on every node" >&2
  exit 2
fi
if [ "${NO_SSH:-0}" = "1" ] || only_this_machine; then
  ARGS+=(--no_ssh --node_rank "${NODE_RANK:-0}")
else
  cache=${MPOE_CACHE:-$HOME/.cache/mpoe}
  mkdir -p "$cache"
  export DS_ENV_FILE="$cache/deepspeed_env"
  (umask 077 && env | grep -E '^(MPOE_|WANDB_|HF_|TRANSFORMERS_|TOKENIZERS_|GLOO_|TORCH_|OMP_NUM_THREADS=|DS_ACCELERATOR=)' \
    > "$DS_ENV_FILE" || true)
fi

exec deepspeed "${ARGS[@]}" --no_local_rank --module mpoe.train "$@"
