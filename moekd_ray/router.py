"""The router: per input, a weight for each of the K experts; and the mixture it defines.

Formulation (docs/pipeline.md, "Router"): the gate is an MLP over the function's hashed TF-IDF vector x,
    w(x) = softmax(g(x) / tau)              (optionally only the top-k kept, renormalised)
    p_mix(y | x) = sum_k w_k(x) * p_k(y | x)  with p_k the frozen expert k's class probabilities.
It is trained to maximise log p_mix(label) plus a load-balancing term
    balance = K * sum_k mean_x(w_k)^2 - 1     (0 when experts are used equally on average, K-1 when one takes all)
and, when the experts were trained on parts (router.part_loss_weight > 0), a part term
    part = CE(g(x), part(x))                  (the gate taught which part x is from, i.e. whose expert trained on it).
The label likelihood alone is a noisy signal of which expert to trust per row: on Devign, with experts specialised by
project, it left the gate choosing the row's own expert 66% of the time; the part term makes it 99% (BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn


def _to_torch_sparse(x: sp.spmatrix) -> torch.Tensor:
    coo = x.tocoo()
    idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(coo.data.astype(np.float32)), coo.shape).coalesce()


class Router(nn.Module):
    """Gate MLP: sparse features [N, F] -> gate logits [N, K]."""

    def __init__(self, n_features: int, k: int, hidden: int):
        super().__init__()
        self.inp = nn.Parameter(torch.randn(n_features, hidden) * n_features**-0.5)
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.out = nn.Linear(hidden, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.sparse.mm(x, self.inp) + self.bias)
        return self.out(h)


def route(gate_logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """Gate logits [N, K] -> weights [N, K], each row summing to 1. top_k keeps the k largest per row."""
    if top_k is not None and top_k < gate_logits.shape[-1]:
        kth = gate_logits.topk(top_k, dim=-1).values[..., -1:]
        gate_logits = gate_logits.masked_fill(gate_logits < kth, float("-inf"))
    return torch.softmax(gate_logits / temperature, dim=-1)


def uniform_weights(n: int, k: int) -> torch.Tensor:
    return torch.full((n, k), 1.0 / k)


def mixture_probs(expert_logits: torch.Tensor, weights: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Expert logits [N, K, C], weights [N, K] -> mixture class probabilities [N, C] at `temperature`."""
    return torch.einsum("nk,nkc->nc", weights, torch.softmax(expert_logits / temperature, dim=-1))


def balance_loss(weights: torch.Tensor) -> torch.Tensor:
    k = weights.shape[-1]
    return k * (weights.mean(0) ** 2).sum() - 1.0


def train_router(
    features: sp.spmatrix, expert_logits: np.ndarray, labels: np.ndarray, *, hidden: int, temperature: float,
    top_k: int | None, balance_weight: float, epochs: int, lr: float, seed: int,
    parts: np.ndarray | None = None, part_weight: float = 0.0, on_epoch: Callable[[dict], None] | None = None,
) -> Router:
    """Fit the gate on frozen experts' logits (full batch; the transfer set is small next to expert training);
    with `part_weight` > 0 also towards each row's part (`parts` [N], expert j's part is j). `on_epoch(row)` after
    each epoch, row = {epoch, mixture_nll, balance, part_accuracy (the gate's argmax = the row's part; with parts)}."""
    if part_weight > 0 and parts is None:
        raise ValueError("router.part_loss_weight > 0 needs each training row's part; pass parts")
    torch.manual_seed(seed)
    x = _to_torch_sparse(features)
    z = torch.from_numpy(expert_logits).float()
    y = torch.from_numpy(labels).long()
    part = torch.from_numpy(np.asarray(parts)).long() if parts is not None else None
    router = Router(features.shape[1], z.shape[1], hidden)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    for epoch in range(epochs):
        g = router(x)
        w = route(g, temperature, top_k)
        p = mixture_probs(z, w)
        nll = -torch.log(p.gather(1, y[:, None]).squeeze(1).clamp_min(1e-8)).mean()
        loss = nll + balance_weight * balance_loss(w)
        if part_weight > 0:
            loss = loss + part_weight * F.cross_entropy(g, part)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_epoch:
            row = {"epoch": epoch + 1, "mixture_nll": nll.item(), "balance": balance_loss(w).item()}
            if part is not None:
                row["part_accuracy"] = (g.argmax(1) == part).float().mean().item()
            on_epoch(row)
    return router.eval()


@torch.no_grad()
def gate_logits(router: Router, features: sp.spmatrix) -> np.ndarray:
    return router(_to_torch_sparse(features)).numpy()
