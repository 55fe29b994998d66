#!/usr/bin/env bash
# Launch `multimodal train` under torchrun: one process per GPU, on one node or several.
#
# One node, all its GPUs:
#   scripts/torchrun.sh --config configs/cluster/vit-b-32.yaml --trainer.num_nodes 1
# Several nodes: run the same line on every node, with the same MASTER_ADDR (a host every node
# can reach, e.g. node 0) and MASTER_PORT, NNODES nodes and each node's NODE_RANK:
#   MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=2 NODE_RANK=0 scripts/torchrun.sh --config ...
#   MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=2 NODE_RANK=1 scripts/torchrun.sh --config ...
# Every argument goes to `multimodal train` unchanged; the number of nodes and of processes per
# node are passed on as --trainer.num_nodes / --trainer.devices so that Lightning agrees with
# torchrun. NPROC_PER_NODE defaults to the number of visible GPUs (set it, with
# --trainer.accelerator cpu, to try the launcher on CPUs).
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi

# NCCL: log warnings only; async error handling makes a failed rank stop the job instead of
# hanging it. Set NCCL_SOCKET_IFNAME / NCCL_IB_HCA for your fabric if NCCL picks the wrong one.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export HF_HUB_OFFLINE=1

exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m multimodal train "$@" --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE"
