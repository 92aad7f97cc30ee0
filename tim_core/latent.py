"""The latent space a model may be trained in: a diffusers ``AutoencoderKL`` (the VAE) with its scale and shift.

    latents = (mode of q(z | x) - shift) * scale          images = D(latents / scale + shift)

The encoder's posterior mode (its mean) is stored, not a draw from it, so the same images always give the same
latents. A latent space is identified by the sha256 of its VAE's weights (``weights_digest``): the data index,
the training run and the exported model record it, and loading a VAE whose weights differ is an error, so a model
never decodes with another VAE than the one its data was encoded with. diffusers is imported only here, and only
when a latent model is used: pixel models need nothing beyond torch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LatentSpace", "weights_digest", "VAE_DIR"]

VAE_DIR = "vae"  # the VAE's folder (diffusers layout) inside a data index folder or a model folder


def weights_digest(module: nn.Module) -> str:
    """sha256 over every tensor of the state dict (name, shape, dtype, bytes), in name order: the identity of the
    weights whatever file format or folder they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _is_local(source: str) -> bool:
    return os.path.isabs(source) or source.startswith((".", "~")) or Path(source).exists()


class LatentSpace:
    """A VAE with the scale and shift that bring its latents to about unit variance (TiM's prior is N(0, I))."""

    def __init__(self, vae: nn.Module, scale: float, shift: float, source: dict[str, Any]) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.scale, self.shift = float(scale), float(shift)
        self.source = source  # name, revision, subfolder: where the weights came from (informative)
        self.digest = weights_digest(vae)

    @property
    def identity(self) -> dict[str, Any]:
        """Where the weights came from and their sha256: the "vae" entry of a spec."""
        return {**self.source, "sha256": self.digest}

    @property
    def factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels)

    def spec(self, latent_shape: tuple[int, int, int]) -> dict[str, Any]:
        """What a data index and a model config record: the latent shape, scale, shift and the VAE's identity."""
        channels, height, width = latent_shape
        return {"channels": channels, "height": height, "width": width, "scale": self.scale, "shift": self.shift,
                "factor": self.factor, "vae": self.identity}

    def to(self, device: str | torch.device) -> LatentSpace:
        self.vae.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images [B, C, H, W] in [-1, 1] -> float32 latents [B, c, H / factor, W / factor]."""
        posterior = self.vae.encode(images.to(self.device, torch.float32)).latent_dist
        return ((posterior.mode() - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, latents: Tensor, batch_size: int = 64) -> Tensor:
        """Latents -> float32 images in [-1, 1] on the latents' device, ``batch_size`` at a time (the decoder's
        activations at full resolution dominate memory)."""
        parts = [self.vae.decode(chunk.to(self.device, torch.float32) / self.scale + self.shift).sample
                 for chunk in latents.split(batch_size)]
        return torch.cat(parts).clamp_(-1, 1).to(latents.device)

    def save(self, directory: str | os.PathLike) -> Path:
        """The VAE in diffusers' layout (config.json + safetensors) under ``directory/vae``."""
        folder = Path(directory) / VAE_DIR
        self.vae.save_pretrained(str(folder), safe_serialization=True)
        return folder

    @classmethod
    def from_source(cls, source: str, revision: str | None = None, subfolder: str | None = None,
                    scale: float | None = None, shift: float | None = None) -> LatentSpace:
        """Load a VAE from a local folder or a hub id (which must name a pinned ``revision``); ``scale`` and
        ``shift`` default to the VAE config's ``scaling_factor`` and ``shift_factor`` (0 when it has none)."""
        from diffusers import AutoencoderKL

        local = _is_local(source)
        if not local and not revision:
            raise ValueError(f"VAE {source!r} is a hub id: give its revision (a commit hash) so that the latents "
                             "can be reproduced")
        where = Path(source).expanduser() / (subfolder or "") if local else f"{source}@{revision}"
        if local and not (Path(where) / "config.json").is_file():
            raise FileNotFoundError(f"VAE folder {where}: no config.json (a diffusers AutoencoderKL folder, "
                                    "as written by save_pretrained)")
        try:
            # low_cpu_mem_usage needs the accelerate package; the VAE is small enough to load plainly.
            if local:
                vae = AutoencoderKL.from_pretrained(str(where), local_files_only=True, low_cpu_mem_usage=False)
            else:
                vae = AutoencoderKL.from_pretrained(source, revision=revision, subfolder=subfolder,
                                                    low_cpu_mem_usage=False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ValueError(f"VAE {where}: cannot load it as a diffusers AutoencoderKL: {exc}") from None
        config_shift = vae.config.get("shift_factor")
        return cls(vae, scale if scale is not None else vae.config.scaling_factor,
                   shift if shift is not None else (config_shift or 0.0),
                   {"name": source, "revision": revision, "subfolder": subfolder})

    @classmethod
    def load(cls, directory: str | os.PathLike, spec: dict[str, Any]) -> LatentSpace:
        """The VAE saved under ``directory/vae``, checked against ``spec`` (a data index's or model config's
        "latent" entry): its weights must be the ones the spec names."""
        folder = Path(directory) / VAE_DIR
        space = cls.from_source(str(folder), scale=spec["scale"], shift=spec["shift"])
        expected = spec["vae"]["sha256"]
        if space.digest != expected:
            raise ValueError(f"VAE {folder}: its weights (sha256 {space.digest[:12]}...) are not the VAE this was "
                             f"encoded with ({spec['vae'].get('name')}, sha256 {expected[:12]}...)")
        space.source = {k: spec["vae"].get(k) for k in ("name", "revision", "subfolder")}
        return space
