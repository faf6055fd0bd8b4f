"""U-Net training speed and peak memory: ldm's UNet vs diffusers' UNet2DConditionModel, same weights and batches.

    PYTHONPATH=. python scripts/bench_train.py --threads 1                 # default model, 32 x 4x16x16 latents
    PYTHONPATH=. python scripts/bench_train.py --model sd15 --latent 8 --batch 1 --steps 3

One training step = forward on noised latents, MSE to the noise, backward, gradient clipping to norm 1 and an
AdamW step (lr 1e-4, weight decay 0.01). ldm's side uses AdamW(fused=True) as ldm's trainer does
(ldm/train/); diffusers' side uses plain torch.optim.AdamW as examples/text_to_image/train_text_to_image.py
does. Batches (latents, noise, timesteps, text context) are drawn from one seed, identical for both.
Each library runs in its own subprocess; peak memory is that process's VmHWM (bench_common.peak_rss_mb; for ldm the whole model folder
is loaded, then the VAE and text encoder are dropped; with the default model they are ~9 M parameters).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


def batches(n: int, batch: int, latent: int, context_dim: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield (torch.randn(batch, 4, latent, latent, generator=g), torch.randn(batch, 4, latent, latent, generator=g),
               torch.randint(0, 1000, (batch,), generator=g), torch.randn(batch, 77, context_dim, generator=g))


def child(a) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    if a.lib == "ldm":
        from ldm.checkpoints import load

        components = load(a.folder)
        unet = components.unet
        del components
        gc.collect()
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

        def forward(x, t, ctx):
            return unet(x, t, ctx)
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(Path(a.folder) / "unet")
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.01)

        def forward(x, t, ctx):
            return unet(x, t, encoder_hidden_states=ctx).sample
    unet.train()
    ctx_dim = bc.configs(a.model)[0]["cross_attention_dim"]
    times = []
    for i, (x0, noise, t, ctx) in enumerate(batches(a.steps + 2, a.batch, a.latent, ctx_dim)):
        t0 = time.perf_counter()
        x_t = x0 + noise                       # the noising itself is the same cheap op in both loops
        loss = F.mse_loss(forward(x_t, t, ctx).float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:                             # two warm-up steps (optimizer state allocation, kernel choice)
            times.append(time.perf_counter() - t0)
    print(json.dumps({"steps_per_s": 1 / bc.median(times), "times": times, "peak_mb": bc.peak_rss_mb()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", choices=["default", "sd15"])
    p.add_argument("--latent", type=int, default=16, help="latent side (default model: 16)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lib", default="ldm", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    import torch

    print(f"# torch {torch.__version__}, threads {a.threads}, model {a.model}, batch {a.batch}x4x{a.latent}x"
          f"{a.latent}, {a.steps} timed steps (median)")
    print("| library | steps/s | ldm/diffusers | peak MB | load |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = bc.make_folder(a.model, Path(tmp) / a.model)
        base = None
        for lib in ("diffusers", "ldm"):
            r = bc.run_child(Path(__file__), ["--lib", lib, "--folder", str(folder), "--model", a.model,
                                              "--latent", str(a.latent), "--batch", str(a.batch),
                                              "--steps", str(a.steps), "--threads", str(a.threads)])
            base = r["steps_per_s"] if base is None else base
            print(f"| {lib} | {r['steps_per_s']:.2f} | {r['steps_per_s'] / base:.2f} | {r['peak_mb']:.0f} | "
                  f"{bc.load_average()} |", flush=True)


if __name__ == "__main__":
    main()
