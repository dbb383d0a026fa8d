"""Work-arounds for a pinned DeepSpeed, each written against the version named here. tests/test_optim.py fails
loudly when the installed DeepSpeed is another one: re-check each work-around against it, then move the pin."""
from __future__ import annotations

import os

import torch

WRITTEN_FOR = "0.19.7"  # the DeepSpeed these work-arounds were written and tested against (requirements/lock.txt)


def load_hp_state(self, lp_groups_name: str, checkpoint_dir: str) -> None:
    """DeepSpeed 0.19.7's ``load_hp_checkpoint_state_from_checkpoint_dir`` for ZeRO-1/2, with one fix: it takes
    a parameter group's step from the first of this rank's fragments of it and fails (IndexError) when the rank
    holds none, which happens whenever a small group (logit_scale, biases) fits in the first ranks' partitions.
    Such a rank's share of the group is padding only: nothing to restore but the group's settings."""
    from deepspeed.runtime.base_optimizer import _get_universal_checkpoint_ep_info
    from deepspeed.runtime.utils import bwc_tensor_model_parallel_rank
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    checkpoint_dir = os.path.join(checkpoint_dir, "zero")
    optim_sd = torch.load(os.path.join(checkpoint_dir, "optimizer_state.pt"))  # weights-only (deepspeed_loads)
    self._load_global_state(optim_sd)
    tp_rank = bwc_tensor_model_parallel_rank(mpu=self.mpu)
    tp_world_size = 1 if self.mpu is None else self.mpu.get_tensor_model_parallel_world_size()
    ep_rank, ep_size = _get_universal_checkpoint_ep_info()
    for i, (group, saved_group) in enumerate(zip(self.optimizer.param_groups, optim_sd["param_groups"])):
        lps = [lp for lp in getattr(self, lp_groups_name)[i] if lp._hp_mapping is not None]
        keys, steps = set(), []
        for lp in lps:
            steps.append(lp.load_hp_checkpoint_state(os.path.join(checkpoint_dir, self.param_names[lp]), tp_rank,
                                                     tp_world_size, ep_rank=ep_rank, ep_size=ep_size))
            keys.update(lp._hp_mapping.get_optim_state_keys())
        if len(set(map(str, steps))) > 1:
            raise RuntimeError(f"parameter group {i}: its parameters were saved at different steps {steps}")
        hp = group["params"][0]
        if steps and steps[0] is not None:
            self.optimizer.state[hp]["step"] = steps[0]
        if lps:
            map_to_flat_opt_states(hp, getattr(self, lp_groups_name)[i], self.optimizer.state, keys)
        group.update({k: v for k, v in saved_group.items() if k != "params"})
