"""The Gemma Scope notebook's "train multiple SAEs with different seeds" step, on gemma-2-2b layer 12.

Command (needs the Hugging Face hub and access to google/gemma-2-2b; a GPU is advised):
  python -m saejax.run experiments/gemma_scope.py
Reproduces: SAEs on `blocks.12.hook_resid_post` of gemma-2-2b (d_model 2304), 8x expansion,
lr 3e-4, batch 4096 tokens, context 128, 1M training tokens of the uncopyrighted Pile, with an L1
sweep (the notebook's "vary L1 coefficient for different sparsity levels", as one vmapped
program), 5 seeds; stability vs L0 is `figures/stability_vs_l0.png`.
The notebook's comparison of *pretrained* Gemma Scope SAEs across widths or layers needs no
training: download the SAEs (each a directory with one `params.npz`), then compare them, e.g.
  huggingface-cli download google/gemma-scope-2b-pt-res --local-dir gemma-scope \
      --include 'layer_12/width_16k/average_l0_82/*' 'layer_12/width_32k/average_l0_76/*' \
      'layer_12/width_65k/average_l0_72/*' 'layer_13/width_16k/average_l0_84/*'
  python -m saejax.compare gemma-scope/layer_12/width_*/average_l0_*        # cross-width
  python -m saejax.compare gemma-scope/layer_1[23]/width_16k/average_l0_*   # cross-layer
(these four are the release's canonical SAEs; every width has several `average_l0_*` folders). For each pair it
prints decoder PWMCC against the exact random baseline and the smaller SAE's best-match
fractions above 0.8/0.9; `--json FILE` keeps the records. It also reads SAELens, EleutherAI
sparsify and dictionary_learning directories (see `saejax.pretrained`).
Runtime: extraction and training take tens of minutes on one GPU.
"""

from saejax.experiment import HF, Experiment


def get_config():
    return Experiment(
        name="gemma_scope",
        source=HF(model="google/gemma-2-2b", hook="blocks.12.hook_resid_post", dataset="monology/pile-uncopyrighted",
                  ctx_len=128, n_tokens=1_000_000, dtype="bfloat16"),
        archs=("relu",),
        widths=(18432,),
        l1_coefs=(1e-3, 3e-3, 5e-3, 1e-2),
        steps=(244,),
        epochs=None,
        seeds=(42, 43, 44, 45, 46),
        train={"batch_size": 4096, "lr": 3e-4},
    )
