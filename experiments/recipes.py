"""Does stability depend on the training recipe? Seven recipes at one width, 5 seeds each.

Command: python -m saejax.run experiments/recipes.py
Reproduces: the recipe comparison the seed studies lead to (the Llama pilot lost 97% of its L1
latents to death and had no remedy): on the embedded modular-addition model (offline), d_sae = 256,
TopK, BatchTopK and Matryoshka BatchTopK at k = 16; ReLU-L1 with and without dead-latent
resampling (Bricken et al. 2023; events after steps 200, 400 and 600); JumpReLU; and the gated SAE.
A latent counts as dead after 50 steps (25,600 tokens) without firing, for AuxK and resampling
alike. Read the table's `pwmcc_ratio` (stability over chance), `l0` (the coefficients of the L1 and
L0 recipes are fixed, not tuned to k = 16: compare stability at the L0 each reaches),
`dead_fraction` and `resampled`, and the contrasts table (resampling vs none, TopK vs ReLU, ...).
Runtime: about 10 minutes on a 2-core CPU, the modular model cached.
"""

from saejax.contrasts import Contrast
from saejax.experiment import Experiment, Modular, Recipe


def get_config():
    return Experiment(
        name="recipes",
        source=Modular(task="add", layer=1, site="resid_post", positions="last"),
        recipes=(
            Recipe("topk", "topk"),
            Recipe("batchtopk", "batchtopk"),
            Recipe("matryoshka", "matryoshka"),
            Recipe("relu", "relu"),
            Recipe("relu+resample", "relu", train={"resample_steps": (200, 400, 600)}),
            Recipe("jumprelu", "jumprelu"),
            Recipe("gated", "gated"),
        ),
        widths=(256,),
        ks=(16,),
        l1_coefs=(3e-3,),
        l0_coefs=(3e-3,),
        epochs=(50.0,),
        seeds=(42, 123, 456, 789, 1011),
        sae={"dead_tokens": 25_600},
        train={"batch_size": 512, "lr": 1e-3},
        contrasts=tuple(Contrast("recipe", a, b) for a, b in (
            ("relu+resample", "relu"), ("topk", "relu"), ("batchtopk", "topk"), ("matryoshka", "batchtopk"),
            ("jumprelu", "relu"), ("gated", "relu"))),
    )
