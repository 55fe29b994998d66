"""What every DataLoader worker of a training run does first."""

import signal


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """In each data worker of a training run (training, validation, the evaluation callbacks): SIGTERM and
    SIGUSR1 ignored. A cluster sends them to every process of a job (SLURM's preemption, its `--signal`,
    `scancel -s`); the training process then finishes its step and writes a checkpoint (`multimodal.preemption`),
    for which it needs its workers. PyTorch's own SIGTERM handler would end a worker at once, and the run with
    it. A worker still ends when its loader shuts it down or its parent process dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
