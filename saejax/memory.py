"""Device memory: what one member of a chunk program needs, what the devices have, and how many
members to train per compiled call."""

from __future__ import annotations

import os

import jax
import numpy as np

from saejax import archs, kernels
from saejax.config import SAEConfig, TrainConfig


def member_bytes(sae_cfg: SAEConfig, tc: TrainConfig) -> int:
    """Estimated device bytes per member of a chunk program, before compiling it.

    Parameters, Adam's two moments and the gradient/update temporaries (``~5 P``), plus the
    step's activations: the dense path keeps about nine ``[B, d_sae]`` arrays alive (pre-
    activations, latents, their cotangents, AuxK's masked copy and scatter), the sparse path only
    ``[chunk, d_sae]`` encoder chunks, ``[B, k + n_aux]`` selections and bounded gather/scatter
    chunks. Calibrated against XLA's compiled memory analysis on CPU for every architecture and
    both kernels: it errs on the high side (by 5-90%; the dense TopK shapes by ~20%).
    """
    d, n, bs = sae_cfg.d_in, sae_cfg.d_sae, tc.batch_size
    arch = archs.get(sae_cfg.arch)
    extra = sum(int(np.prod(v.shape)) for v in jax.eval_shape(lambda: arch.extra_params(sae_cfg)).values())
    n_params = 2 * d * n + n + d + extra
    f32 = 4
    acts = 6 * bs * d
    if kernels.resolve(sae_cfg) == "sparse":
        kk = sae_cfg.k + sae_cfg.n_aux
        acts += 3 * kernels.ENCODE_CHUNK * n + 8 * bs * kk + 2 * kernels.CHUNK_BYTES // f32 + arch.sparse_arrays * bs * n
    else:
        acts += arch.dense_arrays * bs * n
    return f32 * (5 * n_params + acts)


def memory_budget() -> tuple[int, str]:
    """Bytes the chunk program may use, and where the figure comes from.

    Accelerators report ``bytes_limit`` and ``bytes_in_use`` (summed over the local devices, over
    which members are sharded); a CPU backend reports nothing, so 70% of the host's RAM is used.
    """
    stats = [dev.memory_stats() for dev in jax.local_devices()]
    if all(st and "bytes_limit" in st for st in stats):
        free = sum(st["bytes_limit"] - st.get("bytes_in_use", 0) for st in stats)
        return int(0.9 * free), f"{len(stats)} x {jax.local_devices()[0].device_kind} memory"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(0.7 * ram), "70% of host RAM"


def auto_group_size(sae_cfg: SAEConfig, tc: TrainConfig, n_members: int) -> int:
    """Largest balanced group size such that the fewest groups of members fit :func:`memory_budget`.

    Prints the split when one is needed; a single member that does not fit is tried anyway.
    """
    per = member_bytes(sae_cfg, tc)
    data = 2 * min(tc.chunk_bytes, tc.chunk_steps * tc.batch_size * sae_cfg.d_in * 4)  # this chunk and the next
    if not tc.same_data_order:
        per += data
        data = 0
    budget, where = memory_budget()
    fit = max(1, (budget - data) // per)
    if fit >= n_members:
        return n_members
    n_groups = -(-n_members // fit)
    group = -(-n_members // n_groups)
    gib = 2.0**30
    print(f"saejax: {n_members} SAEs need ~{(data + n_members * per) / gib:.1f} GiB (~{per / gib:.2f} GiB each) but "
          f"~{budget / gib:.1f} GiB is available ({where}); training them in {n_groups} groups of at most "
          f"{group} (same results, one group after another)")
    return group
