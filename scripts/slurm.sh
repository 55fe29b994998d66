#!/usr/bin/env bash
# SLURM batch script: `multimodal train` on N nodes with 8 GPUs each, one task per GPU.
#   sbatch --nodes 2 scripts/slurm.sh --config configs/cluster/vit-b-32.yaml
# Arguments after the script go to `multimodal train` unchanged. Lightning reads the SLURM
# environment itself (ranks from SLURM_PROCID / SLURM_LOCALID, the master address from the first
# host of SLURM_NODELIST, a port derived from the job id), so nothing else needs setting; the
# node and GPU counts are passed on from the allocation so that Lightning agrees with SLURM.
# Adapt the partition, account, time and the environment activation to your cluster.
#
# Time limits and preemption, the cycle (docs/resume-and-checkpoints.md#preemption):
#   1. 120 s before the time limit SLURM sends SIGUSR1 to every task (--signal); each rank records it.
#   2. The ranks agree on a step, finish it, write an exact-resume last.ckpt into the run's
#      checkpoints/ folder, and rank 0 runs `scontrol requeue $SLURM_JOB_ID` (--requeue allows it).
#   3. The tasks exit (rank 0 with status 75, "resumable"); the job waits in the queue again.
#   4. The requeued job runs this script again with the same arguments; SLURM_RESTART_COUNT > 0
#      adds `--resume auto`, which continues the newest run of the config from its last.ckpt
#      (an explicit --resume among the arguments comes later on the line and wins).
# Give the signal time for a step, a checkpoint write and a validation if one may be due: raise
# the 120 s for large models or slow file systems. Checkpoints on a schedule besides (every N
# steps or minutes, the newest K kept): multimodal.checkpoint.RunCheckpoint in trainer.callbacks.
#SBATCH --job-name=multimodal
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=SIGUSR1@120
#SBATCH --requeue
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
if [[ -f .venv/bin/activate ]]; then
  source .venv/bin/activate
fi

export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
export HF_HUB_OFFLINE=1

RESUME=()
if [[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]]; then
  RESUME=(--resume auto)
fi
NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-8}
srun --kill-on-bad-exit=1 python -m multimodal train ${RESUME[@]+"${RESUME[@]}"} "$@" \
  --trainer.num_nodes "$NODES" --trainer.devices "$TASKS_PER_NODE"
