"""LAMB under DeepSpeed ZeRO: the bridge between DeepSpeed's flat, padded, partitioned fp32 groups and LAMB's
per-tensor trust ratios. ZeRO hands the optimizer flat partitions; an off-the-shelf per-parameter LAMB then
computes trust ratios per partition (measured: 2e-2 off unsharded LAMB after 40 steps). Here each flat partition
gets a ``FlatLayout`` (which tensor each stretch belongs to) that ``optim.Lamb`` reduces over ranks."""
from __future__ import annotations

from typing import List

import torch

from evaclip.optim import FlatLayout, Lamb, flat_layout


def install_lamb_layouts(opt, lamb: Lamb, group_params: List[List[torch.nn.Parameter]], zero_stage: int,
                         device: torch.device) -> None:
    """Tell ``lamb`` which parameter each stretch of the flat fp32 partitions DeepSpeed hands it belongs to, so
    trust ratios are per tensor as without ZeRO (``group_params``: the client groups before DeepSpeed swapped
    them). Supported: ZeRO-1/2, bf16 / fp16 wrappers, ZeRO-3; anything else is refused at start-up."""
    kind = type(opt).__name__  # opt: the DeepSpeed optimizer wrapper (engine.optimizer)
    if opt is lamb or kind == "FP16_UnfusedOptimizer":
        return  # no ZeRO: the optimizer sees real (fp32 master) tensors, one per parameter
    dist = torch.distributed
    flats = []  # (flat partition the optimizer will see, DeepSpeed's ordered params, layout)
    if kind == "DeepSpeedZeroOptimizer":  # ZeRO-1/2: padded concatenation of the group, cut in W pieces
        for i, params in enumerate(opt.round_robin_bit16_groups):
            pg = opt.real_dp_process_group[i]
            numels = [m.numel() for m in opt.round_robin_bit16_meta[i]]
            part, pid = opt.partition_size[i], dist.get_rank(group=pg)
            flats.append((opt.single_partition_of_fp32_groups[i], params,
                          flat_layout(numels, list(opt.round_robin_bit16_offsets[i]), pid * part, part, pg)))
    elif kind in ("BF16_Optimizer", "FP16_Optimizer"):  # one flat per group (BF16: sharded like ZeRO-1)
        sharded = kind == "BF16_Optimizer"
        for i, params in enumerate(opt.bf16_groups if sharded else opt.fp16_groups):
            numels = [p.numel() for p in params]
            offsets = [sum(numels[:j]) for j in range(len(numels))]
            if sharded:
                pg = opt.real_dp_process_group[i]
                part, pid = opt.bf16_groups_flat[i].numel() // dist.get_world_size(pg), dist.get_rank(group=pg)
                flat = opt.fp32_groups_flat_partition[i]
            else:
                pg, part, pid, flat = None, sum(numels), 0, opt.fp32_groups_flat[i]
            flats.append((flat, params, flat_layout(numels, offsets, pid * part, part, pg)))
    elif kind == "DeepSpeedZeroOptimizer_Stage3":  # each parameter partitioned on its own, concatenated
        for i, params in enumerate(opt.fp16_groups):
            sizes = [p.partition_numel() for p in params]
            pads = opt.groups_padding[i]
            ids, lengths = [], []
            for j, (n, pad) in enumerate(zip(sizes, pads)):
                ids += [j, len(params)] if pad else [j]
                lengths += [n - pad, pad] if pad else [n]
            keep = [k for k, n in enumerate(lengths) if n > 0]
            layout = FlatLayout(torch.tensor([ids[k] for k in keep]), torch.tensor([lengths[k] for k in keep]),
                                len(params), opt.sub_group_process_groups[i])
            flats.append((opt.fp32_partitioned_groups_flat[i], params, layout))
    else:
        raise RuntimeError(f"optim.name = 'lamb' is not supported with DeepSpeed's {kind} "
                           f"(ZeRO stage {zero_stage}); use optim.name = 'adamw'")
    for flat, ds_params, layout in flats:
        check_layout(ds_params, layout, group_params, device)
        lamb.register_flat(flat, layout)


def check_layout(ds_params, layout: FlatLayout, group_params, device: torch.device) -> None:
    """DeepSpeed's parameters must be a run of one of our groups, in order, and each tensor's stretches
    must add up to its size over the data-parallel ranks: a layout change in a future DeepSpeed fails
    here at start-up instead of silently breaking LAMB's trust ratios."""
    pos = {id(p): (g, j) for g, params in enumerate(group_params) for j, p in enumerate(params)}
    where = [pos.get(id(p)) for p in ds_params]
    if None in where or len({g for g, _ in where}) != 1 or \
            [j for _, j in where] != list(range(where[0][1], where[0][1] + len(where))):
        raise RuntimeError("DeepSpeed reordered a parameter group; LAMB layouts need the original order")
    sizes = torch.zeros(layout.num_tensors + 1, dtype=torch.long, device=device)
    sizes.index_add_(0, layout.ids.to(device), layout.lengths.to(device))
    if layout.process_group is not None:
        torch.distributed.all_reduce(sizes, group=layout.process_group)
    if sizes[:-1].tolist() != [getattr(p, "ds_numel", p.numel()) for p in ds_params]:
        raise RuntimeError("LAMB layout does not match DeepSpeed's partitioning")
