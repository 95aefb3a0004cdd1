"""The reference saejax is timed against: a plain dense TopK SAE with Adam in PyTorch.

This is how the source stability studies and the PyTorch SAE libraries train, one seed after
another: ``pre = (x - b_dec) @ W_enc + b_enc``, keep the top k per token (ReLU'd), decode with a
dense ``[B, d_sae] @ [d_sae, d_in]`` matmul, mean-squared-error loss, ``torch.optim.Adam``, unit-norm
decoder rows (gradient component parallel to each row removed before the step, rows renormalised
after it), and AuxK on dead latents (computed only while some latent is dead, a host-side check as
in EleutherAI sparsify). Same objective and optimiser as saejax's ``topk`` SAE with its default
options, so the step time is comparable.

    python benchmarks/torch_reference.py            # one step time at (768, 16384, 32), B=4096
"""

from __future__ import annotations

import argparse
import time

import torch


class TopKSAE(torch.nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int, *, aux_k: int | None = None, dead_tokens: int = 1_000_000,
                 seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(d_sae, d_in, generator=g)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w_dec)
        self.W_enc = torch.nn.Parameter(w_dec.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        self.k, self.n_aux, self.dead_tokens = k, min(d_in // 2 if aux_k is None else aux_k, d_sae), dead_tokens
        self.register_buffer("since_fired", torch.zeros(d_sae, dtype=torch.long))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        vals, idx = pre.topk(self.k, dim=1, sorted=False)
        z = torch.zeros_like(pre).scatter_(1, idx, torch.relu(vals))
        x_hat = z @ self.W_dec + self.b_dec
        err = x_hat - x
        loss = err.pow(2).sum(1).mean()
        with torch.no_grad():
            fired = (z > 0).any(0)
            self.since_fired = torch.where(fired, 0, (self.since_fired + x.shape[0]).clamp(max=self.dead_tokens))
        dead = self.since_fired >= self.dead_tokens
        n_dead = int(dead.sum())
        if self.n_aux and n_dead:  # AuxK (Gao et al. 2024), normalised as in sparsify
            resid = -err.detach()
            avals, aidx = pre.masked_fill(~dead, -torch.inf).topk(self.n_aux, dim=1, sorted=False)
            avals = torch.where(torch.isfinite(avals), torch.relu(avals), 0.0)
            e_hat = torch.zeros_like(pre).scatter_(1, aidx, avals) @ self.W_dec
            aux = (e_hat - resid).pow(2).sum() / (resid - resid.mean(0)).pow(2).sum().clamp(min=1e-12)
            loss = loss + min(n_dead / self.n_aux, 1.0) * aux / 32
        return loss


def train_step(sae: TopKSAE, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss = sae.loss(x)
    loss.backward()
    with torch.no_grad():  # only the tangential gradient moves a unit-norm row
        w, g = sae.W_dec, sae.W_dec.grad
        g -= (g * w).sum(1, keepdim=True) * w
    opt.step()
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return loss.item()


def step_seconds(d_in: int, d_sae: int, k: int, *, batch: int = 4096, steps: int = 3, warmup: int = 1,
                 seed: int = 0) -> list[float]:
    """Seconds of each of ``steps`` training steps (after ``warmup`` untimed ones) for one seed."""
    sae = TopKSAE(d_in, d_sae, k, seed=seed)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999), eps=1e-8)
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(seed + 1)) / d_in**0.5
    out = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        train_step(sae, opt, x)
        if i >= warmup:
            out.append(time.perf_counter() - t)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=(768, 16384, 32), metavar=("D_IN", "D_SAE", "K"))
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    ts = step_seconds(*a.shape, batch=a.batch, steps=a.steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads: {sorted(ts)[len(ts) // 2]:.3f} s/step")
