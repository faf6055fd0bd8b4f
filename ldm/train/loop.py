"""``ldm train``: the Accelerate training loop for every stage (VAE; U-Net + text encoder or LoRA; ControlNet).

    ldm train --data DIR --output DIR [--config FILE] [--init MODEL] [--lora RANK] [--max-steps N]
              [--batch-size N] [--lr X] [--checkpoint-every N] [--resume] [--seed N] [--strict] [KEY=VALUE ...]

One process, one GPU, or many processes (``torchrun --nproc_per_node N -m ldm.train ...`` or
``accelerate launch --multi_gpu --num_processes N -m ldm.train ...``; on a CPU-only machine they talk over gloo).
A step consumes one global batch of ``batch_size × processes × grad_accum`` samples whose composition and
randomness depend only on (seed, step) (see ``ldm.data.DataOrder``): the same run on 1 or N processes computes
the same mean loss, and ``--resume`` needs only the step (plus the saved weights and optimiser state) to
continue exactly where a checkpoint left off.

Outputs in OUTPUT: ``model/`` (a folder ``Pipeline.from_pretrained`` loads; stage "vae": ``model/vae/``, and with
``init=MODEL`` the whole model beside it, its VAE replaced),
``lora.safetensors`` with ``--lora``, ``controlnet/`` with ``stage=controlnet`` (a diffusers ControlNetModel folder), ``checkpoints/step-N/``, ``log.csv``, ``samples/`` and ``config.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ldm.models.vae import AutoencoderKL
from ldm.train import checkpoint as ckpt, data as D
from ldm.train.build import build_components, vae_config
from ldm.train.config import ConfigError, TrainConfig, load_config, save_config, to_dict
from ldm.train.control_data import Hints
from ldm.train.control_stage import ControlNetStage
from ldm.train.latent_cache import LatentCache
from ldm.train.stages import UNetStage, VAEStage, make_ema


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ldm train`` flags (``ldm.cli`` calls this for its ``train`` subcommand)."""
    parser.add_argument("--data", metavar="DIR", help="captioned image folder (sidecar .txt or metadata.jsonl/csv)")
    parser.add_argument("--output", metavar="DIR", required=True, help="where model/, checkpoints/, logs go")
    parser.add_argument("--config", metavar="FILE", help="YAML preset (e.g. configs/default.yaml)")
    parser.add_argument("--init", "--model", dest="init", metavar="MODEL",
                        help="model to fine-tune: a path, or 'default' for the shipped model (none: from scratch)")
    parser.add_argument("--lora", type=int, metavar="RANK", help="train LoRA adapters of this rank (needs --init)")
    parser.add_argument("--lora-format", choices=("ldm", "kohya"), help="lora.safetensors layout (kohya: what "
                        "A1111 and ComfyUI load)")
    parser.add_argument("--max-steps", type=int, metavar="N")
    parser.add_argument("--batch-size", type=int, metavar="N", help="per process and micro-step")
    parser.add_argument("--lr", type=float, metavar="X")
    parser.add_argument("--checkpoint-every", type=int, metavar="N")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--seed", type=int, metavar="N")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. lr=1e-4 "
                        "data.resolution=64 stage=vae|unet|controlnet (stage=controlnet: a ControlNet for --init, "
                        "control images from the data's conditioning_image field or canny; see ldm/train/config.py "
                        "for every key and docs/training.md)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {"data.path": args.data, "output": args.output, "init": args.init, "lora.rank": args.lora,
              "lora.format": getattr(args, "lora_format", None),
              "max_steps": args.max_steps, "batch_size": args.batch_size, "lr": args.lr,
              "checkpoint_every": args.checkpoint_every, "seed": args.seed,
              "data.strict": True if args.strict else None}
    return load_config(args.config, args.overrides, values)


def run(args: argparse.Namespace) -> int:
    """Entry point for ``ldm train`` (errors in the input raise ValueError subclasses with one-line messages)."""
    Trainer(config_from_args(args), resume=args.resume).fit()
    return 0


def train_main(argv: list[str] | None = None) -> int:
    """``python -m ldm.train ...`` (what torchrun / accelerate launch start): parse, train, report errors."""
    parser = argparse.ArgumentParser(prog="ldm train", description="train or fine-tune a model")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:
        print(f"ldm train: error: {e}", file=sys.stderr)
        return 2


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up to 1, then cosine decay to ``lr_min_ratio`` at ``max_steps`` (Loshchilov & Hutter 2017)."""
    def factor(step: int) -> float:
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, cfg.max_steps - cfg.lr_warmup_steps)
        progress = min(1.0, (step - cfg.lr_warmup_steps) / span)
        return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False):
        from accelerate import Accelerator

        if not cfg.output:
            raise ConfigError("no output folder given (--output DIR)")
        self.cfg, self.out = cfg, Path(cfg.output)
        self.acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
        self.rank, self.world, self.main = self.acc.process_index, self.acc.num_processes, self.acc.is_main_process
        self.device = self.acc.device
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)   # the same initial weights in every process and every run
        self.stage = self._build_stage()
        self.module = self.stage.module.to(self.device)
        if cfg.gradient_checkpointing:
            for m in self.module.modules():
                if m is not self.module and hasattr(m, "set_gradient_checkpointing"):
                    m.set_gradient_checkpointing(True)
        if cfg.compile:
            self.module.compile_training()
        self.optimizer = torch.optim.AdamW(self.stage.param_groups(), lr=cfg.lr, betas=cfg.adam_betas,
                                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda"))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.ema = make_ema(cfg, self.module)
        self.model, self.optimizer = self.acc.prepare(self.module, self.optimizer)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.start = 0
        self.ckpt_dir = self.out / "checkpoints"
        if resume:
            self._resume()
        elif ckpt.latest(self.ckpt_dir) is not None:
            raise ConfigError(f"{self.ckpt_dir} already holds checkpoints; pass --resume to continue that run, "
                              f"or choose another --output")

    # -- setup ---------------------------------------------------------------------------------------------
    def _build_stage(self):
        cfg = self.cfg
        if cfg.stage == "vae":
            # from scratch, or the VAE of init=MODEL (whose other networks are written back beside it at the end)
            components = build_components(cfg) if cfg.init is not None else None
            vae = components.vae if components is not None else AutoencoderKL(vae_config(cfg))
            self._make_data(multiple=vae.config.downscale, vae=None)
            return VAEStage(cfg, vae, components)
        components = build_components(cfg)
        control = cfg.stage == "controlnet"
        self._make_data(multiple=components.vae.config.downscale, vae=components.vae, hints=control)
        return ControlNetStage(cfg, components) if control else UNetStage(cfg, components)

    def _make_data(self, multiple: int, vae, hints: bool = False) -> None:
        """The dataset and its order; ``hints``: each sample with its control image (stage "controlnet")."""
        cfg = self.cfg.data
        found = D.build(cfg, size_multiple=multiple)
        records, sizes = found.records, found.sizes
        c = self.cfg.controlnet
        hints = Hints.for_records(records, cfg.path, c.column, c.canny_low, c.canny_high) if hints else None
        transform = D.Transform(crop=cfg.crop, flip=cfg.flip, augment=cfg.augment, shift=cfg.augment_shift,
                                scale=cfg.augment_scale, fill=cfg.augment_fill)
        latents = None
        if vae is not None and cfg.cache_latents:
            folder = Path(cfg.cache_dir) if cfg.cache_dir else self.out / "cache"
            vae.to(self.device).eval()
            latents = LatentCache(folder, vae, transform, cfg.augment_variants, hints).prepare(
                records, sizes, rank=self.rank, world=self.world, barrier=self.acc.wait_for_everyone,
                progress=self.main and self.cfg.progress)
        self.dataset = D.CaptionDataset(records, sizes, transform, self.cfg.data.caption_dropout, latents, hints)
        global_batch = self.cfg.batch_size * self.world * self.cfg.grad_accum
        self.order = D.DataOrder(len(records), global_batch, self.cfg.seed, found.buckets, found.repeats)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _resume(self) -> None:
        path = ckpt.latest(self.ckpt_dir)
        if path is None:
            if self.main:
                print(f"ldm train: no checkpoint in {self.ckpt_dir}; starting from step 0", file=sys.stderr)
            return
        state, tensors, objects = ckpt.load(path, self.rank)
        for key in ("stage", "model"):
            if state["config"][key] != to_dict(self.cfg)[key]:
                raise ConfigError(f"--resume: the checkpoint in {path} was made with a different '{key}' config; "
                                  f"resume with the same settings (see {self.out / 'config.yaml'})")
        self.stage.load_trainable_state(self.module, tensors["model"])
        self.optimizer.load_state_dict(objects["optimizer"])
        self.scheduler.load_state_dict(objects["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(tensors["ema"])
        self.start = int(state["step"])

    def _save(self, step: int) -> None:
        tensors = {"model": self.stage.trainable_state(self.module)}
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()
        ckpt.save(self.ckpt_dir, step, tensors=tensors,
                  objects={"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                  state={"config": to_dict(self.cfg), "world_size": self.world}, rank=self.rank,
                  is_main=self.main, barrier=self.acc.wait_for_everyone, keep=self.cfg.keep_checkpoints)

    # -- the loop ------------------------------------------------------------------------------------------
    def _micro_batches(self, step: int):
        cfg = self.cfg
        for micro in range(cfg.grad_accum):
            keys = self.order.shard(step, micro, cfg.batch_size, self.rank, self.world)
            yield micro, D.collate([self.dataset[k] for k in keys])

    def train_step(self, step: int) -> torch.Tensor:
        """One optimiser step over the global batch of ``step``; returns this process's mean loss."""
        total = torch.zeros((), device=self.device)
        for micro, batch in self._micro_batches(step):
            last = micro == self.cfg.grad_accum - 1
            with contextlib.nullcontext() if last else self.acc.no_sync(self.model):
                with self.acc.autocast():
                    loss = self.stage.loss(self.model, batch, self.device) / self.cfg.grad_accum
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower the learning rate or "
                                             f"use mixed_precision=no")
                self.acc.backward(loss)
            total += loss.detach()
        if self.cfg.max_grad_norm > 0:
            self.acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.module)
        return total

    def fit(self) -> Path | None:
        cfg = self.cfg
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial(self.ckpt_dir)
            save_config(cfg, self.out / "config.yaml")
        log = _CsvLog(self.out / "log.csv", self.start) if self.main else None
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.start, desc=f"train {cfg.stage}", unit="step",
                   disable=not (self.main and cfg.progress), dynamic_ncols=True)
        global_batch = cfg.batch_size * self.world * cfg.grad_accum
        t_start, t_last, last_step = time.time(), time.time(), self.start
        running = torch.zeros((), device=self.device)
        for step in range(self.start, cfg.max_steps):
            self.model.train()
            running += self.train_step(step)
            done = step + 1
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                # the mean loss over the steps since the last log line, over all processes
                mean = self.acc.reduce(running, "mean").item() / (done - last_step)
                running.zero_()
                now = time.time()
                speed = (done - last_step) * global_batch / max(now - t_last, 1e-9)
                t_last, last_step = now, done
                bar.set_postfix(loss=f"{mean:.4f}", samples_s=f"{speed:.1f}")
                if log is not None:
                    log.write(done, mean, self.scheduler.get_last_lr()[0], speed, now - t_start)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
                self._save(done)
            if cfg.validation.every and done % cfg.validation.every == 0:
                self.validate(done)
        bar.close()
        return self.finish()

    # -- validation and output ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _eval_weights(self):
        """The weights to show or ship: EMA when there is one. Global RNG states are left untouched."""
        state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]), (self.ema.swapped(self.module) if self.ema is not None
                                                 else contextlib.nullcontext()):
            yield self.module
        random.setstate(state[0])
        np.random.set_state(state[1])

    def validate(self, step: int) -> None:
        if self.main:
            with self._eval_weights() as module:
                was_training = module.training
                self.stage.validate(module.eval(), self.dataset, self.out / "samples" / f"step-{step:08d}.png")
                module.train(was_training)
        self.acc.wait_for_everyone()

    def finish(self) -> Path | None:
        """Write the final checkpoint and the model (EMA weights when EMA is on); returns the output path."""
        if self.start < self.cfg.max_steps:
            self._save(self.cfg.max_steps)
        result = None
        if self.main:
            with self._eval_weights() as module:
                result = self.stage.finish(module, self.dataset, self.out)
        self.acc.wait_for_everyone()
        return result


class _CsvLog:
    """log.csv with step, loss, lr, samples/s and elapsed seconds; rows past the resume step are dropped."""
    FIELDS = ["step", "loss", "lr", "samples_per_s", "elapsed_s"]

    def __init__(self, path: Path, start: int):
        self.path = path
        rows = []
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, self.FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.tb = _tensorboard(path.parent / "tensorboard")

    def write(self, step: int, loss: float, lr: float, speed: float, elapsed: float) -> None:
        with self.path.open("a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow([step, f"{loss:.6f}", f"{lr:.3e}", f"{speed:.2f}", f"{elapsed:.1f}"])
        if self.tb is not None:
            self.tb.add_scalar("loss", loss, step)
            self.tb.add_scalar("lr", lr, step)
            self.tb.add_scalar("samples_per_s", speed, step)
            self.tb.flush()


def _tensorboard(folder: Path):
    """A TensorBoard writer when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))

