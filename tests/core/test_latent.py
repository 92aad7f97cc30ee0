"""tim_core.latent: the scale/shift algebra around a real diffusers AutoencoderKL (small, random weights), the
weights' identity, and the model folder that carries its VAE and refuses another."""

from __future__ import annotations

import json

import pytest
import torch

import tim_core
from tim_core.latent import VAE_DIR, LatentSpace, weights_digest


def tiny_vae(seed: int = 0, **config):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, **config).eval()


@pytest.fixture
def images():
    return torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_latents_are_the_scaled_shifted_posterior_mode_and_decode_inverts_the_map(tmp_path, images):
    vae = tiny_vae(scaling_factor=0.25, shift_factor=0.5)
    vae.save_pretrained(str(tmp_path / "vae"))
    space = LatentSpace.from_source(str(tmp_path / "vae"))
    assert (space.scale, space.shift, space.factor, space.image_channels) == (0.25, 0.5, 2, 1)
    with torch.no_grad():
        mode = vae.encode(images).latent_dist.mode()
        expected_images = vae.decode(mode).sample.clamp(-1, 1)
    latents = space.encode(images)
    assert latents.shape == (3, 4, 8, 8) and latents.dtype == torch.float32
    torch.testing.assert_close(latents, (mode - 0.5) * 0.25, rtol=0, atol=1e-6)
    torch.testing.assert_close(space.decode(latents, batch_size=2), expected_images, rtol=0, atol=1e-5)
    # Explicit values win over the config's; a VAE without shift_factor shifts by 0.
    rescaled = LatentSpace.from_source(str(tmp_path / "vae"), scale=2.0, shift=0.0)
    torch.testing.assert_close(rescaled.encode(images), mode * 2, rtol=0, atol=1e-5)
    tiny_vae().save_pretrained(str(tmp_path / "plain"))
    assert LatentSpace.from_source(str(tmp_path / "plain")).shift == 0.0


def test_the_digest_names_the_weights_not_the_file(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(str(tmp_path / "a"))
    loaded = LatentSpace.from_source(str(tmp_path / "a"))
    assert loaded.digest == weights_digest(vae) == weights_digest(tiny_vae())
    with torch.no_grad():
        next(vae.parameters()).view(-1)[0] += 1e-6
    assert weights_digest(vae) != loaded.digest
    assert weights_digest(tiny_vae(seed=1)) != loaded.digest


def test_a_model_folder_carries_its_vae_and_refuses_another(tmp_path):
    vae_dir = tmp_path / "source"
    tiny_vae().save_pretrained(str(vae_dir))
    space = LatentSpace.from_source(str(vae_dir))
    model = tim_core.build_model(preset="tiny", num_classes=3, input_size=[8, 8], in_channels=4, patch_size=2)
    transport = tim_core.get_transport("ot_fm")
    folder = tim_core.save_pretrained(model, tmp_path / "model", transport, latent=space)
    spec = json.loads((folder / "config.json").read_text())["latent"]
    assert spec == {"channels": 4, "height": 8, "width": 8, "scale": space.scale, "shift": 0.0, "factor": 2,
                    "vae": {"name": str(vae_dir), "revision": None, "subfolder": None, "sha256": space.digest}}
    assert tim_core.load_latent_space(folder).digest == space.digest

    pixel = tim_core.save_pretrained(model, tmp_path / "pixel", transport)
    assert tim_core.load_latent_space(pixel) is None and not (pixel / VAE_DIR).exists()

    other = tiny_vae(seed=1)
    other.save_pretrained(str(folder / VAE_DIR))   # another VAE in the model's place
    with pytest.raises(ValueError, match=rf"its weights \(sha256 {weights_digest(other)[:12]}\.\.\.\) are not the "
                                         rf"VAE this was encoded with \({vae_dir}, sha256 {space.digest[:12]}"):
        tim_core.load_latent_space(folder)
    import shutil

    shutil.rmtree(folder / VAE_DIR)
    with pytest.raises(FileNotFoundError, match="trained on latents and decodes with the VAE saved beside it"):
        tim_core.load_latent_space(folder)


def test_a_missing_corrupt_or_unpinned_vae_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"VAE folder {tmp_path / 'none'}: no config.json"):
        LatentSpace.from_source(str(tmp_path / "none"))
    tiny_vae().save_pretrained(str(tmp_path / "vae"))
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"VAE {tmp_path / 'vae'}: cannot load it as a diffusers AutoencoderKL"):
        LatentSpace.from_source(str(tmp_path / "vae"))
    with pytest.raises(ValueError, match="'stabilityai/sd-vae-ft-ema' is a hub id: give its revision"):
        LatentSpace.from_source("stabilityai/sd-vae-ft-ema")
