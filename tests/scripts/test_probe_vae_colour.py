"""scripts/probe_vae_colour.py: the colour read-out it reports, and a run on a tiny VAE."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from train_fixtures import make_shapes, make_vae

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import probe_vae_colour as probe  # noqa: E402


def test_r2_says_which_colour_axes_the_latents_carry():
    # Pixels whose three colour axes vary independently (the axes are not orthogonal in RGB: on uniformly random
    # RGB, blue-yellow alone would predict a quarter of green-magenta's variance).
    g = torch.Generator().manual_seed(0)
    axes_per_cell = torch.randn(6, 3, 4, 4, generator=g) * 0.3
    to_rgb = torch.linalg.inv(torch.tensor(list(probe.AXES.values())))
    cells = torch.einsum("rc,bchw->brhw", to_rgb, axes_per_cell)
    pixels = cells.repeat_interleave(4, 2).repeat_interleave(4, 3)
    axes = dict(zip(probe.AXES, axes_per_cell.unbind(1)))
    # latents that hold luminance and blue-yellow (mixed, scaled, plus a constant), and noise: no green-magenta
    latents = torch.stack([2 * axes["luminance"] - axes["blue-yellow"], 0.5 * axes["blue-yellow"] + 3,
                           torch.randn(6, 4, 4, generator=g)], 1)
    r2 = probe.axis_r2(latents, pixels)
    assert r2["luminance"] > 0.999 and r2["blue-yellow"] > 0.999
    assert r2["green-magenta"] < 0.2


def test_the_probe_runs_on_a_stage_vae_folder_and_draws_the_round_trips(tmp_path, capsys):
    data = make_shapes(tmp_path / "data")
    vae = make_vae(tmp_path / "vae", data)
    out = tmp_path / "rt.png"
    probe.main(["--data", str(data), "--model", str(vae), "--resolution", "16", "--show", "0", "1",
                "--out", str(out)])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {vae}")]
    assert len(table) == 1 and len(table[0].split("|")) == 8
    from PIL import Image
    assert Image.open(out).size == (2 * 16, 2 * 16)          # the images, then the round trips
