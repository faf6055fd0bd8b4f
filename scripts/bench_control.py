"""Speed of one denoising step with a ControlNet: SD 1.5's U-Net + one SD 1.5 ControlNet (full size, random
weights shared by both libraries), classifier-free guidance (batch 2), ldm beside diffusers.

    PYTHONPATH=. python scripts/bench_control.py [--size 256] [--repeats 3] [--threads 2]

A step is the ControlNet's forward then the U-Net's with its residuals, as each library's pipeline runs them
(ldm: ``ldm.pipeline.control``'s wrapper over lean, channels-last modules, as a loaded Pipeline holds them;
diffusers: ControlNetModel + UNet2DConditionModel). The two run alternately, so a busy machine slows both alike;
prints the median seconds per step of each and the largest relative difference of the U-Net outputs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def build():
    from diffusers import ControlNetModel, UNet2DConditionModel

    from ldm.models.controlnet import ControlNet, ControlNetConfig
    from ldm.models.unet import UNet, UNetConfig
    from model_parity import share_weights

    config = dict(cross_attention_dim=768, sample_size=64)
    theirs_unet = UNet2DConditionModel(**config)
    theirs_net = ControlNetModel(cross_attention_dim=768)
    with torch.device("meta"):
        unet = UNet(UNetConfig.from_dict(dict(theirs_unet.config)))
        net = ControlNet(ControlNetConfig.from_dict(dict(theirs_net.config)))
    share_weights(unet, theirs_unet, seed=0, tie_big=True)
    share_weights(net, theirs_net, seed=1, tie_big=True)
    return (unet, net), (theirs_unet, theirs_net)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    from ldm.models.conv import pack_for_inference

    (unet, net), (theirs_unet, theirs_net) = build()
    for module in (unet, net):
        pack_for_inference(module)
    gen = torch.Generator().manual_seed(0)
    h = a.size // 8
    x, hint = torch.randn(2, 4, h, h, generator=gen), torch.rand(2, 3, a.size, a.size, generator=gen)
    context, t = torch.randn(2, 77, 768, generator=gen), torch.tensor([500, 500])

    def ours():
        down, mid = net(x, t, context, hint)
        return unet(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    def diffusers():
        down, mid = theirs_net(x, t, context, hint, return_dict=False)
        return theirs_unet(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                           return_dict=False)[0]

    times = {"ldm": [], "diffusers": []}
    with torch.no_grad():
        outs = {name: fn() for name, fn in (("ldm", ours), ("diffusers", diffusers))}   # warm-up (packing, oneDNN)
        for _ in range(a.repeats):
            for name, fn in (("ldm", ours), ("diffusers", diffusers)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    err = float((outs["ldm"] - outs["diffusers"]).abs().max() / outs["diffusers"].abs().max())
    ldm_s, their_s = (statistics.median(times[k]) for k in ("ldm", "diffusers"))
    print(f"SD 1.5 U-Net + ControlNet, {a.size}², batch 2, {a.threads} threads, fp32: ldm {ldm_s:.2f} s/step, "
          f"diffusers {their_s:.2f} s/step ({their_s / ldm_s:.2f}x); max rel diff {err:.1e}")


if __name__ == "__main__":
    main()
