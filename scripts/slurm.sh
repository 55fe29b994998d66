#!/usr/bin/env bash
# SLURM batch script: `multimodal train` on N nodes with 8 GPUs each, one task per GPU.
#   sbatch --nodes 2 scripts/slurm.sh --config configs/cluster/vit-b-32.yaml
# Arguments after the script go to `multimodal train` unchanged. Lightning reads the SLURM
# environment itself (ranks from SLURM_PROCID / SLURM_LOCALID, the master address from the first
# host of SLURM_NODELIST, a port derived from the job id), so nothing else needs setting; the
# node and GPU counts are passed on from the allocation so that Lightning agrees with SLURM.
# Adapt the partition, account, time and the environment activation to your cluster.
#SBATCH --job-name=multimodal
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --signal=SIGUSR1@120
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
if [[ -f .venv/bin/activate ]]; then
  source .venv/bin/activate
fi

export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
export HF_HUB_OFFLINE=1

NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-8}
srun --kill-on-bad-exit=1 python -m multimodal train "$@" \
  --trainer.num_nodes "$NODES" --trainer.devices "$TASKS_PER_NODE"
