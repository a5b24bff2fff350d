#!/usr/bin/env bash
# Multi-node training with torchrun and a c10d rendezvous. Run the same command on every node:
#
#   NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 MASTER_ADDR=node0 launch/torchrun.sh parallel.ep_size=8 hydra.run.dir=/shared/run1
#   NNODES=2 NODE_RANK=1 NPROC_PER_NODE=8 MASTER_ADDR=node0 launch/torchrun.sh parallel.ep_size=8 hydra.run.dir=/shared/run1
#
# Arguments are Hydra overrides for mpoe-train. Give every node the same hydra.run.dir on a shared
# file system (checkpoints are written there by every rank). gloo on CPU, nccl on GPUs (automatic).
# RDZV_TIMEOUT (s, default 300): how long a node waits for the others before it gives up with one line.
# MAX_RESTARTS (default 0): how often torchrun restarts the workers after one fails. A restarted worker continues
# the run from its last complete checkpoint, as trainer.resume=auto does, and says so in one line; a trainer.resume
# given on the command line is kept (trainer.resume=null does not resume, and is refused where the run
# directory holds checkpoints).
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT (s, default here 300; torchrun's own is 30): after Ctrl-C or SIGTERM, how long
# torchrun lets the workers finish their step and save a checkpoint before it SIGKILLs them (torch releases
# without --shutdown-timeout ignore it and wait 30 s: the script then says so).
set -euo pipefail
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-mpoe}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-300}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-python}

"$PYTHON" -m mpoe.train.preflight --world-size $((NNODES * NPROC_PER_NODE)) -- "$@"

# TORCH_ELASTIC_SHUTDOWN_TIMEOUT is read by torchrun releases that have --shutdown-timeout (pytorch#172596, 2026).
if ! "$PYTHON" -c "import sys, torch.distributed.launcher.api as a; sys.exit('shutdown_timeout' not in a.LaunchConfig.__dataclass_fields__)"; then
  echo "launch/torchrun.sh: note: this torch's torchrun has no --shutdown-timeout: after Ctrl-C or SIGTERM it kills the workers after 30 s, perhaps before their checkpoint is written (saves are atomic: the previous checkpoint stays)" >&2
fi

if [ "$NODE_RANK" != "0" ]; then
  # The rendezvous store lives on node 0: wait for it with a deadline instead of hanging.
  deadline=$((SECONDS + RDZV_TIMEOUT))
  until (exec 3<>"/dev/tcp/$MASTER_ADDR/$MASTER_PORT") 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then
      echo "launch/torchrun.sh: error: rendezvous $MASTER_ADDR:$MASTER_PORT unreachable after ${RDZV_TIMEOUT}s: start node 0 first or fix MASTER_ADDR/MASTER_PORT" >&2
      exit 2
    fi
    sleep 1
  done
fi

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID" \
  --rdzv_conf "join_timeout=$RDZV_TIMEOUT" --max_restarts "$MAX_RESTARTS" \
  -m mpoe.train "$@"
