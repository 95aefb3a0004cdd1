"""Stability vs sparsity: does cross-seed agreement fall as L0 grows (the Gemma Scope notebook's question)?

Command: python -m saejax.run experiments/l0_sweep.py
Reproduces: the L0 sweep the LLM stability notebook asks for, on the embedded modular-addition
model (offline): TopK with k in {4, 8, 16, 32, 64} and ReLU with five L1 coefficients (the five
coefficients train as one vmapped program), d_sae = 256, 5 seeds. Read `figures/stability_vs_l0.png`.
For an LLM, edit `SOURCE` below, e.g.
`HF(model="gpt2", hook="blocks.6.hook_resid_post", dataset="stas/openwebtext-10k")`.
Runtime: several minutes on a 2-core CPU.
"""

from saejax.experiment import Experiment, Modular

SOURCE = Modular(task="add", layer=1, site="resid_post", positions="last")


def get_config():
    return Experiment(
        name="l0_sweep",
        source=SOURCE,
        archs=("topk", "relu"),
        widths=(256,),
        ks=(4, 8, 16, 32, 64),
        l1_coefs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
        epochs=(50.0,),
        seeds=(0, 1, 2, 3, 4),
        train={"batch_size": 512, "lr": 1e-3},
    )
