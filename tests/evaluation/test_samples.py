"""`tim samples`: one PNG with a panel per step count and a row per class, from an exported model."""

import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

import tim_core

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def test_grid_has_a_panel_per_nfe_and_a_row_per_class(tmp_path):
    torch.manual_seed(0)
    model = tim_core.build_model("tiny", num_classes=3, hidden_size=32, depth=1, num_heads=2, adaln_rank=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tim_core.save_pretrained(model, tmp_path / "model", tim_core.get_transport())
    out = tmp_path / "runs" / "samples"
    res = subprocess.run([sys.executable, "-m", "components.cli", "samples", "--model", str(tmp_path / "model"),
                          "--out", str(out), "--params", str(PARAMS), "--set", "samples.steps=[1, 2, 4]",
                          "--set", "samples.per_class=2", "--set", "samples.cfg_scale=2"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert str(out / "grid.png") in res.stdout
    image = Image.open(out / "grid.png")
    panel_w = 2 * (28 + 1) + 1                  # 2 tiles per class row, 1 px gaps
    assert image.size == (3 * panel_w + 2 * 6, 14 + 3 * (28 + 1) + 1)
    assert len(set(image.getdata())) > 2         # real pixels, not a blank canvas


def test_missing_model_is_a_clear_error_and_writes_nothing(tmp_path):
    res = subprocess.run([sys.executable, "-m", "components.cli", "samples", "--model", str(tmp_path / "none"),
                          "--out", str(tmp_path / "out"), "--params", str(PARAMS)], capture_output=True, text=True)
    assert res.returncode == 2
    assert "model.safetensors is missing" in res.stderr
    assert not (tmp_path / "out").exists()
