"""Song et al. (2025, arXiv:2505.20254)'s model organism: is a known dictionary found by every seed?

Command: python -m saejax.run experiments/synthetic.py
Reproduces: ground-truth dictionary of 128 unit-norm Gaussian directions in 64 dimensions, 4
active features per sample with |N(0,1)| magnitudes; TopK (k = 4) vs ReLU (L1 sweep) SAEs in the
matched regime (d_sae = n_features = 128) and a redundant one (d_sae = 512); GT-MCC (recovery of
the truth) next to PW-MCC (agreement between seeds). Song et al. report that matched TopK SAEs
recover the truth and agree with each other, while redundant ones agree less.
Runtime: a few minutes on a 2-core CPU.
"""

from saejax.experiment import Experiment, Synthetic


def get_config():
    return Experiment(
        name="synthetic",
        source=Synthetic(d=64, n_features=128, s=4),
        archs=("topk", "relu"),
        widths=(128, 512),
        ks=(4,),
        l1_coefs=(1e-3, 3e-3),
        epochs=None,
        steps=(2000, 5000),
        seeds=(0, 1, 2, 3, 4),
        sae={"b_dec_init": "zeros", "dead_tokens": 100_000},
        train={"batch_size": 1024, "lr": 1e-3},
    )
