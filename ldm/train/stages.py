"""The things ldm trains, each as a *stage*: what is trained, its loss, its validation and its output.

* ``VAEStage``: AutoencoderKL from scratch on pixels. Loss = L1 + L2 reconstruction of a sample
  z ~ q(z | x) plus a small KL(q(z | x) || N(0, I)) (Rombach et al. 2022, §3; no perceptual or adversarial
  term, so nothing is downloaded). The latent scale is measured at the end (``build.latent_scale``). With
  ``train_vae_encoder=false`` only the decoder of init's VAE trains, on the frozen encoder's latents, as
  Stability's ft-EMA/ft-MSE decoders were made for SD 1.x: the latents and their scale stay those the
  model's U-Net learned, so the fine-tuned decoder drops in.
* ``UNetStage``: the denoising U-Net (and the text encoder, or LoRA adapters on either) on VAE latents, the
  VAE frozen. Loss = ldm.losses.diffusion_loss on an ε or v target at a uniformly drawn timestep. An SDXL U-Net
  also takes what the pipeline gives it (``ldm.pipeline.conditioning``): both encoders' context, bigG's pooled
  embedding and the micro-conditioning time ids, here original size = target size = the batch's image size and
  crop (0, 0) (the refiner: its aesthetic score), as diffusers' SDXL training scripts do for uncropped images.
* ``ControlNetStage`` (``ldm.train.control_stage``): a ControlNet beside the frozen U-Net, the same loss.

All per-sample randomness (z ~ q(z|x), t, noise, offset noise) comes from the sample's own seed in the
batch (``ldm.data``), so the result does not depend on how a global batch is split across processes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ldm import losses
from ldm.checkpoints import Components
from ldm.checkpoints.adapters.kohya import save_kohya
from ldm.checkpoints.adapters.lora import TEXT_TARGETS, UNET_TARGETS, adapters, add_lora, lora_state_dict, save_lora
from ldm.pipeline import Pipeline
from ldm.pipeline.conditioning import TextConditioner
from ldm.pipeline.images import to_pil, to_unit
from ldm.rng import randn
from ldm.schedules import NoiseSchedule
from ldm.train.build import latent_scale, write_model, write_vae
from ldm.train.config import TrainConfig
from ldm.train.data import generator
from ldm.train.ema import EMA


def grid(images: list, columns: int):
    """PIL images (all the same size) in a grid, row by row."""
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    return sheet

CONTEXT_CACHE = 20_000   # captions whose frozen-text-encoder context is kept in memory


def chroma_distance(err: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB error -> (B, H, W) length of its colour part: the error less its grey (R = G = B) part.
    A small VAE trained on L1 + L2 alone learns the weakest colour axis last or never (docs/training.md,
    "The VAE"); charging this term again gives colour errors more weight than grey ones."""
    chroma = err - err.mean(dim=1, keepdim=True)
    return (chroma.pow(2).sum(dim=1) + 1e-12).sqrt()     # the epsilon keeps the gradient finite at 0


class Reconstruction(nn.Module):
    """x, n -> (decode(mean + std·n), KL per image): the VAE's training forward, one module for DDP. With
    ``train_encoder=False`` the encoder runs frozen (no graph kept; its KL is then a constant)."""

    def __init__(self, vae: nn.Module, train_encoder: bool = True):
        super().__init__()
        self.vae, self.train_encoder = vae, train_encoder
        self._reconstruct = self.reconstruct

    def reconstruct(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with contextlib.nullcontext() if self.train_encoder else torch.no_grad():
            posterior = self.vae.encode(x)
        z = posterior.mean + posterior.std * noise
        return self.vae.decode(z, dtype=torch.float32), posterior.kl()

    def compile_training(self) -> None:
        """Run the training forward through torch.compile (the VAE module itself stays plain)."""
        self._reconstruct = torch.compile(self.reconstruct)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._reconstruct(x, noise)


class VAEStage:
    name = "vae"

    def __init__(self, cfg: TrainConfig, vae: nn.Module, components: Components | None = None):
        """``components``: the init model the VAE comes from (written back around it by ``finish``)."""
        self.cfg, self.vae, self.components = cfg, vae.train(), components
        if not cfg.train_vae_encoder:
            # Frozen by its parameters alone: the trainer's module.train() calls would undo an eval() here, and the
            # VAE has no layer (dropout, batch norm) whose train and eval modes differ.
            for part in (vae.encoder, vae.quant_conv):
                if part is not None:
                    part.requires_grad_(False)
        self.module = Reconstruction(vae, cfg.train_vae_encoder)
        self.lora = False

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.vae.parameters() if p.requires_grad], "lr": self.cfg.lr}]

    def loss(self, model: nn.Module, batch: dict, device) -> torch.Tensor:
        x = batch["pixels"].to(device)
        c, down = self.vae.config.latent_channels, self.vae.config.downscale
        noise = randn((x.shape[0], c, x.shape[2] // down, x.shape[3] // down), [generator(s) for s in batch["seed"]],
                      device=device)
        rec, kl = model(x, noise)
        err = rec.float() - x.float()
        w = self.cfg.vae_loss
        # Means over pixels; the KL sum per image is divided by the same pixel count, so kl_weight keeps the
        # meaning it has in the LDM code, where both terms are sums.
        rec_loss = w.l1_weight * err.abs().mean() + w.l2_weight * err.pow(2).mean()
        if w.chroma_weight:
            d = chroma_distance(err)
            rec_loss = rec_loss + w.chroma_weight * (w.l1_weight * d.mean() + w.l2_weight * d.pow(2).mean())
        return rec_loss + w.kl_weight * kl.mean() / x[0].numel()

    @torch.no_grad()
    def validate(self, module: Reconstruction, dataset, path: Path) -> None:
        n = min(8, len(dataset))
        x = torch.stack([dataset[(i, 0)]["pixels"] for i in range(n)])
        vae = module.vae
        rec = vae.decode(vae.encode(x.to(next(vae.parameters()).device)).mode(), dtype=torch.float32).cpu()
        path.parent.mkdir(parents=True, exist_ok=True)
        grid(to_pil(to_unit(torch.cat([x, rec]))), n).save(path)

    def trainable_state(self, module: Reconstruction) -> dict[str, torch.Tensor]:
        return dict(module.vae.state_dict())

    def load_trainable_state(self, module: Reconstruction, state: dict[str, torch.Tensor]) -> None:
        module.vae.load_state_dict(state, strict=True)

    def finish(self, module: Reconstruction, dataset, out: Path) -> Path:
        """Write ``out/model/vae`` (the latent scale measured on up to 256 training images, unless the encoder
        was frozen: then the latents are the ones the scale was measured on) and, when the VAE came from an init
        model, that model around it in ``out/model``."""
        vae = module.vae.eval()
        if self.cfg.train_vae_encoder:
            n = min(256, len(dataset))
            x = torch.stack([dataset[(i, 0)]["pixels"] for i in range(n)])
            vae.config.scaling_factor = latent_scale(vae, x.to(next(vae.parameters()).device))
        if self.components is None:
            return write_vae(vae, out / "model")
        self.components.vae = vae
        return write_model(self.components, self.cfg, out / "model")


class DiffusionModel(nn.Module):
    """U-Net + text encoder(s) as one module, so DDP and EMA see every trained parameter at once."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, train_text: bool,
                 text_encoder_2: nn.Module | None = None, conditioner: TextConditioner | None = None):
        super().__init__()
        self.unet, self.text_encoder, self.train_text = unet, text_encoder, train_text
        self.text_encoder_2, self.conditioner = text_encoder_2, conditioner
        self._unet_forward = unet.forward

    def compile_training(self) -> None:
        """Run the U-Net's training forward through torch.compile. Only this module's forward uses the
        compiled graph: validation and export call the U-Net itself, with its own names and no recompiles."""
        self._unet_forward = torch.compile(self.unet.forward)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor | None = None,
                context: torch.Tensor | None = None, captions: list[str] | None = None, **added) -> torch.Tensor:
        """Predict from token ids, from captions (through the conditioner: SDXL's two encoders and pooled
        embedding), or from a ready context (a frozen text encoder's, cached). ``added``: the U-Net's other
        conditions (SDXL: text_embeds, time_ids)."""
        if context is None:
            with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
                if captions is not None:
                    added = {**self.conditioner.encode(captions), **added}
                    context = added.pop("context")
                else:
                    context = self.text_encoder.encode(ids)
        return self._unet_forward(x_t, t, context, **added)


class LatentDiffusion:
    """What the stages that train on the frozen VAE's latents share (UNetStage, and ControlNetStage in
    ``ldm.train.control_stage``): the latents, the noise schedule, frozen text conditions, the noised input and
    the loss on a prediction."""

    def __init__(self, cfg: TrainConfig, components: Components):
        self.cfg, self.components = cfg, components
        self.schedule = NoiseSchedule(components.schedule)
        self.alphas_cumprod = self.schedule.alphas_cumprod.float()
        self.vae = components.vae.eval().requires_grad_(False)
        self.conditioner = TextConditioner.for_components(components)
        self.contexts: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def frozen_conditions(self, captions: list[str], device) -> dict[str, torch.Tensor]:
        """The conditions of frozen text encoders ({"context"}, SDXL also {"text_embeds"}), kept in memory per
        caption (up to CONTEXT_CACHE entries). Each caption is encoded on its own, so its conditions never
        depend on which captions shared its batch."""
        rows = []
        for caption in captions:
            row = self.contexts.get(caption)
            if row is None:
                row = {k: v[0].to(device) for k, v in self.conditioner.encode_one(caption).items()}
                if len(self.contexts) < CONTEXT_CACHE:
                    self.contexts[caption] = row
            rows.append(row)
        return {k: torch.stack([row[k] for row in rows]) for k in rows[0]}

    @torch.no_grad()
    def latents(self, batch: dict, gens: list[torch.Generator], device) -> torch.Tensor:
        """z ~ q(z | x), then shifted and scaled to the U-Net's unit-variance latent space."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(device), (0.5 * batch["latent_logvar"].to(device)).exp()
        else:
            with torch.autocast(device.type, enabled=False):
                posterior = self.vae.encode(batch["pixels"].to(device, torch.float32))
            mean, std = posterior.mean, posterior.std
        z = mean + std * randn(mean.shape, gens, device=device)
        vcfg = self.vae.config
        return (z - (vcfg.shift_factor or 0.0)) * vcfg.scaling_factor

    def noised(self, batch: dict, device):
        """(z, t, noise, x_t, added): the batch's latents, a uniform timestep and noise per sample (from its own
        seed), the noised latents q(x_t | z), and the U-Net's other conditions (SDXL: text_embeds, time_ids)."""
        gens = [generator(s) for s in batch["seed"]]
        z = self.latents(batch, gens, device)
        T = self.schedule.num_timesteps
        t = torch.stack([torch.randint(T, (), generator=g) for g in gens]).to(device)
        noise = losses.offset_noise(z.shape, self.cfg.offset_noise, generator=gens, device=device)
        x_t = self.schedule.q_sample(z, t, noise)
        down = self.vae.config.downscale
        added = {k: v.to(device) for k, v in self.conditioner.added(
            z.shape[0], z.shape[2] * down, z.shape[3] * down, None, negative=False).items()}
        return z, t, noise, x_t, added

    def prediction_loss(self, pred: torch.Tensor, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """The diffusion loss of the network's prediction, on the model's own target (ε or v), so a fine-tune or a
        ControlNet keeps it."""
        ab = self.alphas_cumprod.to(t.device)[t]
        prediction = self.schedule.config.prediction_type
        return losses.diffusion_loss(pred.float(), z.float(), noise.float(), ab, prediction, self.cfg.snr_gamma)

    @contextlib.contextmanager
    def pipeline(self, unet: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module | None, live: nn.Module):
        """A Pipeline over the live networks (no copies); the requires_grad flags of ``live``'s parameters come
        back afterwards."""
        flags = [(p, p.requires_grad) for p in live.parameters()]
        c = self.components
        comps = Components(unet, self.vae, text_encoder, c.schedule, c.info, vars(self.cfg.defaults),
                           text_encoder_2=text_encoder_2, pipeline_config=c.pipeline_config)
        try:
            yield Pipeline(comps, device=next(live.parameters()).device)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)


class UNetStage(LatentDiffusion):
    name = "unet"

    def __init__(self, cfg: TrainConfig, components: Components):
        super().__init__(cfg, components)
        unet, text = components.unet, components.text_encoder
        self.lora = cfg.lora.rank > 0
        train_text = cfg.train_text_encoder or (self.lora and cfg.lora.text_encoder)
        self.module = DiffusionModel(unet, text, train_text, components.text_encoder_2, self.conditioner)
        unet.train()
        encoders = components.text_encoders
        for encoder in encoders:
            encoder.train(train_text)
        if self.lora:
            unet.requires_grad_(False)
            for encoder in encoders:
                encoder.requires_grad_(False)
            self.unet_params = add_lora(unet, cfg.lora.rank, cfg.lora.alpha, UNET_TARGETS)
            self.text_params = [p for name, model in self._adapted(self.module).items() if name != "unet"
                                for p in add_lora(model, cfg.lora.rank, cfg.lora.alpha, TEXT_TARGETS)] \
                if cfg.lora.text_encoder else []
        else:
            self.unet_params, self.text_params = list(unet.parameters()), []
            for encoder in encoders:
                encoder.requires_grad_(cfg.train_text_encoder)
                self.text_params += list(encoder.parameters()) if cfg.train_text_encoder else []

    def param_groups(self) -> list[dict]:
        groups = [{"params": self.unet_params, "lr": self.cfg.lr}]
        if self.text_params:
            groups.append({"params": self.text_params, "lr": self.cfg.text_encoder_lr or self.cfg.lr})
        return groups

    def loss(self, model: nn.Module, batch: dict, device) -> torch.Tensor:
        z, t, noise, x_t, added = self.noised(batch, device)
        if self.module.train_text and self.conditioner.pooled:
            pred = model(x_t, t, captions=list(batch["caption"]), **added)
        elif self.module.train_text:
            pred = model(x_t, t, ids=self.components.text_encoder.tokenize(batch["caption"]).to(device), **added)
        else:
            pred = model(x_t, t, **self.frozen_conditions(batch["caption"], device), **added)
        return self.prediction_loss(pred, z, noise, t)

    def _pipeline(self, module: DiffusionModel):
        return self.pipeline(module.unet, module.text_encoder, module.text_encoder_2, module)

    @torch.no_grad()
    def validate(self, module: DiffusionModel, dataset, path: Path) -> None:
        prompts = self.cfg.validation.prompts or sorted({r.captions[0] for r in dataset.records})[:8]
        d = self.cfg.defaults
        with self._pipeline(module) as pipe:
            images = pipe(prompts, steps=d.steps, guidance=d.guidance, sampler=d.sampler, height=d.height,
                          width=d.width, seed=self.cfg.validation.seed, progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        grid(images, min(8, len(images))).save(path)

    def trainable_state(self, module: DiffusionModel) -> dict[str, torch.Tensor]:
        if self.lora:
            return lora_state_dict(self._adapted(module))
        state = {f"unet.{k}": v for k, v in module.unet.state_dict().items()}
        if module.train_text:
            for name, encoder in self._encoders(module):
                state.update({f"{name}.{k}": v for k, v in encoder.weights().items()})
        return state

    @staticmethod
    def _encoders(module: DiffusionModel):
        return [(name, e) for name, e in (("text_encoder", module.text_encoder),
                                          ("text_encoder_2", module.text_encoder_2)) if e is not None]

    def _adapted(self, module: DiffusionModel) -> dict[str, nn.Module]:
        """The networks LoRA adapts, by the name its files give them: the U-Net, and each text encoder's
        transformer when ``lora.text_encoder`` (SDXL: both, as ``text_encoder`` and ``text_encoder_2``)."""
        models = {"unet": module.unet}
        if self.cfg.lora.text_encoder:
            models.update({name: encoder.model for name, encoder in self._encoders(module)})
        return models

    def load_trainable_state(self, module: DiffusionModel, state: dict[str, torch.Tensor]) -> None:
        if self.lora:
            for prefix, m in self._adapted(module).items():
                for name, lora in adapters(m).items():
                    lora.lora_A.data.copy_(state[f"{prefix}.{name}.lora_A.weight"])
                    lora.lora_B.data.copy_(state[f"{prefix}.{name}.lora_B.weight"])
            return
        module.unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")}, strict=True)
        if module.train_text:
            for name, encoder in self._encoders(module):
                encoder.load_weights({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})

    def finish(self, module: DiffusionModel, dataset, out: Path) -> Path:
        if self.lora:
            write = save_kohya if self.cfg.lora.format == "kohya" else save_lora
            return write(out / "lora.safetensors", self._adapted(module))
        c = self.components
        comps = Components(module.unet, self.vae, module.text_encoder, c.schedule, c.info,
                           text_encoder_2=module.text_encoder_2, pipeline_config=c.pipeline_config)
        return write_model(comps, self.cfg, out / "model")


def make_ema(cfg: TrainConfig, module: nn.Module) -> EMA | None:
    return EMA(module, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
