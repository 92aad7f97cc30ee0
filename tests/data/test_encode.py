"""Stage `encode` on the tiny real shards with the stand-in VAE (`tim standin-vae`: a random-weight diffusers
AutoencoderKL saved to a folder, as a downloaded VAE would be): latent shards paired with their labels and equal to
the VAE's own output, byte-identical on rerun and over Ray workers, the images passed on without a VAE, the VAE's
identity checked wherever latents are read, and bad VAEs named with nothing written."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import tim_core
from components.common.errors import DataError, ModelError, ShardError
from components.data.encode import EncodeParams, encode, standin_vae
from components.data.reader import ShardDataset, decode_sample, read_index, verify_shards
from components.train.stage import _model_kwargs, check_shards, init_weights
from tests.data.helpers import leftovers
from tests.train.conftest import tiny_params


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return standin_vae(tmp_path_factory.mktemp("vae") / "standin")


@pytest.fixture(scope="module")
def encoded(shards, vae_dir, tmp_path_factory):
    return encode(EncodeParams(vae=str(vae_dir)), shards, tmp_path_factory.mktemp("encoded") / "data")


def samples_of(folder, split):
    """(key, label, array) of every sample of a split, in shard order, read straight from the tars."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    out = []
    for shard in read_index(folder)["splits"][split]["shards"]:
        data = (folder / shard["name"]).read_bytes()
        for s in group_by_keys(tar_file_expander([{"url": shard["name"], "stream": io.BytesIO(data)}])):
            array = np.load(io.BytesIO(s["npy"])) if "npy" in s else decode_sample(s)[0].numpy()
            out.append((s["__key__"], int(s["cls"]), array))
    return out


def test_latent_shards_pair_each_image_with_its_label_and_the_vaes_latent(shards, vae_dir, encoded):
    space = tim_core.LatentSpace.from_source(str(vae_dir))
    index, source = read_index(encoded), read_index(shards)
    assert index["latent"] == {"channels": 4, "height": 14, "width": 14, "scale": 1.0, "shift": 0.0, "factor": 2,
                               "vae": {"name": str(vae_dir), "revision": None, "subfolder": None,
                                       "sha256": space.digest}}
    assert index["image"] == source["image"] and index["classes"] == source["classes"]
    assert index["encoding"]["space"] == "latent" and (encoded / "vae" / "config.json").is_file()
    verify_shards(encoded)
    for split in ("train", "val"):
        images, latents = samples_of(shards, split), samples_of(encoded, split)
        assert [(k, y) for k, y, _ in latents] == [(k, y) for k, y, _ in images]   # same keys, labels, order
        assert index["splits"][split]["count"] == len(latents)
        expected = space.encode(torch.from_numpy(np.stack([a for _, _, a in images])))
        np.testing.assert_allclose(np.stack([a for _, _, a in latents]), expected.numpy(), rtol=0, atol=1e-6)
    x, y = next(iter(ShardDataset(encoded, "train", shuffle_buffer=0)))   # what training reads
    first = samples_of(encoded, "train")[0]
    assert y == first[1] and torch.equal(x, torch.from_numpy(first[2])) and x.shape == (4, 14, 14)


def test_latents_are_byte_identical_on_rerun_and_over_ray_workers(shards, vae_dir, encoded, tmp_path):
    again = encode(EncodeParams(vae=str(vae_dir), batch_size=7), shards, tmp_path / "again")
    assert (again / "index.json").read_bytes() == (encoded / "index.json").read_bytes()   # lists every tar's sha256
    on_ray = encode(EncodeParams(vae=str(vae_dir), num_workers=2), shards, tmp_path / "ray")
    assert (on_ray / "index.json").read_bytes() == (encoded / "index.json").read_bytes()


def test_without_a_vae_the_images_pass_through(shards, tmp_path):
    out = encode(EncodeParams(), shards, tmp_path / "pixels")
    index, source = read_index(out), read_index(shards)
    assert index["encoding"]["space"] == "pixels" and "latent" not in index and not (out / "vae").exists()
    assert index["splits"] == source["splits"]                   # the same tars, by their sha256
    assert [(k, y) for k, y, _ in samples_of(out, "val")] == [(k, y) for k, y, _ in samples_of(shards, "val")]


@pytest.mark.parametrize("break_it, error, match", [
    (lambda d: shutil.rmtree(d), ModelError, "encode.vae: VAE folder {vae}: no config.json"),
    (lambda d: (d / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64), ModelError,
     "encode.vae: VAE {vae}: cannot load it as a diffusers AutoencoderKL"),
    (lambda d: standin_vae(d, channels=3), DataError,
     "encode.vae {vae} takes 3-channel images, the shards hold 1-channel ones"),
])
def test_a_missing_corrupt_or_unfit_vae_is_named_and_nothing_is_written(shards, tmp_path, break_it, error, match):
    vae = standin_vae(tmp_path / "vae")
    break_it(vae)
    with pytest.raises(error, match=match.format(vae=vae)):
        encode(EncodeParams(vae=str(vae)), shards, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_vae_options_need_a_vae_and_a_hub_id_needs_its_revision(shards, tmp_path):
    with pytest.raises(ValidationError, match="describe a VAE: set encode.vae as well"):
        EncodeParams(revision="abc")
    with pytest.raises(ModelError, match="'stabilityai/sd-vae-ft-ema' is a hub id: give its revision"):
        encode(EncodeParams(vae="stabilityai/sd-vae-ft-ema"), shards, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_training_refuses_latents_without_their_vae_or_a_warm_start_from_another(encoded, vae_dir, tmp_path):
    params = tiny_params()
    index = check_shards(params, encoded)                    # the VAE beside the latents is theirs
    kwargs = _model_kwargs(params, index)
    assert (kwargs["in_channels"], kwargs["input_size"]) == (4, [14, 14])

    swapped = tmp_path / "swapped"
    shutil.copytree(encoded, swapped)
    shutil.rmtree(swapped / "vae")
    standin_vae(swapped / "vae", seed=1)
    with pytest.raises(ShardError, match=f"{swapped}: latent shards without their VAE: VAE {swapped / 'vae'}: its "
                                         "weights .* are not the VAE this was encoded with"):
        check_shards(params, swapped)

    # A model trained on another VAE's latents of the same shape: the same network, another space.
    other = tim_core.LatentSpace.from_source(str(standin_vae(tmp_path / "other-vae", seed=2)))
    model = tim_core.build_model(**kwargs)
    tim_core.save_pretrained(model, tmp_path / "warm", tim_core.get_transport("ot_fm"), latent=other)
    warm = tiny_params(init_from=str(tmp_path / "warm"))
    with pytest.raises(ModelError, match=rf"trained on latents of VAE .*other-vae \(sha256 {other.digest[:12]}"
                                         rf"\.\.\.\), "
                                         rf"this training runs on latents of VAE {vae_dir}"):
        init_weights(warm, kwargs, tracking=None, latent=index["latent"])
    assert init_weights(warm, kwargs, tracking=None, latent=json.loads(
        (tmp_path / "warm" / "config.json").read_text())["latent"]) is not None
