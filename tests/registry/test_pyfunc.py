"""The served model's contract where `mlflow models serve` is not needed to see it: a version whose evaluation
gave no finite figure has no recommended NFE, so a request must name one (the error is the kind the scoring
server turns into HTTP 400, as test_serve.py shows for the other bad requests)."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest

NAN = {1: math.nan, 2: math.nan, 4: math.nan}  # a diverged model: every FID is not a number


def test_no_recommended_nfe_needs_an_nfe_per_row(sqlite_store, name):
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

    version = sqlite_store.version(name, NAN)
    assert sqlite_store.client().get_model_version(name, version).tags["tim.recommended_nfe"] == "none"
    with sqlite_store.tracking.active():
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    with pytest.raises(MlflowException, match="row 0: no nfe given and this version has no recommended NFE") as e:
        model.predict(pd.DataFrame({"label": [0, 1]}))
    assert e.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)
    out = model.predict(pd.DataFrame({"label": [0, 1], "nfe": [2, 1], "seed": [3, 3]}))
    assert out["nfe"].tolist() == [2, 1]
    again = model.predict(pd.DataFrame({"label": [0, 1], "nfe": [2, 1], "seed": [3, 3]}))
    assert again["image"].tolist() == out["image"].tolist()  # in-process too: same seed, same bytes


LOADED_URI = "models:/tim-pyfunc-checks/1"


@pytest.fixture(scope="module")
def loaded(sqlite_store):
    """One registered version (a model of its own name), loaded through MLflow as users load it."""
    import mlflow

    version = sqlite_store.version("tim-pyfunc-checks", {1: 40.0, 2: 30.0, 4: 20.0})
    assert f"models:/tim-pyfunc-checks/{version}" == LOADED_URI
    with sqlite_store.tracking.active():
        return mlflow.pyfunc.load_model(LOADED_URI)


@pytest.mark.parametrize("frame, expected", [
    ({"label": [1], "colour": ["red"]}, "unknown column(s) 'colour'"),
    ({"num_images": [1], "seed": [2]}, "column 'label' is required"),
    ({"label": [1, 1], "nfe": [2, 0]}, "row 1: num_images and nfe must be >= 1"),
    ({"label": [1], "nfe": [1025]}, "row 0: nfe 1025 is above this version's limit of 1024 transitions per image"),
    ({"label": [1, 0, 2], "num_images": [200, 50, 7]}, "row 2: num_images 7 brings the request to 257 images"),
    ({"label": [1, 2], "nfe": [2, None]}, "row 1: column 'nfe' is null; give an integer or leave the column out"),
    ({"label": [None]}, "row 0: column 'label' is null"),
    ({"label": [1], "guidance_scale": [float("inf")]}, "row 0: column 'guidance_scale' must be a number; got inf"),
    ({"label": [1], "nfe": [2.5]}, "row 0: column 'nfe' must be an integer; got 2.5"),
    ({"label": [True]}, "row 0: column 'label' must be an integer; got True"),
    ({"label": [1], "seed": [[1, 2]]}, "row 0: column 'seed' must be an integer; got [1, 2]"),
])
def test_the_model_itself_refuses_bad_rows(loaded, frame, expected):
    """The model's own checks: they are the only ones (the signature has no input schema), so MLflow's predict
    gives the same error as the bare model."""
    from mlflow.exceptions import MlflowException

    for predict in (loaded.predict, lambda frame: loaded.unwrap_python_model().predict(None, frame)):
        with pytest.raises(MlflowException, match=re.escape(expected)):
            predict(pd.DataFrame(frame))


def test_the_signature_documents_the_input_without_enforcing_it(sqlite_store, loaded):
    """Outputs in the signature; the input columns (type, required) in the MLmodel metadata; integral floats
    (what pandas makes of an int column with a null) are accepted as integers."""
    from mlflow.models import get_model_info

    from components.registry.pyfunc import INPUT_COLUMNS, OUTPUT_COLUMNS

    with sqlite_store.tracking.active():
        info = get_model_info(LOADED_URI)
    assert info.signature.inputs is None and info.signature.outputs.input_names() == list(OUTPUT_COLUMNS)
    assert info.metadata["input_columns"] == [{"name": k, "type": v, "required": k == "label"}
                                              for k, v in INPUT_COLUMNS.items()]
    out = loaded.predict(pd.DataFrame({"label": [1.0, 2], "nfe": [2.0, 1], "guidance_scale": [1, 1.0]}))
    assert out["nfe"].tolist() == [2, 1] and out["label"].tolist() == [1, 2]
