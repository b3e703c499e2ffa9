"""Where each layer's fragments lie in the flat fp32 partitions that DeepSpeed's ZeRO and
mixed-precision optimizers hand their inner optimizer: what LAMB's and LARS's per-layer norms read
(distdl.optim.layerwise)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from distdl.optim.layerwise import FragmentLayout


def fragment_layouts(wrapper: Any) -> dict[torch.Tensor, FragmentLayout]:
    """Where each layer's fragments lie in the flat fp32 tensors that DeepSpeed's ZeRO and
    mixed-precision optimizers hand their inner optimizer, for LAMB's and LARS's per-layer norms
    (distdl.optim.layerwise). Layers are numbered by their place in their group, the same on every
    rank. Empty for fp32 at ZeRO-0, where the inner optimizer steps the model's own parameters."""
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):
        # ZeRO-3: per sub-group, this rank's 1/N slice of each parameter (ds_tensor), one after another.
        reduce, rank = _summed_over(wrapper.dp_process_group), dist.get_rank(wrapper.dp_process_group)
        return {flat: _slices(params, rank, flat.numel(), reduce)
                for flat, params in zip(wrapper.fp32_partitioned_groups_flat, wrapper.fp16_groups)}
    if hasattr(wrapper, "single_partition_of_fp32_groups"):  # ZeRO-1 and 2
        return {flat: _mapped(params, flat.numel(), _summed_over(group)) for flat, params, group in
                zip(wrapper.single_partition_of_fp32_groups, wrapper.bit16_groups, wrapper.real_dp_process_group)}
    if hasattr(wrapper, "fp32_groups_flat_partition"):  # bf16 at ZeRO-0 partitions its fp32 copy as ZeRO-1 does
        return {flat: _mapped(params, flat.numel(), _summed_over(group)) for flat, params, group in
                zip(wrapper.fp32_groups_flat_partition, wrapper.bf16_groups, wrapper.real_dp_process_group)}
    # bf16 at ZeRO-0, and fp16 with a torch optimizer, keep one fp32 copy per parameter (DeepSpeed's
    # FP16_UnfusedOptimizer); fp32 at ZeRO-0 steps the model's own parameters: whole layers both.
    return {}


def _slices(params: list[torch.nn.Parameter], rank: int, total: int, reduce: Any) -> FragmentLayout:
    """ZeRO-3's partitions: each parameter's slice of ds_tensor.ds_numel elements, the last rank's
    padded past the parameter's end. The padding is left out of the norms (its memory is not
    initialized, and a stray NaN there would poison a whole layer's ratio)."""
    lengths, layers = [], []
    for layer, param in enumerate(params):
        size = param.ds_tensor.ds_numel
        real = min(size, max(0, param.ds_numel - rank * size))
        lengths += [real, size - real]
        layers += [layer, -1]
    lengths.append(total - sum(lengths))
    layers.append(-1)
    return FragmentLayout(tuple(lengths), tuple(layers), len(params), reduce)


def _mapped(params: list[torch.nn.Parameter], total: int, reduce: Any) -> FragmentLayout:
    """From DeepSpeed's low-to-high precision links (`_hp_mapping`, set for each parameter with a
    fragment in this rank's partition): the fragments in partition order, gaps as padding."""
    fragments = sorted((p._hp_mapping.hp_fragment_address.start, p._hp_mapping.hp_fragment_address.numel, layer)
                       for layer, p in enumerate(params) if getattr(p, "_hp_mapping", None) is not None)
    lengths, layers, offset = [], [], 0
    for start, numel, layer in fragments:
        if start > offset:
            lengths.append(start - offset)
            layers.append(-1)
        lengths.append(numel)
        layers.append(layer)
        offset = start + numel
    if total > offset:
        lengths.append(total - offset)
        layers.append(-1)
    return FragmentLayout(tuple(lengths), tuple(layers), len(params), reduce)


def _summed_over(group: Any) -> Optional[Callable[[torch.Tensor], None]]:
    """An in-place all-reduce (sum) over a data-parallel group, as DeepSpeed's own gradient-norm
    reduction inside its step; None for a lone rank. Where the backend (NCCL) cannot reduce host
    tensors, as with optimizer states offloaded to CPU memory, the sums travel through the GPU."""
    if dist.get_world_size(group) == 1:
        return None

    def reduce(sums: torch.Tensor) -> None:
        if dist.get_backend(group) == "nccl" and sums.device.type != "cuda":
            on_device = sums.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_device, group=group)
            sums.copy_(on_device)
        else:
            dist.all_reduce(sums, group=group)

    return reduce

