"""The embedded offline default: the modular-arithmetic SAE stability study.

Command: python -m saejax.run experiments/grid.py
Reproduces: the study of SAEs on a 2-layer modular-addition transformer (p = 113, d_model 128):
TopK (k = 32) and ReLU (L1 = 1e-3) SAEs, d_sae in {64, 128, 256, 1024}, 5 seeds (42, 123, 456,
789, 1011), Adam lr 3e-4, 20 and 50 epochs (20 is an exact snapshot of the 50-epoch run), with
decoder PWMCC, random baselines and their ratio, Hungarian matching, and PWMCC at epoch 0 / 20 / 50
(the study's training-dynamics table, in history.json and figures/dynamics.png), and per seed the
spliced-reconstruction loss recovered and linear probes of the answer (raw vs SAE latents),
and contrasts: TopK vs ReLU, 50 vs 20 epochs, 128 vs 1024 latents. The study found
trained PWMCC ~0.30 at 20 epochs (= random) and ~0.36 at 50; the matched-regime follow-up found
d_sae near the effective rank (~64-128) clearly above random. The transformer is trained by
saejax on first use and cached.
Runtime: 6 min 50 s to 9 min on a 2-core AMD EPYC VM at load 0.9-1.8 from an empty cache
(training the modular model included); 14 min while a test suite shared the cores.
"""

from saejax.contrasts import Contrast
from saejax.experiment import Experiment, Modular


def get_config():
    return Experiment(
        name="grid",
        source=Modular(task="add", layer=1, site="resid_post", positions="last"),
        archs=("topk", "relu"),
        widths=(64, 128, 256, 1024),
        ks=(32,),
        l1_coefs=(1e-3,),
        epochs=(20.0, 50.0),
        seeds=(42, 123, 456, 789, 1011),
        train={"batch_size": 512, "lr": 3e-4},
        dynamics=6,
        analyses=("stability", "splice", "probe"),
        contrasts=(Contrast("arch", "topk", "relu"), Contrast("epochs", 50.0, 20.0), Contrast("d_sae", 128, 1024)),
    )
