"""``stage=controlnet``: a ControlNet trained beside a frozen model, as diffusers' examples/controlnet/
train_controlnet.py trains one (Zhang, Rao & Agrawala 2023).

The ControlNet starts as ``ControlNet.from_unet`` (the U-Net's encoder and middle block copied; the zero convs and
the hint embedding's last conv at zero, so that at step 0 the model draws exactly what it drew without it) or, to
continue, from ``controlnet.init``. The U-Net, the VAE and the text encoder(s) are frozen: the optimiser sees only
the ControlNet. A step: the image's latents noised at a uniform timestep; the ControlNet's residuals for
(x_t, t, caption, control image) added into the frozen U-Net's skips and middle block; the usual loss on the U-Net's
prediction (ε or v, the model's own; ``LatentDiffusion.prediction_loss``). Captions are dropped at the rate
``data.caption_dropout`` (Zhang et al. 2023, §3.3, drop half of them, so that the ControlNet learns to read the
control image without a prompt). The control images come from the data or are canny edges of the images
(``ldm.train.control_data``).

Output: ``OUTPUT/controlnet/``, a diffusers ControlNetModel folder (float32) that ``pipe.load_control`` reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ldm.checkpoints import Components
from ldm.checkpoints.control import load_control, save_controlnet
from ldm.models.controlnet import ControlNet
from ldm.pipeline.control import Control
from ldm.train.config import ConfigError, TrainConfig
from ldm.train.stages import LatentDiffusion, grid

VALIDATION_IMAGES = 8


class ControlledUNet(nn.Module):
    """The trained ControlNet and the frozen U-Net as one module (DDP and EMA see only the ControlNet's parameters:
    the U-Net's take no gradient). The U-Net stays in eval mode whatever ``train()`` is called with, as diffusers'
    script leaves it."""

    def __init__(self, controlnet: ControlNet, unet: nn.Module):
        super().__init__()
        self.controlnet, self.unet = controlnet, unet
        self._controlnet, self._unet = controlnet.forward, unet.forward

    def train(self, mode: bool = True):
        super().train(mode)
        self.unet.eval()
        return self

    def compile_training(self) -> None:
        """Run the training forward of both networks through torch.compile (the modules themselves stay plain)."""
        self._controlnet, self._unet = torch.compile(self.controlnet.forward), torch.compile(self.unet.forward)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, hint: torch.Tensor, context: torch.Tensor,
                **added) -> torch.Tensor:
        """The U-Net's prediction with the ControlNet's residuals; ``hint`` (B, C, H, W) in [0, 1] at pixel size,
        ``added``: the U-Net's other conditions (SDXL: text_embeds, time_ids), which the ControlNet takes too."""
        down, mid = self._controlnet(x_t, t, context, hint, **added)
        return self._unet(x_t, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                          **added)


def hint_tensor(hint: torch.Tensor, channels: int, device) -> torch.Tensor:
    """uint8 control images (B, C, H, W) -> float in [0, 1] with the ControlNet's channels (canny's grey: repeated)."""
    x = hint.to(device, torch.float32) / 255.0
    return x.expand(-1, channels, -1, -1) if x.shape[1] == 1 and channels != 1 else x


def hint_image(hint: torch.Tensor) -> Image.Image:
    """One uint8 control image (C, H, W) as an RGB PIL image."""
    array = hint.expand(3, -1, -1) if hint.shape[0] == 1 else hint
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy()).convert("RGB")


class ControlNetStage(LatentDiffusion):
    name = "controlnet"

    def __init__(self, cfg: TrainConfig, components: Components):
        super().__init__(cfg, components)
        self.lora = False
        for network in (components.unet, *components.text_encoders):
            network.eval().requires_grad_(False)
        controlnet = self._controlnet(cfg, components).train().requires_grad_(True)
        self.module = ControlledUNet(controlnet, components.unet)

    @staticmethod
    def _controlnet(cfg: TrainConfig, components: Components) -> ControlNet:
        unet, c = components.unet, cfg.controlnet
        if c.init is not None:
            if not Path(c.init).exists():
                raise ConfigError(f"controlnet.init={c.init}: no such file or folder")
            model = load_control(c.init, unet, dtype=unet.dtype)
            if not isinstance(model, ControlNet):
                raise ConfigError(f"controlnet.init={c.init}: a {type(model).__name__}, not a ControlNet")
            return model
        try:
            return ControlNet.from_unet(unet, conditioning_embedding_out_channels=tuple(c.hint_channels) or None,
                                        latent_factor=components.vae.config.downscale)
        except ValueError as e:
            raise ConfigError(f"controlnet.hint_channels: {e}") from None

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.module.controlnet.parameters()), "lr": self.cfg.lr}]

    def loss(self, model: nn.Module, batch: dict, device) -> torch.Tensor:
        z, t, noise, x_t, added = self.noised(batch, device)
        hint = hint_tensor(batch["hint"], self.module.controlnet.config.conditioning_channels, device)
        pred = model(x_t, t, hint, **self.frozen_conditions(batch["caption"], device), **added)
        return self.prediction_loss(pred, z, noise, t)

    @torch.no_grad()
    def validate(self, module: ControlledUNet, dataset, path: Path) -> None:
        """A grid of three rows: the control images of the first training images, what the model draws for their
        captions with the ControlNet, and without it (the same seeds)."""
        n = min(VALIDATION_IMAGES, len(dataset))
        hints = [hint_image(dataset[(i, 0)]["hint"]) for i in range(n)]
        prompts = [dataset.records[i].captions[0] for i in range(n)]
        d, seed = self.cfg.defaults, self.cfg.validation.seed
        options = dict(steps=d.steps, guidance=d.guidance, sampler=d.sampler, height=d.height, width=d.width,
                       progress=False)
        c = self.components
        with self.pipeline(module.unet, c.text_encoder, c.text_encoder_2, module) as pipe:
            controlled = [pipe(p, control=Control(module.controlnet, h, self.cfg.controlnet.validation_scale),
                               seed=seed + i, **options)[0] for i, (p, h) in enumerate(zip(prompts, hints))]
            plain = pipe(prompts, seed=seed, **options)   # image i: seed + i
        size = controlled[0].size
        path.parent.mkdir(parents=True, exist_ok=True)
        grid([h.resize(size) for h in hints] + controlled + plain, n).save(path)

    def trainable_state(self, module: ControlledUNet) -> dict[str, torch.Tensor]:
        return {f"controlnet.{k}": v for k, v in module.controlnet.state_dict().items()}

    def load_trainable_state(self, module: ControlledUNet, state: dict[str, torch.Tensor]) -> None:
        module.controlnet.load_state_dict({k.removeprefix("controlnet."): v for k, v in state.items()}, strict=True)

    def finish(self, module: ControlledUNet, dataset, out: Path) -> Path:
        return save_controlnet(module.controlnet, out / "controlnet")
