"""Names of the files and folders that one stage writes and another reads (an exported model folder)."""

from tim_core.io import CONFIG, WEIGHTS
from tim_core.latent import VAE_DIR  # a latent model's VAE folder (tim_core.load_latent_space reads it)

MODEL_FILES = (WEIGHTS, CONFIG)  # all a pixel model folder needs: tim_core.load_pretrained reads these two
RAW_DIR = "raw"                  # the raw (non-EMA) weights, a model folder inside the exported EMA folder

__all__ = ["MODEL_FILES", "RAW_DIR", "VAE_DIR"]
