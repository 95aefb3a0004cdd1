"""A tiny end-to-end experiment for the tests (and a 20-second check of an install).

Command: python -m saejax.run experiments/smoke.py --out /tmp/smoke
Reproduces: nothing; exercises every stage (synthetic source with a planted dictionary, TopK and
ReLU, two lengths as snapshots, stability with random control, GT-MCC, exports, figures).
Runtime: about 20 s on a 2-core CPU (mostly compilation).
"""

from saejax.experiment import Experiment, Synthetic


def get_config():
    return Experiment(
        name="smoke",
        source=Synthetic(d=16, n_features=24, s=2, n_heldout=1024),
        archs=("topk", "relu"),
        widths=(24,),
        ks=(2,),
        l1_coefs=(3e-3,),
        epochs=None,
        steps=(60, 120),
        seeds=(0, 1, 2),
        train={"batch_size": 256, "lr": 3e-3, "log_every": 10, "chunk_steps": 40},
        dynamics=3,
        checkpoint_every=40,
        heldout_tokens=1024,
    )
