"""The registered TiM as an MLflow pyfunc: one row asks for images of one class at one step count.

Logged as "model from code" (MLflow stores this file and runs it at load time), so it imports only tim_core,
torch, numpy, pandas, PIL and mlflow (and diffusers, through tim_core, for a model trained on latents, whose
samples it decodes with the VAE registered beside the weights), never the training stack; tim_core travels with
the model as a code path.

Input (pandas DataFrame; only ``label`` is required):
  label (int), num_images (int, default 1), nfe (int: transitions per image, default the version's recommended
  NFE), guidance_scale (float, default the scale the evaluation used), seed (int, default 0).
Output: one row per image: request (input row), index (within the row), label, nfe (transitions used),
  network_evals (honest NFE, doubled by guidance), seed, width, height, image (base64 PNG).
"""

from __future__ import annotations

import base64
import io

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

import tim_core
from tim_core.images import to_uint8

MODEL_ARTIFACT = "tim_model"   # model.safetensors + config.json (+ vae/ for a latent model): tim_core.save_pretrained
INPUT_COLUMNS = {"label": "long", "num_images": "long", "nfe": "long", "guidance_scale": "double", "seed": "long"}
OUTPUT_COLUMNS = {"request": "long", "index": "long", "label": "long", "nfe": "long", "network_evals": "long",
                  "seed": "long", "width": "long", "height": "long", "image": "string"}


def to_png(image: np.ndarray) -> str:
    """(C, H, W) floats in [-1, 1] -> base64 PNG (grayscale for one channel)."""
    pixels = to_uint8(image)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _bad(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE makes `mlflow models serve` answer 400 with this message instead of 500.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _cell(i: int, column: str, value) -> int | float:
    """One request cell as its column's type (INPUT_COLUMNS): an integer (2.0 is 2: a JSON null elsewhere in the
    column makes pandas store it as a float) or, for a "double" column, a finite number; else a 400 naming it."""
    kind = "an integer" if INPUT_COLUMNS[column] == "long" else "a number"
    if np.ndim(value) == 0 and pd.isna(value):
        raise _bad(f"row {i}: column '{column}' is null; give {kind} or leave the column out for its default")
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
            and np.isfinite(value):
        if INPUT_COLUMNS[column] == "double":
            return float(value)
        if float(value).is_integer():
            return int(value)
    raise _bad(f"row {i}: column '{column}' must be {kind}; got {value!r}")


class TimImageModel(mlflow.pyfunc.PythonModel):
    """Class-conditional image generation at any step count, from the version's EMA weights."""

    def load_context(self, context) -> None:
        self.model, self.transport = tim_core.load_pretrained(context.artifacts[MODEL_ARTIFACT])
        self.latent = tim_core.load_latent_space(context.artifacts[MODEL_ARTIFACT])  # None: a pixel model
        config = context.model_config or {}
        self.recommended_nfe = config.get("recommended_nfe")
        self.guidance_scale = float(config.get("guidance_scale", 1.0))
        self.max_images = int(config.get("max_images_per_request", 256))
        self.max_nfe = int(config.get("max_nfe", 1024))

    def _requests(self, frame: pd.DataFrame) -> list[dict]:
        unknown = sorted(map(str, set(frame.columns) - set(INPUT_COLUMNS)))
        if unknown:
            raise _bad(f"unknown column(s) {', '.join(map(repr, unknown))}: columns must be among "
                       f"{', '.join(INPUT_COLUMNS)}")
        if "label" not in frame.columns:
            raise _bad(f"column 'label' is required (every row asks for one class); got "
                       f"{', '.join(map(str, frame.columns)) or 'no columns'}")
        defaults = {"num_images": 1, "nfe": self.recommended_nfe, "guidance_scale": self.guidance_scale, "seed": 0}
        rows = []
        for i, row in enumerate(frame.to_dict("records")):
            # The model is logged without an input schema (register.signature_and_example), so every cell is
            # checked here: a missing column means its default, a null or mistyped cell is refused by row.
            spec = {k: (_cell(i, k, row[k]) if k in row else v) for k, v in defaults.items()}
            spec["label"] = _cell(i, "label", row["label"])
            if spec["nfe"] is None:
                raise _bad(f"row {i}: no nfe given and this version has no recommended NFE (its evaluation "
                           "had no finite score)")
            label, n, nfe = spec["label"], spec["num_images"], spec["nfe"]
            if not 0 <= label < self.model.num_classes:
                raise _bad(f"row {i}: label {label} outside 0..{self.model.num_classes - 1}")
            if n < 1 or nfe < 1 or spec["guidance_scale"] < 0:
                raise _bad(f"row {i}: num_images and nfe must be >= 1 and guidance_scale >= 0; got {row}")
            if nfe > self.max_nfe:
                raise _bad(f"row {i}: nfe {nfe} is above this version's limit of {self.max_nfe} transitions per "
                           "image (registry.max_nfe)")
            rows.append({"label": label, "num_images": n, "nfe": nfe, "seed": int(spec["seed"]),
                         "guidance_scale": float(spec["guidance_scale"])})
            total = sum(r["num_images"] for r in rows)
            if total > self.max_images:
                raise _bad(f"row {i}: num_images {n} brings the request to {total} images; at most "
                           f"{self.max_images} per request")
        return rows

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        m = self.model
        out = []
        for request, spec in enumerate(self._requests(pd.DataFrame(model_input))):
            noise = torch.randn(spec["num_images"], m.in_channels, *m.input_size,
                                generator=torch.Generator().manual_seed(spec["seed"]))
            labels = torch.full((spec["num_images"],), spec["label"], dtype=torch.long)
            result = tim_core.sample(m, noise, labels, spec["nfe"], transport=self.transport,
                                     cfg_scale=spec["guidance_scale"])
            images = self.latent.decode(result.samples) if self.latent is not None else result.samples
            for index, image in enumerate(images.float().numpy()):
                out.append({"request": request, "index": index, "label": spec["label"], "nfe": spec["nfe"],
                            "network_evals": result.nfe, "seed": spec["seed"], "width": image.shape[-1],
                            "height": image.shape[-2], "image": to_png(image)})
        return pd.DataFrame(out, columns=list(OUTPUT_COLUMNS))


mlflow.models.set_model(TimImageModel())
