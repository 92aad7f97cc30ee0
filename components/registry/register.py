"""Stage `register`: the trained EMA model becomes a new version of the registered model, as an MLflow pyfunc
(components/registry/pyfunc.py) that generates PNG images at any step count.

  tim register --model models/tim --run-file models/train_run.json --out models/registered.json

The model is logged to the training run, so the version's lineage is that run; the version's tags carry the
evaluation `tim evaluate` logged to the same run (figures per NFE, monotonicity verdict), the recommended NFE,
the code and data versions. No alias is set here: that is `tim promote`'s decision.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from importlib.metadata import version as installed
from pathlib import Path
from typing import Any

from components.common.errors import ModelError, RegistryError
from components.common.files import write_json
from components.common.layout import MODEL_FILES, VAE_DIR
from components.common.tracking import Tracking, git_commit
from components.registry.client import RECOMMENDED_TAG, RUN_TAG, RegistryParams, evaluation, recommended_nfe

log = logging.getLogger(__name__)

PYFUNC_FILE = Path(__file__).with_name("pyfunc.py")
# What `mlflow models serve --env-manager virtualenv|conda` installs; pinned to what this process runs.
REQUIREMENTS = ("torch", "safetensors", "pillow", "numpy", "pandas")
LATENT_REQUIREMENTS = ("diffusers",)  # a model trained on latents decodes with its VAE


def pip_requirements(latent: bool) -> list[str]:
    names = REQUIREMENTS + (LATENT_REQUIREMENTS if latent else ())
    return [f"{name}=={installed(name).split('+')[0]}" for name in names]


def signature_and_example(recommended: int | None):
    """(signature, input example, MLmodel metadata). The signature has the output schema only: with an input
    schema MLflow's enforcement runs before the model and drops an unknown column silently (a 200 for a typo) and
    refuses a null cell without naming its row. The model checks every column and cell itself (pyfunc._requests,
    a 400 naming the row and column); the input columns are documented in the MLmodel metadata
    (``input_columns``: type and whether required) and shown by the input example."""
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from components.registry.pyfunc import INPUT_COLUMNS, OUTPUT_COLUMNS

    outputs = Schema([ColSpec(kind, name) for name, kind in OUTPUT_COLUMNS.items()])
    example = pd.DataFrame({"label": [0], "num_images": [2], "nfe": [recommended or 1], "guidance_scale": [1.0],
                            "seed": [0]})
    metadata = {"input_columns": [{"name": name, "type": kind, "required": name == "label"}
                                  for name, kind in INPUT_COLUMNS.items()]}
    return ModelSignature(outputs=outputs), example, metadata


def register(params: RegistryParams, model_dir: str | Path, run_file: str | Path, out_file: str | Path | None,
             *, tracking: Tracking, project_dir: str | Path | None = None) -> dict[str, Any]:
    """Log and register ``model_dir`` (trained by the run in ``run_file``); returns what ``out_file`` gets."""
    import mlflow

    import tim_core

    project_dir = Path(project_dir or Path.cwd()).resolve()
    model_dir, run_file = Path(model_dir), Path(run_file)
    if not run_file.is_file():
        raise RegistryError(f"{run_file}: no training run file; run `tim train` first")
    run = json.loads(run_file.read_text())
    try:  # refuse to register what the pyfunc could not load
        model, _ = tim_core.load_pretrained(model_dir)
        latent = tim_core.load_latent_space(model_dir)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ModelError(f"{model_dir}: {e}") from None
    tracking.same_store(run.get("tracking_uri"), f"the training run in {run_file}")
    uri = tracking.uri
    client = tracking.client(must_exist=True)
    ev = evaluation(client, run["run_id"], params.recommend.guidance_scale)
    best = recommended_nfe(ev, params.recommend)
    # The evaluation counts honest NFE (a guided step costs 2); the model is asked for transitions.
    recommended = best // (2 if ev.cfg_scale != 1.0 else 1) if best else None
    commit, dirty = git_commit(project_dir)
    tags = {RUN_TAG: run["run_id"], RECOMMENDED_TAG: str(recommended or "none"), "tim.code.version": commit,
            "tim.code.dirty": str(dirty).lower(), "tim.data.version": str(run.get("data_version", "unknown")),
            **ev.tags()}
    signature, example, metadata = signature_and_example(recommended)

    with tempfile.TemporaryDirectory(prefix="tim-register-") as tmp, tracking.active():
        artifact = Path(tmp) / "tim_model"
        artifact.mkdir()
        for name in MODEL_FILES:  # only the weights and the config (and the VAE), whatever else lies in the folder
            shutil.copy2(model_dir / name, artifact / name)
        if latent is not None:
            shutil.copytree(model_dir / VAE_DIR, artifact / VAE_DIR)
        with mlflow.start_run(run_id=run["run_id"]):
            info = mlflow.pyfunc.log_model(
                name="registry_model", python_model=str(PYFUNC_FILE), artifacts={"tim_model": str(artifact)},
                code_paths=[str(Path(tim_core.__file__).parent)],
                pip_requirements=pip_requirements(latent is not None),
                signature=signature, input_example=example, metadata=metadata,
                model_config={"recommended_nfe": recommended, "guidance_scale": ev.cfg_scale,
                              "max_images_per_request": params.max_images_per_request,
                              "max_nfe": params.max_nfe})
        version = mlflow.register_model(info.model_uri, params.model_name, tags=tags)
    client.update_model_version(params.model_name, version.version, description=(
        f"TiM EMA weights of run {run['run_id']} ({model.num_classes} classes, {model.input_size[0]}x"
        f"{model.input_size[1]}x{model.in_channels}); recommended NFE {recommended}"))
    result = {"name": params.model_name, "version": str(version.version),
              "model_uri": f"models:/{params.model_name}/{version.version}", "tracking_uri": uri,
              "run_id": run["run_id"], "recommended_nfe": recommended}
    if out_file is not None:
        write_json(Path(out_file), result)
    log.info("registered %s version %s (recommended NFE %s)", params.model_name, version.version, recommended)
    return result

