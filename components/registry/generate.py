"""`tim generate`: images of one class from a registered model, through the same pyfunc that `mlflow models serve`
runs, so what a user sees here is what the endpoint answers.

  tim generate --model models:/tim-mnist@champion --label 3 --nfe 4 --out grid.png
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from components.common.errors import RegistryError
from components.common.tracking import Tracking


@dataclass(frozen=True)
class Sampled:
    path: Path
    nfe: int               # transitions used
    recommended_nfe: int | None


def generate(model_uri: str, label: int, nfe: int | None, num_images: int, guidance_scale: float | None, seed: int,
             out: str | Path, *, tracking: Tracking) -> Sampled:
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    tracking.check(must_exist=True)
    try:
        with tracking.active():
            model = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as e:
        raise RegistryError(f"{model_uri}: cannot load it from {tracking.uri}: {e}") from None
    request = {"label": [label], "num_images": [num_images], "seed": [seed]}
    if nfe is not None:
        request["nfe"] = [nfe]
    if guidance_scale is not None:
        request["guidance_scale"] = [guidance_scale]
    try:
        images = model.predict(pd.DataFrame(request))
    except MlflowException as e:
        raise RegistryError(f"{model_uri}: {e.message}") from None
    tiles = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in images["image"]]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=1)).save(out, format="PNG")
    return Sampled(out, int(images["nfe"].iloc[0]), model.model_config.get("recommended_nfe"))
