"""What colour a VAE's latents hold: how much of each opponent-colour axis a linear read-out of the latents
recovers, and how far the round trip moves each channel.

    PYTHONPATH=. python scripts/probe_vae_colour.py --data /work/data/emoji --model ldm/assets/default
    PYTHONPATH=. python scripts/probe_vae_colour.py --data DIR --model A B --show turtle frog --out rt.png

For each model: the single-emoji images of the dataset (``kind=single``; all images when the dataset has no
kinds) are encoded, and each latent cell is compared with the mean colour of the pixels it covers. Luminance
(R+G+B)/3 and the two chroma axes of colour-opponent models, blue-yellow B - (R+G)/2 and green-magenta
G - (R+B)/2, are fitted by least squares from the cell's latent channels; R² near 1 says the latents carry
that axis, near 0 that no decoder can give it back. The round trip (encode, decode) is reported as the mean
absolute error per RGB channel, over all pixels and over the green ones (G above both R and B by 0.2 in
[-1, 1]). ``--show`` draws the named concepts' images beside their round trips, one row per model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ldm.checkpoints import load  # noqa: E402
from ldm.train import data as D  # noqa: E402
from ldm.train.build import load_vae  # noqa: E402
from ldm.train.config import load_config  # noqa: E402

AXES = {"luminance": (1 / 3, 1 / 3, 1 / 3), "blue-yellow": (-0.5, -0.5, 1.0), "green-magenta": (-0.5, 1.0, -0.5)}


def images(data: Path, resolution: int, limit: int) -> tuple[list[str], torch.Tensor]:
    """(names, pixels in [-1, 1]) of the dataset's single images, as the trainer sees them without augmenting."""
    cfg = load_config(None, ["stage=vae", f"data.path={data}", f"data.resolution={resolution}"]).data
    records = D.build(cfg, size_multiple=1).records
    singles = [r for r in records if r.meta.get("kind", "single") == "single"][:limit]
    transform = D.Transform(crop=cfg.crop, flip=False, augment=False)
    names = [str(r.meta.get("concept") or r.path.stem) for r in singles]
    return names, torch.stack([transform(r.path, (resolution, resolution), torch.Generator()) for r in singles])


def axis_r2(latents: torch.Tensor, pixels: torch.Tensor) -> dict[str, float]:
    """R² of each colour axis of the pixels under a latent cell, fitted linearly from that cell's channels."""
    cells = F.avg_pool2d(pixels, pixels.shape[-1] // latents.shape[-1])
    a = torch.cat([latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]), torch.ones(cells[:, 0].numel(), 1)], 1)
    out = {}
    for name, weights in AXES.items():
        target = torch.einsum("c,bchw->bhw", torch.tensor(weights), cells).reshape(-1, 1).double()
        fit = a.double() @ torch.linalg.lstsq(a.double(), target).solution
        out[name] = 1.0 - float((fit - target).pow(2).mean() / target.var())
    return out


def vae_of(model: str):
    """The VAE of a model (file or folder), or of a stage=vae run's ``model/`` folder (``vae/`` only)."""
    path = Path(model)
    if path.is_dir() and not (path / "model_index.json").is_file():
        return load_vae(path)
    return load(path).vae


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="the dataset folder (metadata.jsonl + images)")
    p.add_argument("--model", nargs="+", required=True,
                   help="model folders or files, or a stage=vae run's model/ folder (their VAE is probed)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--limit", type=int, default=2000, help="at most this many images")
    p.add_argument("--show", nargs="*", default=[], help="concepts to draw beside their round trips")
    p.add_argument("--out", type=Path, default=Path("vae_colour.png"), help="the --show picture")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    names, pixels = images(a.data, a.resolution, a.limit)
    green = (pixels[:, 1] > pixels[:, 0] + 0.2) & (pixels[:, 1] > pixels[:, 2] + 0.2)
    print(f"{len(names)} images from {a.data}; {int(green.sum())} green pixels")
    print("| model | R² luminance | R² blue-yellow | R² green-magenta | round trip |err| R, G, B /255 | on green pixels |")
    print("|---|---|---|---|---|---|")
    rows = []
    for model in a.model:
        vae = vae_of(model).eval()
        with torch.no_grad():
            z = torch.cat([vae.encode(x).mode() for x in pixels.split(64)])
            rec = torch.cat([vae.decode(zz, dtype=torch.float32) for zz in z.split(64)]).clamp(-1, 1)
        err = (rec - pixels).abs() * 127.5
        r2 = axis_r2(z.float(), pixels)
        every, on_green = err.mean((0, 2, 3)), err.permute(1, 0, 2, 3)[:, green].mean(1)
        print(f"| {model} | {r2['luminance']:.2f} | {r2['blue-yellow']:.2f} | {r2['green-magenta']:.2f} | "
              f"{', '.join(f'{v:.1f}' for v in every)} | {', '.join(f'{v:.1f}' for v in on_green)} |", flush=True)
        rows.append(rec)
    if a.show:
        from ldm.pipeline.images import to_pil, to_unit
        from ldm.train.stages import grid

        picked = [i for want in a.show for i, n in enumerate(names) if n == want]
        if not picked:
            raise SystemExit(f"--show: none of {a.show} is a concept of {a.data}")
        tiles = [pixels[picked]] + [rec[picked] for rec in rows]
        grid(to_pil(to_unit(torch.cat(tiles))), len(picked)).save(a.out)
        print(f"wrote {a.out}: the images, then each model's round trip, one row each")


if __name__ == "__main__":
    from ldm.checkpoints import CheckpointError
    from ldm.train.config import ConfigError

    try:
        main()
    except (CheckpointError, ConfigError, D.DataError) as exc:     # a bad --data or --model: one line, no trace
        raise SystemExit(f"probe_vae_colour.py: {exc}") from None
