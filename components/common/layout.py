"""Names of the files and folders that one stage writes and another reads (an exported model folder)."""

from tim_core.io import CONFIG, WEIGHTS

MODEL_FILES = (WEIGHTS, CONFIG)  # all a model folder needs: tim_core.load_pretrained reads these two
RAW_DIR = "raw"                  # the raw (non-EMA) weights, a model folder inside the exported EMA folder
