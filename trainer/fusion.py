"""Gated fusion of an image and a caption embedding into one retrieval-unit embedding (ONNX-exportable)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GatedFusion(nn.Module):
    """``g = sigmoid(W [v; t] + b)``, ``u = normalize(g * v + (1 - g) * t + MLP([v; t]))``.

    The per-dimension gate chooses how much of the unit comes from the image and how much from the caption; the
    residual MLP adds what neither carries alone (their interaction). The MLP's output layer starts at zero, so
    an untrained head is a pure gated average (gate ~ 0.5 at init) and training starts from a sensible unit.
    Only plain ops (linear, sigmoid, ReLU, sum, norm, division), so it exports to ONNX unchanged.

    Args:
        dim: Embedding size D of v, t and u.
        hidden_dim: Hidden width of the MLP (default ``dim``).
        eps: Lower bound on the norm before normalising.
    """

    def __init__(self, dim: int, hidden_dim: int | None = None, eps: float = 1e-12) -> None:
        super().__init__()
        hidden = hidden_dim or dim
        self.gate = nn.Linear(2 * dim, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        last = self.mlp[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.eps = eps

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        """Fused unit embeddings.

        Args:
            image: (..., D) image embeddings v.
            text: (..., D) caption embeddings t.

        Returns:
            (..., D) L2-normalised units u.
        """
        joint = torch.cat([image, text], dim=-1)
        g = torch.sigmoid(self.gate(joint))
        fused = g * image + (1.0 - g) * text + self.mlp(joint)
        return fused / fused.norm(dim=-1, keepdim=True).clamp(min=self.eps)
