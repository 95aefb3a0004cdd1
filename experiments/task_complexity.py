"""Stability vs task complexity: SAEs on the modular model trained for addition, multiplication,
and both (an op token picks one), side by side.

Command: python -m saejax.run experiments/task_complexity.py
Reproduces: the matched-regime README's task-complexity figure: TopK k = 32 SAEs at d_sae 64, 128
and 256 on layer 1's residual stream at the `=` position of each model (p = 113, each trained to
99% held-out accuracy), 5 seeds, 50 epochs; PWMCC against each cell's own random control, and
the contrasts add vs mul and add vs both. Probes read the answer (and, for `both`, the op).
Runtime: about 3 models x 70 s plus 3 x 3 minutes of SAEs on a 2-core CPU.
"""

from saejax.contrasts import Contrast
from saejax.experiment import Experiment, Modular


def get_config():
    return Experiment(
        name="task_complexity",
        source={task: Modular(task=task, layer=1, site="resid_post", positions="last") for task in ("add", "mul", "both")},
        archs=("topk",),
        widths=(64, 128, 256),
        ks=(32,),
        epochs=(50.0,),
        seeds=(42, 123, 456, 789, 1011),
        train={"batch_size": 512, "lr": 3e-4},
        dynamics=0,
        analyses=("stability", "probe"),
        contrasts=(Contrast("source", "add", "mul"), Contrast("source", "add", "both")),
    )
