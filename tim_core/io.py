"""Save and load a trained network with its path: safetensors weights plus a JSON config, no training stack.
A model trained on latents carries its VAE in the same folder (``vae/``), so it always decodes with it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .latent import VAE_DIR, LatentSpace
from .model import TiM, TiMConfig
from .transports import Transport, get_transport

__all__ = ["save_pretrained", "load_pretrained", "load_latent_space"]

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_pretrained(model: TiM, directory: str | os.PathLike, transport: Transport, extra: dict | None = None,
                    state_dict: dict | None = None, latent: LatentSpace | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` ({"model", "transport", ["latent",] **extra}) into
    ``directory``, and the VAE under ``vae/`` for a model of ``latent`` space.

    Written to a temporary sibling and renamed, so a crash never leaves a half-written model that looks
    complete. ``state_dict`` overrides the model's own weights (e.g. the EMA shadow).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in (state_dict or model.state_dict()).items()}
        save_file(weights, str(tmp / WEIGHTS))
        config = {"model": model.config, "transport": {"name": transport.name, **transport.params}, **(extra or {})}
        if latent is not None:
            config["latent"] = latent.spec((model.in_channels, *model.input_size))
            latent.save(tmp)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[TiM, Transport]:
    """Rebuild the network and its path from a directory written by ``save_pretrained``; eval mode.

    Older directories load too: their config's REPA keys and the weights of that removed, unused head
    (``projector.*``) are dropped.
    """
    directory = Path(directory)
    for name in (WEIGHTS, CONFIG):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is missing: not a saved TiM model directory")
    config = json.loads((directory / CONFIG).read_text())
    model = TiM(TiMConfig.from_dict(config["model"]))
    weights = load_file(str(directory / WEIGHTS), device="cpu")
    model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("projector.")})
    transport = get_transport(**config["transport"])
    return model.to(device).eval(), transport


def load_latent_space(directory: str | os.PathLike, device: str | torch.device = "cpu") -> LatentSpace | None:
    """The VAE a model folder decodes with (None for a model trained on pixels); an error when the folder's VAE
    is not the one its config names."""
    config = json.loads((Path(directory) / CONFIG).read_text())
    if "latent" not in config:
        return None
    if not (Path(directory) / VAE_DIR).is_dir():
        raise FileNotFoundError(f"{Path(directory) / VAE_DIR} is missing: the model was trained on latents and "
                                "decodes with the VAE saved beside it")
    return LatentSpace.load(directory, config["latent"]).to(device)
