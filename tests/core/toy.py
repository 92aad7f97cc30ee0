"""A small MLP with the network call of tim_core (net(x_t, t, r, labels)) for 2-D tests."""

import math

import torch
from torch import nn


def fourier(s: torch.Tensor, n: int = 16, scale: float = 1000.0) -> torch.Tensor:
    freqs = torch.exp(math.log(32.0) * torch.arange(n, device=s.device, dtype=s.dtype) / n)
    args = s[:, None] * (1000.0 / scale) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ToyNet(nn.Module):
    """F = MLP([x, features(t), features(t - r)]); labels are accepted and ignored (one class)."""

    num_classes = 1

    def __init__(self, dim: int = 2, width: int = 128, depth: int = 3):
        super().__init__()
        layers, d = [], dim + 64
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.SiLU()]
            d = width
        layers.append(nn.Linear(d, dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x, t, r, labels):
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        r = torch.as_tensor(r, device=x.device).expand(x.shape[0])
        t, r = t.to(x.dtype), r.to(x.dtype)
        h = torch.cat([x, fourier(t), fourier(t - r)], dim=-1)
        return self.mlp(h)
