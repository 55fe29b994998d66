"""Lightning's FSDP strategy on CPU ranks (gloo), for tests on machines without GPUs.

Lightning refuses `strategy: fsdp` without CUDA, and leaves FSDP's `device_id` unset on CPU,
which torch then rejects. This subclass wraps the module itself with `device_id=cpu`; from there
on Lightning's own FSDP code runs unchanged (sharded parameters, gradients and optimizer state,
full state-dict checkpoints, gradient clipping), but for one CPU-only detour below. Used as
`trainer.strategy: {class_path: cpu_fsdp.CPUFSDP}` with this folder on PYTHONPATH.
"""

import torch
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.strategies import FSDPStrategy
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, OptimStateKeyType, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


class CPUFSDP(FSDPStrategy):
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = FSDP(model, device_id=torch.device("cpu"), sharding_strategy=self.sharding_strategy,
                     mixed_precision=self.mixed_precision_config, **self.kwargs)
        return super()._setup_model(model)  # already wrapped: Lightning keeps the wrapping

    def optimizer_state(self, optimizer) -> dict:
        """Lightning's full optimizer state without `offload_to_cpu`. With it, torch (2.14) copies
        each gathered state with `.cpu()`, a no-op for CPU tensors, so every state of a parameter
        ends up a view of one reused gather buffer (exp_avg == exp_avg_sq). On GPUs `.cpu()` copies."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
                                  FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)):
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state
