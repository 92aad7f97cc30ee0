"""prepare -> validate -> shard on tiny real data, and each kind of bad input failing with a clear error."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from PIL import Image

from components.common.errors import DataError
from components.data import prepare, shard, validate
from components.data.prepare import MANIFEST_COLUMNS, PrepareParams

from .helpers import leftovers, make_image_folder


def test_mnist_prepare_is_stratified_and_deterministic(tiny_data, tmp_path):
    manifest = pd.read_csv(tiny_data / "prepared" / "manifest.csv", dtype={"id": str})
    assert list(manifest.columns) == MANIFEST_COLUMNS and len(manifest) == 200
    assert set(manifest["label"]) == set(range(10)), "shuffled before limiting: every digit present"
    per_class = manifest.groupby("label")["split"].apply(set)
    assert all(splits == {"train", "val"} for splits in per_class)
    assert (manifest[["height", "width", "channels"]] == [28, 28, 1]).all().all()
    again = prepare.prepare(PrepareParams(limit=200), tmp_path / "again")
    assert (again / "manifest.csv").read_bytes() == (tiny_data / "prepared" / "manifest.csv").read_bytes()


def test_validate_writes_result_docs_and_gate(tiny_data):
    out = tiny_data / "validated"
    result = json.loads((out / "result.json").read_text())
    assert result["success"] and {v["table"] for v in result["validations"]} == {"manifest", "class_counts", "leakage"}
    assert (out / "docs" / "index.html").is_file()
    assert (out / "manifest.csv").read_bytes() == (tiny_data / "prepared" / "manifest.csv").read_bytes()


def test_shard_index_follows_contract(tiny_data):
    index = json.loads((tiny_data / "shards" / "index.json").read_text())
    assert index["image"] == {"height": 28, "width": 28, "channels": 1}
    assert index["num_classes"] == 10 and index["classes"] == [str(d) for d in range(10)]
    for split in ("train", "val"):
        entry = index["splits"][split]
        assert [s["name"] for s in entry["shards"]][0] == f"{split}/{split}-000000.tar"
        assert sum(s["count"] for s in entry["shards"]) == entry["count"]
        assert all((tiny_data / "shards" / s["name"]).is_file() for s in entry["shards"])
    assert index["splits"]["train"]["count"] + index["splits"]["val"]["count"] == 200


def test_shards_are_byte_reproducible(tiny_data, tmp_path):
    again = shard.shard(shard.ShardParams(shard_size=40), tiny_data / "prepared", tiny_data / "validated", tmp_path / "s")
    assert (again / "index.json").read_text() == (tiny_data / "shards" / "index.json").read_text()


def test_imagefolder_resizes_and_converts(image_folder, tmp_path):
    params = PrepareParams(source="imagefolder", root=str(image_folder), resolution=16, channels=3, val_fraction=0.25)
    out = prepare.prepare(params, tmp_path / "prepared")
    manifest = pd.read_csv(out / "manifest.csv", dtype={"id": str})
    assert len(manifest) == 36 and set(manifest["class_name"]) == {"cat", "dog", "owl"}
    assert (manifest.groupby("class_name")["split"].apply(lambda s: (s == "val").sum()) == 3).all()
    with Image.open(out / manifest["path"][0]) as image:
        assert image.size == (16, 16) and image.mode == "RGB"
    assert json.loads((out / "dataset.json").read_text())["classes"] == ["cat", "dog", "owl"]
    validate.validate(validate.ValidateParams(min_train_per_class=5), out, tmp_path / "validated")


def test_camera_rotation_tag_is_applied(tmp_path):
    stored = Image.new("L", (40, 20), 0)
    stored.paste(255, (0, 0, 20, 20))  # left half white as stored; the tag says "rotate 90 degrees clockwise"
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    raw = prepare.RawImage(str(tmp_path / "photo.jpg"), "x", (tmp_path / "photo.jpg").read_bytes)
    array = prepare.to_array(raw, resolution=20, channels=1)
    assert array[0, 0, 0] > 200 and array[-1, 0, 0] < 50, "displayed upright: white on top"


# ---------------------------------------------------------------- bad input


def run_prepare_expecting(params: PrepareParams, out, match: str) -> DataError:
    with pytest.raises(DataError, match=match) as err:
        prepare.prepare(params, out)
    assert not out.exists() and not leftovers(out.parent)
    return err.value


def test_corrupt_image_names_file(image_folder, tmp_path):
    bad = image_folder / "dog" / "005.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    run_prepare_expecting(
        PrepareParams(source="imagefolder", root=str(image_folder)), tmp_path / "out", f"{bad}: cannot decode image"
    )


def test_empty_class_folder_names_folder(image_folder, tmp_path):
    (image_folder / "emu").mkdir()
    run_prepare_expecting(
        PrepareParams(source="imagefolder", root=str(image_folder), classes=["cat", "dog", "emu", "owl"]),
        tmp_path / "out",
        f"{image_folder}/emu: empty class folder",
    )


def test_label_outside_configured_classes_names_file(image_folder, tmp_path):
    run_prepare_expecting(
        PrepareParams(source="imagefolder", root=str(image_folder), classes=["cat", "dog"]),
        tmp_path / "out",
        rf"{image_folder}/owl: label 'owl' \(e\.g\. {image_folder}/owl/000\.png\) is not one of the configured classes",
    )


def test_validate_catches_wrong_size_and_channels(tiny_data, tmp_path):
    prepared = shutil.copytree(tiny_data / "prepared", tmp_path / "prepared")
    manifest = pd.read_csv(prepared / "manifest.csv", dtype={"id": str})
    manifest.loc[7, "height"] = 32
    manifest.loc[9, "channels"] = 3
    manifest.to_csv(prepared / "manifest.csv", index=False)
    out = tmp_path / "validated"
    with pytest.raises(DataError) as err:
        validate.validate(validate.ValidateParams(min_train_per_class=5), prepared, out)
    message = str(err.value)
    assert f"(column=height) [expected value_set=[28]]: 1 row(s) failed, e.g. id={manifest.loc[7, 'id']}" in message
    assert f"(column=channels) [expected value_set=[1]]: 1 row(s) failed, e.g. id={manifest.loc[9, 'id']}" in message
    assert (out / "docs" / "index.html").is_file() and not json.loads((out / "result.json").read_text())["success"]
    assert not (out / "manifest.csv").exists(), "the gate file exists only for passing data"


def test_validate_catches_missing_column(tiny_data, tmp_path):
    prepared = shutil.copytree(tiny_data / "prepared", tmp_path / "prepared")
    pd.read_csv(prepared / "manifest.csv").drop(columns=["pixel_std"]).to_csv(prepared / "manifest.csv", index=False)
    with pytest.raises(DataError, match=r"expect_table_columns_to_match_ordered_list\(\): observed") as err:
        validate.validate(validate.ValidateParams(min_train_per_class=5), prepared, tmp_path / "validated")
    assert "expect_column_values_to_be_of_type(column=pixel_std): could not run" in str(err.value)


def test_duplicate_images_across_splits_fail_validation(tmp_path):
    raw = make_image_folder(tmp_path / "raw", per_class=10)
    for i in range(4):  # the same picture 5 times in one class: some land in train, some in val
        shutil.copy(raw / "cat" / "000.png", raw / "cat" / f"copy{i}.png")
    prepared = prepare.prepare(
        PrepareParams(source="imagefolder", root=str(raw), resolution=16, val_fraction=0.5), tmp_path / "prepared"
    )
    with pytest.raises(DataError) as err:
        validate.validate(validate.ValidateParams(min_train_per_class=2), prepared, tmp_path / "validated")
    message = str(err.value)
    assert "manifest: expect_column_values_to_be_unique(column=sha256): 5 row(s) failed" in message
    assert "leakage: expect_column_values_to_be_in_set(column=n_splits) [expected value_set=[1]]: 1 row(s)" in message


def test_too_few_images_per_class_fail_validation(tiny_data, tmp_path):
    with pytest.raises(DataError, match=r"class_counts: .*column=train_count.*class_name="):
        validate.validate(validate.ValidateParams(min_train_per_class=1000), tiny_data / "prepared", tmp_path / "v")


def test_shard_refuses_image_changed_after_validation(tiny_data, tmp_path):
    prepared = shutil.copytree(tiny_data / "prepared", tmp_path / "prepared")
    victim = prepared / "images" / "000003.png"
    Image.new("L", (28, 28), 128).save(victim)
    with pytest.raises(DataError, match=f"{victim}: differs from the validated manifest"):
        shard.shard(shard.ShardParams(), prepared, tiny_data / "validated", tmp_path / "shards")
    assert not (tmp_path / "shards").exists() and not leftovers(tmp_path)
