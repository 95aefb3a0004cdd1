"""The GPT-2 seed-reproducibility investigation, with its robustness checks, in one grid.

Command (needs the Hugging Face hub; runs as-is on a machine with network):
  python -m saejax.run experiments/gpt2_seed_stability.py
  python -m saejax.run experiments/gpt2_seed_stability.py --set source.hook=blocks.6.hook_resid_post --out runs/gpt2_l6
Reproduces: gpt2-small at `blocks.0.hook_resid_pre` (layer 0; the second command: layer 6),
TopK SAEs with 128 and 512 features and k = 8 / 32, 5 seeds, trained on an OpenWebText sample;
Hungarian matching with thresholds 0.5/0.7/0.9 (`frac_ge_*`), live-only metrics (`live_*`), the
random baseline and bootstrap CIs the investigation listed as missing. Its scale control (30K
tokens) is `--set source.n_tokens=30000`; the default reads 200K tokens.
Runtime: extraction ~1-2 min on a GPU, ~10 min on a laptop CPU; training a few minutes.
"""

from saejax.experiment import HF, Experiment


def get_config():
    return Experiment(
        name="gpt2_seed_stability",
        source=HF(model="gpt2", hook="blocks.0.hook_resid_pre", dataset="stas/openwebtext-10k",
                  ctx_len=128, n_tokens=200_000),
        archs=("topk",),
        widths=(128, 512),
        ks=(8, 32),
        epochs=(8.0,),
        seeds=(1, 2, 3, 4, 5),
        train={"batch_size": 1024, "lr": 1e-3},
    )
