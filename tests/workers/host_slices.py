"""One process of a 2-process ``train()`` (run by tests/test_multiprocess.py): trains a batch-sharded
and a member-sharded ensemble and saves the parameters and the size of every ``take`` it made."""

import sys

import numpy as np

from saejax import ArraySource, SAEConfig, TrainConfig, sharding
from saejax.train import train


class Counting(ArraySource):
    def take(self, rows):
        self.sizes.append(int(np.size(rows)))
        return super().take(rows)


def case(mesh_shape, same_order):
    src = Counting(np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32))
    src.sizes = []
    tc = TrainConfig(batch_size=64, steps=30, lr=1e-3, log_every=10, chunk_steps=20, mesh_shape=mesh_shape,
                     same_data_order=same_order)
    r = train(SAEConfig(d_in=16, d_sae=32, arch="topk", k=4), tc, src, [0, 1, 2, 3], progress=False)
    return {"W_dec": r.params["W_dec"], "loss": r.history["loss"], "sizes": np.asarray(src.sizes[1:])}  # [0]: init sample


if __name__ == "__main__":
    sharding.maybe_initialize_distributed()
    import jax

    out = {f"{name}_{k}": v for name, args in {"batch": ((1, 4), True), "members": ((4, 1), False)}.items()
           for k, v in case(*args).items()}
    np.savez(sys.argv[1] + f".{jax.process_index()}.npz", **out)
