"""A small MLP with the network call of tim_core (net(x_t, t, r, labels)) for 2-D tests."""

import math

import torch
from torch import nn


def fourier(s: torch.Tensor, n: int = 16, scale: float = 1000.0) -> torch.Tensor:
    freqs = torch.exp(math.log(32.0) * torch.arange(n, device=s.device, dtype=s.dtype) / n)
    args = s[:, None] * (1000.0 / scale) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ToyNet(nn.Module):
    """F = MLP([x, features(t), features(t - r)]), plus a label embedding when ``num_classes`` > 1 (id
    ``num_classes`` is the null class); with one class the labels are accepted and ignored."""

    def __init__(self, dim: int = 2, width: int = 128, depth: int = 3, num_classes: int = 1, label_dim: int = 16):
        super().__init__()
        self.num_classes = num_classes
        conditional = num_classes > 1
        layers, d = [], dim + 64 + (label_dim if conditional else 0)
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.SiLU()]
            d = width
        layers.append(nn.Linear(d, dim))
        self.mlp = nn.Sequential(*layers)
        # Built after the MLP so that an unconditional net draws the same initial weights as before.
        self.label_embedding = nn.Embedding(num_classes + 1, label_dim) if conditional else None

    def forward(self, x, t, r, labels):
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        r = torch.as_tensor(r, device=x.device).expand(x.shape[0])
        t, r = t.to(x.dtype), r.to(x.dtype)
        parts = [x, fourier(t), fourier(t - r)]
        if self.label_embedding is not None:
            parts.append(self.label_embedding(labels))
        return self.mlp(torch.cat(parts, dim=-1))
