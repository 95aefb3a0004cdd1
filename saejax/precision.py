"""Mixed precision: an SAE loss in bfloat16 over float32 master weights (gradients and Adam stay float32)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from saejax.errors import check

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str | None):
    """The JAX dtype for a ``TrainConfig.compute_dtype`` name (``None`` = float32)."""
    name = name or "float32"
    check(name in COMPUTE_DTYPES, f"compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {name!r}")
    return COMPUTE_DTYPES[name]


def in_compute_dtype(loss_fn, dtype):
    """``loss_fn(params, x, *rest)`` evaluated in ``dtype`` over float32 master parameters.

    Mixed precision as in Micikevicius et al. (2018, arXiv:1710.03740) without loss scaling
    (bfloat16 keeps float32's exponent range): floating parameters and ``x`` are cast to ``dtype``
    inside the function, so forward and backward matmuls run in ``dtype`` while the gradient
    arrives in float32 through the casts' transposes; every floating output is returned as
    float32. ``dtype`` float32 (or ``None``/``"float32"``) returns ``loss_fn`` itself.
    JumpReLU thresholds are cast too, so its straight-through window (``jump_bandwidth``) is
    resolved only to bfloat16's ~3 significant digits: prefer float32 for JumpReLU.
    """
    dtype = compute_dtype(dtype) if dtype is None or isinstance(dtype, str) else dtype
    if jnp.dtype(dtype) == jnp.float32:
        return loss_fn

    def cast(a, to):
        return a.astype(to) if jnp.issubdtype(a.dtype, jnp.floating) else a

    def wrapped(params, x, *rest):
        out = loss_fn(jax.tree.map(partial(cast, to=dtype), params), cast(x, dtype), *rest)
        return jax.tree.map(partial(cast, to=jnp.float32), out)

    return wrapped
