"""The gated-attention network of the ``mil`` patient model (imported only when one is
fitted or loaded, so that reading the patient-model registry does not import PyTorch)."""

from __future__ import annotations

import torch
from torch import nn


class GatedAttention(nn.Module):
    """Ilse et al. 2018: ``a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))``,
    ``z = sum_i a_i h_i``, logits ``= W z``."""

    def __init__(self, dim: int, hidden: int, classes: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.v, self.u = nn.Linear(hidden, hidden // 2), nn.Linear(hidden, hidden // 2)
        self.w = nn.Linear(hidden // 2, 1)
        self.out = nn.Linear(hidden, classes)

    def forward(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(cells)
        a = torch.softmax(self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))), dim=0)
        return self.out((a * h).sum(0)), a[:, 0]
