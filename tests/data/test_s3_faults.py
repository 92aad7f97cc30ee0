"""The `s3` prepare source under S3 faults, through a proxy in front of the real moto server (tests/data/
faults.py) that throttles (503 SlowDown) or drops the connection of each object's first GETs: the configured
retries (prepare.s3.max_attempts) carry the stage through; too few give a DataError naming the object, and no
output folder is left behind."""

from __future__ import annotations

import boto3
import pandas as pd
import pytest

from components.common.errors import DataError
from components.data import prepare
from components.data.prepare import PrepareParams, S3Params

from .faults import faulty_proxy
from .helpers import leftovers, make_image_folder
from .test_s3_dvc import upload_folder

FAILS = 2  # faults per object before it is served


@pytest.fixture
def bucket(aws_env, tmp_path):
    client = boto3.client("s3", endpoint_url=aws_env)
    name = f"faults-{tmp_path.name.lower().replace('_', '-')}"[:60]
    client.create_bucket(Bucket=name)
    upload_folder(client, make_image_folder(tmp_path / "raw", per_class=2), name, "images")
    return name


def params(bucket: str, endpoint: str, attempts: int) -> PrepareParams:
    return PrepareParams(source="s3", root=f"s3://{bucket}/images", resolution=16,
                         s3=S3Params(endpoint_url=endpoint, max_attempts=attempts))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["slowdown", "drop"])
def test_configured_retries_ride_out_the_faults(aws_env, bucket, tmp_path, kind):
    with faulty_proxy(aws_env, FAILS, kind) as (url, proxy):
        out = prepare.prepare(params(bucket, url, attempts=FAILS + 1), tmp_path / "prepared")
    manifest = pd.read_csv(out / "manifest.csv")
    assert len(manifest) == 6
    assert proxy.faults == FAILS * 6 and set(proxy.gets.values()) == {FAILS + 1}  # every object retried twice


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["slowdown", "drop"])
def test_too_few_retries_name_the_object_and_write_nothing(aws_env, bucket, tmp_path, kind):
    with faulty_proxy(aws_env, FAILS, kind) as (url, _), \
            pytest.raises(DataError, match=rf"s3://{bucket}/images/\w+/\w+\.\w+: cannot read") as raised:
        prepare.prepare(params(bucket, url, attempts=FAILS), tmp_path / "prepared")
    assert f"{FAILS} attempts" in str(raised.value)
    assert not (tmp_path / "prepared").exists() and not leftovers(tmp_path)
