"""The L1 SAE pilot on Llama-3.2-1B, made a seed-stability study.

Command (needs the Hugging Face hub and access to meta-llama/Llama-3.2-1B; a GPU is advised):
  python -m saejax.run experiments/llama_pilot.py --set source.hook=blocks.8.hook_resid_post
Reproduces: ReLU + L1 (0.001) SAEs with 8192 latents (4x expansion of d_model 2048), Adam lr 1e-3,
batch 256, 25 epochs, on residual-stream activations of layers 4, 8 and 14 (one run per layer via
--set source.hook=...), now with 5 seeds, dead-latent fractions (the pilot saw 97% dead) and
cross-seed stability. Runtime: dominated by extraction; training ~minutes on a GPU.
"""

from saejax.experiment import HF, Experiment


def get_config():
    return Experiment(
        name="llama_pilot",
        source=HF(model="meta-llama/Llama-3.2-1B", hook="blocks.8.hook_resid_post", dataset="openai/gsm8k",
                  dataset_config="main", text_column="question", ctx_len=128, n_tokens=200_000, dtype="bfloat16"),
        archs=("relu",),
        widths=(8192,),
        l1_coefs=(1e-3,),
        epochs=(25.0,),
        seeds=(0, 1, 2, 3, 4),
        sae={"unit_norm_decoder": False, "b_dec_init": "zeros"},
        train={"batch_size": 256, "lr": 1e-3},
    )
