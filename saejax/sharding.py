"""Scaling out: hosts, device meshes and the placement of arrays on them.

saejax scales on JAX's own machinery, not on process pools. Training is ``jit(vmap(scan(step)))``
over *members* (seed x swept float); this module lays that member axis over a device mesh:

- :func:`make_mesh` builds a ``members x batch`` mesh from every device. By default the member
  axis takes all devices; when there are fewer members than devices, the spare factor shards the
  batch axis instead (each member's batch is split over ``batch`` devices, gradients all-reduced).
- Arrays are placed with ``NamedSharding``: parameters and optimiser state ``P('members')``,
  activations ``P(None, 'batch')`` (replicated over members when all seeds share the data order),
  hyper-parameters ``P('members')``. XLA's partitioner turns the vmapped program into one
  per-device program; members never communicate, so sharding leaves each member's numbers as
  they are.
- A member count that does not divide the member axis is padded with copies of the last member
  (:func:`pad_members`) and trimmed afterwards (:func:`trim_members`).
- Several hosts: :func:`maybe_initialize_distributed` calls ``jax.distributed.initialize()`` when
  the environment describes a multi-host job; :func:`is_main_process` gates writing results;
  :func:`local_block` is the part of a batch this host reads; :func:`to_host` gathers results.

Reduced precision is :mod:`saejax.precision`; the stability kernel shards its seed pairs itself
(``saejax.stability.all_pairs(..., mesh=)``).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from saejax.errors import check

MEMBERS, BATCH, PAIRS = "members", "batch", "pairs"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


# ----------------------------------------------------------------------------- several hosts
def distributed_reason(env=None) -> str | None:
    """Why this process belongs to a multi-host job (a short phrase), or ``None``.

    ``SAEJAX_DISTRIBUTED=1`` forces it and ``=0`` forbids it; otherwise a SLURM job with more
    than one task, an Open MPI world of more than one process, a TPU pod slice whose worker list
    names several hosts, or an explicit ``JAX_COORDINATOR_ADDRESS``. (A TPU pod that lists its
    workers only in the VM metadata needs ``SAEJAX_DISTRIBUTED=1``.)
    """
    env = os.environ if env is None else env
    flag = env.get("SAEJAX_DISTRIBUTED", "").strip().lower()
    if flag in _FALSE:
        return None
    if flag in _TRUE:
        return "SAEJAX_DISTRIBUTED=1"
    if all(v in env for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")) \
            and _int(env.get("SLURM_NTASKS")) > 1:
        return f"SLURM job with {env['SLURM_NTASKS']} tasks"
    if _int(env.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return f"Open MPI world of {env['OMPI_COMM_WORLD_SIZE']} processes"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return f"TPU pod slice with {len(hosts.split(','))} hosts"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS is set"
    return None


def _int(v) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def maybe_initialize_distributed(env=None, **kwargs) -> bool:
    """Call ``jax.distributed.initialize(**kwargs)`` if :func:`distributed_reason` says so.

    Must run before anything touches a JAX device (``jax.devices()`` included); JAX then detects
    the coordinator, process count and id itself on TPU pods, SLURM and Open MPI. Elsewhere (several
    processes started by hand, one machine or many) give ``JAX_COORDINATOR_ADDRESS=host:port``,
    ``SAEJAX_NUM_PROCESSES`` and ``SAEJAX_PROCESS_ID`` to every process (``SAEJAX_HEARTBEAT_S``: how
    long a silent process may go unnoticed, JAX's default 100 s). CPU processes talk over
    Gloo (TCP). Returns whether this process is (now) part of a multi-process job; calling it
    twice is harmless.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ if env is None else env
    reason = distributed_reason(env)
    if reason is None:
        return False
    for key, name in (("num_processes", "SAEJAX_NUM_PROCESSES"), ("process_id", "SAEJAX_PROCESS_ID"),
                      ("heartbeat_timeout_seconds", "SAEJAX_HEARTBEAT_S")):
        if name in env and key not in kwargs:
            check(env[name].strip().isdigit(), f"{name} must be a non-negative integer, got {env[name]!r}")
            kwargs[key] = int(env[name])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices of several processes
    jax.distributed.initialize(**kwargs)
    if is_main_process():
        print(f"jax.distributed initialised ({reason}): {jax.process_count()} processes")
    return True


def is_main_process() -> bool:
    """True on process 0 only: the one that writes results, figures and checkpoints."""
    return jax.process_index() == 0


def agree(value: int) -> int:
    """Process 0's integer ``value`` on every process (a decision, such as where to resume, that
    every process must take alike; each one's own files may disagree after a crash)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def sync(name: str) -> None:
    """Wait until every process gets here (before exiting: process 0 hosts the coordinator)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def from_main(tree, like):
    """Process 0's pytree of host arrays on every process; ``like`` (same shapes and dtypes) is what
    the other processes pass in."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    out = multihost_utils.broadcast_one_to_all(tree if is_main_process() else like)
    return jax.tree.map(lambda o, a: np.asarray(o).astype(np.asarray(a).dtype), out, like)


# ----------------------------------------------------------------------------- meshes
def mesh_shape(n_members: int | None = None, batch_size: int | None = None, shape=None,
               n_devices: int | None = None) -> tuple[int, int]:
    """``(members, batch)`` axis sizes for ``n_members`` members on ``n_devices`` devices.

    ``shape`` ``None`` chooses automatically: every device on the member axis when there are at
    least as many members as devices; otherwise the member axis is the smallest divisor of the
    device count that holds every member, and the rest shards the batch (its largest factor that
    divides ``batch_size``, so some devices may stay idle). An explicit ``(m, b)`` is used as
    given; one entry may be ``-1`` ("all remaining devices").
    """
    n_devices = jax.device_count() if n_devices is None else n_devices
    if shape is not None:
        check(len(shape) == 2, f"mesh_shape must be (members, batch), got {shape!r}")
        m, b = (int(v) for v in shape)
        check(not (m == -1 and b == -1), f"mesh_shape may have at most one -1, got {shape!r}")
        m = n_devices // b if m == -1 else m
        b = n_devices // m if b == -1 else b
        check(m > 0 and b > 0 and m * b <= n_devices,
              f"mesh_shape {tuple(shape)} needs {m}x{b} devices but {n_devices} are available")
        check(batch_size is None or batch_size % b == 0,
              f"batch_size={batch_size} must be divisible by the mesh's batch axis ({b})")
        return m, b
    if n_members is None or n_members >= n_devices:
        return n_devices, 1
    m = min(d for d in range(1, n_devices + 1) if n_devices % d == 0 and d >= n_members)
    b = n_devices // m if batch_size is None else math.gcd(n_devices // m, batch_size)
    return m, b


def make_mesh(n_members: int | None = None, batch_size: int | None = None, shape=None,
              devices=None) -> Mesh:
    """A ``('members', 'batch')`` mesh over ``devices`` (default: every device of every host).

    Axes are ``Auto`` (the partitioner propagates shardings), whatever the JAX default is.
    See :func:`mesh_shape` for how the sizes are chosen.
    """
    devices = list(jax.devices() if devices is None else devices)
    m, b = mesh_shape(n_members, batch_size, shape, len(devices))
    return jax.make_mesh((m, b), (MEMBERS, BATCH), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[: m * b])


def describe_mesh(mesh: Mesh | None = None, *, n_members: int | None = None, batch_size: int | None = None,
                  shape=None) -> str:
    """One line naming the mesh and its devices, for logs.

    ``mesh`` ``None`` describes the mesh :func:`make_mesh` builds for ``n_members`` /
    ``batch_size`` / ``shape`` (the trainer's default), e.g.
    ``mesh: members=8 x batch=1 over 8 tpu devices (1 process)``.
    """
    mesh = make_mesh(n_members, batch_size, shape) if mesh is None else mesh
    kinds = sorted({d.platform for d in mesh.devices.flat})
    axes = " x ".join(f"{n}={s}" for n, s in mesh.shape.items())
    procs = len({d.process_index for d in mesh.devices.flat})
    unused = jax.device_count() - mesh.size
    return (f"mesh: {axes} over {mesh.size} {'/'.join(kinds)} device{'s' * (mesh.size != 1)} "
            f"({procs} process{'es' * (procs != 1)}{f'; {unused} devices unused' if unused else ''})")


def member_size(mesh: Mesh) -> int:
    check(MEMBERS in mesh.axis_names, f"the training mesh needs a {MEMBERS!r} axis, got axes {mesh.axis_names}")
    return mesh.shape[MEMBERS]


def members_spec(mesh: Mesh, ndim: int = 1, batch_dim: int | None = None) -> NamedSharding:
    """Leading axis over ``members``; ``batch_dim`` (if given) over ``batch``; the rest replicated."""
    spec = [MEMBERS] + [None] * (ndim - 1)
    if batch_dim is not None and BATCH in mesh.axis_names:
        spec[batch_dim] = BATCH
    return NamedSharding(mesh, P(*spec))


def data_spec(mesh: Mesh, ndim: int, batch_dim: int) -> NamedSharding:
    """Shared data: replicated over ``members``, axis ``batch_dim`` over ``batch``."""
    spec: list[str | None] = [None] * ndim
    if BATCH in mesh.axis_names:
        spec[batch_dim] = BATCH
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- placement
def padded_size(n: int, mesh: Mesh) -> int:
    """``n`` rounded up to a multiple of the member axis."""
    m = member_size(mesh)
    return -(-n // m) * m


def pad_members(tree, n: int):
    """Grow every leaf's leading axis to ``n`` with copies of its last entry.

    Copies of a real member train like it (no NaN from zeros, no extra compile) and are dropped by
    :func:`trim_members`. Numpy leaves stay numpy, JAX leaves stay JAX.
    """
    def pad(a):
        extra = n - a.shape[0]
        check(extra >= 0, f"cannot pad {a.shape[0]} members down to {n}")
        if extra == 0:
            return a
        xp = np if isinstance(a, np.ndarray) else jnp
        return xp.concatenate([a, xp.repeat(a[-1:], extra, axis=0)])

    return jax.tree.map(pad, tree)


def trim_members(tree, n: int):
    """The first ``n`` members of every leaf (undoes :func:`pad_members`)."""
    return jax.tree.map(lambda a: a[:n], tree)


def put(x, sharding: NamedSharding) -> jax.Array:
    """Place a host array (identical on every host) with ``sharding``.

    One process: ``device_put``. Several: each host builds only the shards its own devices hold.
    """
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def local_block(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The part of a ``shape`` array that this process's devices hold under ``sharding``: per axis,
    the span of its shards (every axis whole on one process). A host fills only this block from
    its data (:func:`put_block`): with the batch split over hosts, each reads only its own rows."""
    spans = [[n, 0] for n in shape]
    for idx in sharding.addressable_devices_indices_map(shape).values():
        for ax, sl in enumerate(idx if idx is not None else (slice(None),) * len(shape)):  # None: the whole array
            start, stop, _ = sl.indices(shape[ax])
            spans[ax] = [min(spans[ax][0], start), max(spans[ax][1], stop)]
    return tuple(slice(a, b) for a, b in spans)


def put_block(x: np.ndarray, block: tuple[slice, ...], sharding: NamedSharding, shape: tuple[int, ...]) -> jax.Array:
    """The global ``shape`` array whose :func:`local_block` ``block`` is ``x`` (this host's part)."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)

    def shard(idx):
        return x[tuple(slice(i.indices(n)[0] - b.start, i.indices(n)[1] - b.start) for i, b, n in zip(idx, block, shape))]

    return jax.make_array_from_callback(shape, sharding, shard)


def put_tree(tree, sharding: NamedSharding):
    return jax.tree.map(lambda a: put(a, sharding), tree)


def to_host(tree):
    """Numpy copies of a pytree of (possibly sharded, possibly multi-host) arrays, on every host."""
    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(jax.device_get(a))

    return jax.tree.map(get, tree)
