"""Stability vs model quality: the same SAE grid on the embedded modular-addition model stopped at
four held-out accuracies.

Command: python -m saejax.run experiments/model_quality.py
Reproduces: the seed studies' open question "does a better-trained model give more stable SAEs?"
(matched-regime README): one seed of the modular model (p = 113) trained until its held-out
accuracy first reaches 30%, 60%, 90% and 99% (the `model_heldout_acc` column holds the accuracy
reached; one run from the same initialisation, so each is a checkpoint of the same trajectory),
TopK k = 32 and ReLU SAEs at d_sae 64 and 128 (near the activations' effective rank, where the
study found stability above chance), 5 seeds, 50 epochs, at the `=` position of layer 1.
Contrasts: the 99% model against the 30% one, per architecture and width.
Found (3 December 2026): PWMCC hardly moves with model quality (TopK w64 0.379 / 0.378 / 0.373 /
0.375 at 30 / 68 / 94 / 99% accuracy, chance 0.230; 99% minus 30% is -0.004 to -0.007 in every
cell) while the answer probe follows the model (raw 0.51 / 0.88 / 0.98 / 1.00).
Runtime: 4 min 56 s for the 16 cells on a 2-core AMD EPYC VM with the four models cached; each
model first trains once, about 1-2 minutes.
"""

from saejax.contrasts import Contrast
from saejax.experiment import Experiment, Modular


def get_config():
    acc = {f"acc{round(100 * a)}": a for a in (0.3, 0.6, 0.9, 0.99)}
    return Experiment(
        name="model_quality",
        source={name: Modular(task="add", layer=1, site="resid_post", positions="last", accuracy=a)
                for name, a in acc.items()},
        archs=("topk", "relu"),
        widths=(64, 128),
        ks=(32,),
        l1_coefs=(1e-3,),
        epochs=(50.0,),
        seeds=(42, 123, 456, 789, 1011),
        train={"batch_size": 512, "lr": 3e-4},
        dynamics=0,
        analyses=("stability", "probe"),
        contrasts=(Contrast("source", "acc99", "acc30"),),
    )
