"""The encoder's losses: SimCLR's NT-Xent and Zoobot's Dirichlet-multinomial vote likelihood (pure torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nt_xent(z1_BP: Tensor, z2_BP: Tensor, temperature: float) -> Tensor:
    """SimCLR's normalised-temperature cross-entropy (Chen et al. 2020, eq. 1) over the 2B views:
    each view's positive is the other view of the same image, its negatives the other 2B - 2 views.

    Under data-parallel training each rank contrasts its own batch (negatives are not gathered
    across ranks); DDP averages the gradients.
    """
    z = F.normalize(torch.cat([z1_BP, z2_BP]).float(), dim=1)
    n = z1_BP.shape[0]
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def dirichlet_multinomial_nll(concentration_BA: Tensor, counts_BA: Tensor, groups: tuple[int, ...]) -> Tensor:
    """Mean over galaxies of the negative log Dirichlet-multinomial likelihood of the vote counts,
    summed over questions (Walmsley et al. 2022, MNRAS 509 3966, eq. 4; Zoobot's loss).

    ``concentration_BA``: Dirichlet concentrations > 0, answers of every question side by side in
    ``groups`` (answers per question); ``counts_BA``: votes per answer (a question nobody was asked
    has all-zero counts and contributes 0).
    """
    a, k = concentration_BA.float(), counts_BA.float()
    nll = a.new_zeros(a.shape[0])
    start = 0
    for size in groups:
        ag, kg = a[:, start:start + size], k[:, start:start + size]
        start += size
        n, a0 = kg.sum(1), ag.sum(1)
        log_p = (torch.lgamma(n + 1) - torch.lgamma(kg + 1).sum(1) + torch.lgamma(a0) - torch.lgamma(n + a0)
                 + (torch.lgamma(kg + ag) - torch.lgamma(ag)).sum(1))
        nll = nll - log_p
    return nll.mean()
