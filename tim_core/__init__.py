"""tim_core: the Transition Model method in pure PyTorch (paths, objective, network, sampler, EMA, latent space)."""

from .ema import EMA
from .io import load_latent_space, load_pretrained, save_pretrained
from .latent import LatentSpace
from .model import PRESETS, TiM, TiMConfig, build_model
from .objective import OBJECTIVES, FlowMatchingLoss, MeanFlowLoss, TransitionLoss, build_objective
from .sampler import GRIDS, SampleResult, default_grid, sample, time_grid
from .transports import TRANSPORTS, Transport, get_transport

__all__ = [
    "EMA", "LatentSpace", "load_latent_space", "load_pretrained", "save_pretrained", "PRESETS", "TiM", "TiMConfig",
    "build_model", "OBJECTIVES", "FlowMatchingLoss", "MeanFlowLoss", "TransitionLoss", "build_objective",
    "SampleResult", "sample", "time_grid", "GRIDS", "default_grid", "TRANSPORTS", "Transport", "get_transport",
]
