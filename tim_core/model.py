"""The TiM network (docs/method.md section 8): a DiT-style transformer over patches, conditioned on t, the
interval t - r and the class label.

What differs from DiT: decoupled embeddings for the time and for the interval, interval-aware attention
(qkv = W z + W_d E_dt), 2D rotary positions instead of learned absolute ones, qk-norm, SwiGLU MLPs and a
low-rank SwiGLU adaLN whose output layer starts at zero (so an untrained network outputs exactly 0).
The network knows nothing about paths: it sees ``c_noise(t)`` and ``c_noise(r)`` as numbers.
``TiMConfig`` is the one place the network's arguments are defined; ``model.config`` is its JSON form, the
"model" entry of a saved ``config.json``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

__all__ = ["TiM", "TiMConfig", "build_model", "PRESETS", "rope_positions"]

# Keys of config.json files written before the REPA projector head was removed; dropped when read.
LEGACY_KEYS = ("repa_dim", "repa_depth", "repa_hidden")


@dataclass(frozen=True)
class TiMConfig:
    """The network's arguments.

    Args:
        input_size: int or (H, W); any size divisible by patch_size (no learned absolute positions).
        in_channels, patch_size, hidden_size, depth, num_heads: the transformer's shape.
        num_classes: label count; id ``num_classes`` is the null class used for guidance.
        adaln_rank: rank of the low-rank SwiGLU adaLN.
        interval_embedding: add the interval embedder E_dt(c_noise(t) - c_noise(r)) (off = ablation).
        interval_attention: add W_d E_dt to q, k, v in every block (needs interval_embedding).
        qk_norm: RMSNorm on q and k per head.
    """

    input_size: int | tuple[int, int] = 28
    in_channels: int = 1
    patch_size: int = 4
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    num_classes: int = 10
    adaln_rank: int = 64
    interval_embedding: bool = True
    interval_attention: bool = True
    qk_norm: bool = True

    def __post_init__(self):
        size = self.input_size
        H, W = (size, size) if isinstance(size, int) else tuple(size)
        object.__setattr__(self, "input_size", (int(H), int(W)))
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input_size {H}x{W} must be divisible by patch_size {self.patch_size}")
        if self.interval_attention and not self.interval_embedding:
            raise ValueError("interval_attention needs interval_embedding (it projects the interval embedding)")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must give a head size "
                             "divisible by 4 (2D RoPE splits it into row and column pairs)")

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict) -> TiMConfig:
        """Build from keyword values (a preset with overrides, or a saved config), naming any unknown key.

        The keys of the removed REPA head (repa_dim, repa_depth, repa_hidden) in older config.json files are
        ignored.
        """
        values = {k: v for k, v in values.items() if k not in LEGACY_KEYS}
        unknown = sorted(set(values) - set(cls.fields()))
        if unknown:
            raise ValueError(f"bad model override (unknown {', '.join(unknown)}); allowed: {', '.join(cls.fields())}")
        return cls(**values)

    def to_dict(self) -> dict:
        """JSON-ready: what ``save_pretrained`` writes as "model" and ``build_model(**...)`` reads back."""
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return d


class SwiGLU(nn.Module):
    """out = W3 (silu(W1 x) * W2 x); also the low-rank adaLN map (hidden = the rank)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.w1 = nn.Linear(dim_in, hidden)
        self.w2 = nn.Linear(dim_in, hidden)
        self.w3 = nn.Linear(hidden, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(Fn.silu(self.w1(x)) * self.w2(x))


class TimeEmbedder(nn.Module):
    """Sinusoidal features of a scalar (frequency size 256) followed by a 2-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        half = freq_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, s: Tensor) -> Tensor:
        dtype = torch.promote_types(self.freqs.dtype, torch.float32)  # never embed times in bf16
        args = s.to(dtype)[:, None] * self.freqs.to(dtype)[None]
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


def rope_positions(h: int, w: int, device=None) -> Tensor:
    """(row, col) of each token, in the order the patch embedding flattens them (row-major): shape (h*w, 2)."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)


def rope_angles(positions: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of shape (N, head_dim // 2): the first half of the pairs rotate with the row, the rest with
    the column."""
    quarter = head_dim // 4
    inv = theta ** (-torch.arange(quarter, device=positions.device, dtype=torch.float32) / quarter)
    angles = torch.cat([positions[:, :1].float() * inv, positions[:, 1:].float() * inv], dim=-1)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., i], x[..., i + d/2]) of x (..., N, d) by the token's angles."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)  # rotate in >= float32
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def qk_normalize(norm: nn.Module, x: Tensor) -> Tensor:
    """Apply the per-head qk-norm in at least float32 (as the rotation), also under autocast or bf16 weights."""
    if not isinstance(norm, nn.RMSNorm):
        return norm(x)
    wide = torch.promote_types(x.dtype, torch.float32)
    weight = norm.weight.to(wide) if norm.weight is not None else None
    return Fn.rms_norm(x.to(wide), norm.normalized_shape, weight, norm.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, interval_attention: bool, qk_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qkv_interval = nn.Linear(dim, 3 * dim, bias=False) if interval_attention else None
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, z: Tensor, e_dt: Tensor | None, cos: Tensor, sin: Tensor) -> Tensor:
        B, N, D = z.shape
        qkv = self.qkv(z)
        if self.qkv_interval is not None:
            qkv = qkv + self.qkv_interval(e_dt)[:, None]
        q, k, v = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qk_normalize(self.q_norm, q), cos, sin), apply_rope(qk_normalize(self.k_norm, k), cos, sin)
        out = Fn.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """LayerNorm -> modulate -> attention -> gate -> residual; the same around a SwiGLU MLP."""

    def __init__(self, dim: int, num_heads: int, adaln_rank: int, interval_attention: bool, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, interval_attention, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(dim, int(2 * 4 * dim / 3), dim)
        self.adaln = SwiGLU(dim, adaln_rank, 6 * dim)

    def forward(self, z: Tensor, c: Tensor, e_dt: Tensor | None, cos: Tensor, sin: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c).chunk(6, dim=-1)
        z = z + gate1[:, None] * self.attn(modulate(self.norm1(z), shift1, scale1), e_dt, cos, sin)
        return z + gate2[:, None] * self.mlp(modulate(self.norm2(z), shift2, scale2))


class TiM(nn.Module):
    """Transition Model network: ``F = net(x_t, c_noise(t), c_noise(r), labels)``.

    Built from a ``TiMConfig``, or from its fields as keywords: ``TiM(cfg)`` or ``TiM(hidden_size=64, ...)``.
    ``model.cfg`` is the config; ``model.config`` its JSON-ready dict.
    """

    def __init__(self, cfg: TiMConfig | None = None, **kwargs):
        super().__init__()
        if cfg is not None and kwargs:
            raise ValueError("give TiM either a TiMConfig or keyword arguments, not both")
        cfg = cfg if cfg is not None else TiMConfig.from_dict(kwargs)
        self.cfg = cfg
        (H, W), p, D = cfg.input_size, cfg.patch_size, cfg.hidden_size
        self.input_size, self.in_channels, self.patch_size = (H, W), cfg.in_channels, p
        self.num_classes = cfg.num_classes
        self.patch_embed = nn.Conv2d(cfg.in_channels, D, p, stride=p)
        self.t_embedder = TimeEmbedder(D)
        self.dt_embedder = TimeEmbedder(D) if cfg.interval_embedding else None
        self.label_embedder = nn.Embedding(cfg.num_classes + 1, D)
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.adaln_rank, cfg.interval_attention, cfg.qk_norm)
                                    for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_adaln = SwiGLU(D, D // 2, 2 * D)
        self.final_linear = nn.Linear(D, p * p * cfg.in_channels)
        self.head_dim = D // cfg.num_heads
        self.reset_parameters()

    @property
    def config(self) -> dict:
        """The config as a JSON-ready dict: ``build_model(**model.config)`` rebuilds the architecture."""
        return self.cfg.to_dict()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.label_embedder.weight, std=0.02)
        for emb in (self.t_embedder, self.dt_embedder):
            if emb is not None:
                for layer in (emb.mlp[0], emb.mlp[2]):
                    nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: every modulation starts at zero and so does the output projection.
        for adaln in [b.adaln for b in self.blocks] + [self.final_adaln]:
            nn.init.zeros_(adaln.w3.weight)
            nn.init.zeros_(adaln.w3.bias)
        nn.init.zeros_(self.final_linear.weight)
        nn.init.zeros_(self.final_linear.bias)

    def rope(self, h: int, w: int, device) -> tuple[Tensor, Tensor]:
        return rope_angles(rope_positions(h, w, device), self.head_dim)

    def forward(self, x: Tensor, t: Tensor, r: Tensor, labels: Tensor) -> Tensor:
        """x: (B, C, H, W); t, r: c_noise values, (B,) or scalars; labels: (B,) ints, num_classes = null."""
        B, C, H, W = x.shape
        if C != self.in_channels or H % self.patch_size or W % self.patch_size:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W) with H and W divisible by "
                             f"{self.patch_size}; got {tuple(x.shape)}")
        p, h, w = self.patch_size, H // self.patch_size, W // self.patch_size
        t, r = torch.as_tensor(t, device=x.device).expand(B), torch.as_tensor(r, device=x.device).expand(B)
        z = self.patch_embed(x.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)  # (B, h*w, D)
        c = self.t_embedder(t) + self.label_embedder(labels)
        e_dt = None
        if self.dt_embedder is not None:
            e_dt = self.dt_embedder(t - r)
            c = c + e_dt
        cos, sin = self.rope(h, w, x.device)
        for block in self.blocks:
            z = block(z, c, e_dt, cos, sin)
        shift, scale = self.final_adaln(c).chunk(2, dim=-1)
        out = self.final_linear(modulate(self.final_norm(z), shift, scale))  # (B, h*w, p*p*C)
        out = out.view(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
        return out


# Network sizes by name. tiny/small are this project's CPU sizes for 28x28x1 digits; B/4 and XL/2 are the
# paper's (1000 classes on 32x32x4 latents).
PRESETS: dict[str, dict] = {
    # patch 7 (16 tokens): on 2 CPU cores it takes ~3x the steps of patch 4 in the same time, and gave
    # recognisable digits at 1-8 steps where patch 4 did not, in the same 10-minute budget.
    "tiny": dict(input_size=28, in_channels=1, num_classes=10, patch_size=7, hidden_size=128, depth=4,
                 num_heads=4, adaln_rank=64),
    "small": dict(input_size=28, in_channels=1, num_classes=10, patch_size=4, hidden_size=256, depth=6,
                  num_heads=4, adaln_rank=128),
    "B/4": dict(input_size=32, in_channels=4, num_classes=1000, patch_size=4, hidden_size=768, depth=12,
                num_heads=12, adaln_rank=256),
    "XL/2": dict(input_size=32, in_channels=4, num_classes=1000, patch_size=2, hidden_size=1152, depth=28,
                 num_heads=16, adaln_rank=384),
}


def build_model(preset: str | None = None, **overrides) -> TiM:
    """Build a TiM from a preset name (tiny, small, B/4, XL/2) with keyword overrides (``TiMConfig`` fields).

    ``build_model(**model.config)`` rebuilds a model from its saved config (no preset needed).
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset name {preset!r}; allowed: {', '.join(PRESETS)}")
    if overrides.get("repa_dim") is not None:
        raise ValueError("repa_dim: the REPA projector head was removed (no loss used it)")
    return TiM(TiMConfig.from_dict({**(PRESETS[preset] if preset else {}), **overrides}))
