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


@pytest.mark.parametrize("frame, expected", [
    ({"label": [1], "colour": ["red"]}, "unknown column(s) 'colour'"),
    ({"num_images": [1], "seed": [2]}, "column 'label' is required"),
    ({"label": [1, 1], "nfe": [2, 0]}, "row 1: num_images and nfe must be >= 1"),
    ({"label": [1, 0, 2], "num_images": [200, 50, 7]}, "row 2: num_images 7 brings the request to 257 images"),
])
def test_the_model_itself_refuses_bad_rows(sqlite_store, name, frame, expected):
    """The model's own checks, below MLflow's schema enforcement (which drops unknown columns silently)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    version = sqlite_store.version(name, {1: 40.0, 2: 30.0, 4: 20.0})
    with sqlite_store.tracking.active():
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model()
    with pytest.raises(MlflowException, match=re.escape(expected)):
        model.predict(None, pd.DataFrame(frame))
