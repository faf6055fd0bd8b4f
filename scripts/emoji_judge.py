"""The emoji judge: a small CNN that names the single emoji an image shows, for scripts/eval_default.py (issue 6).

    PYTHONPATH=. python scripts/emoji_judge.py --data /work/data/emoji --out runs/emoji_judge.safetensors --validate
    PYTHONPATH=. python scripts/emoji_judge.py --help

It is trained from scratch (no downloaded weights) on the real single-emoji images of the dataset, both styles
(Google and Twitter: two pictures per concept), under augmentation that mimics what a generator makes of an
emoji: a small shift and scale on white, a slight Gaussian blur (generated images pass through the model's 4×
VAE, so they are softer), colour jitter and a little pixel noise. It sees 32×32 area-downsampled images, which
also hides most of the VAE's high-frequency softness.

Its own validity (``--validate``), so that a reader knows how far to trust it:
  * held-out views: top-1/top-5 on augmented views drawn with a seed it never trained on (same pictures);
  * cross-style: a judge trained on one style only, tested on the other style's pictures of the same concepts
    (new pictures by another artist: a lower bound on how well it recognises an unfamiliar drawing).

Training is seeded: the same data, configuration and thread count give the same weights. The judge file is a
safetensors file whose metadata holds the concepts, the configuration, a fingerprint of the data and the
validity figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

FORMAT = "ldm-emoji-judge/1"


class JudgeError(ValueError):
    """Bad dataset folder or judge file; the message names the path at fault."""


@dataclass(frozen=True)
class JudgeConfig:
    """Network width, training schedule and augmentation strengths (all seeded by ``seed``)."""

    size: int = 32                 # input side; images are area-resized to it
    # Cost (measured, 1 thread, channels-last): ~0.58 CPU-s a step of 128 at width 24 (0.48 network, 0.11
    # augmentation), ~1.0 at width 32. 500 steps (~37 epochs of the 1,714 pictures) ≈ 2.5 min on 2 free cores.
    width: int = 24                # channels of the first stage (doubled at each of the 3 later stages)
    steps: int = 500
    batch: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = 0
    shift: float = 0.08            # translation, fraction of the side
    scale_min: float = 0.8         # the emoji's size relative to the original drawing
    scale_max: float = 1.08
    rotate_deg: float = 6.0
    blur_max: float = 1.2          # Gaussian blur σ in 64×64 pixels, uniform in [0, blur_max]
    jitter: float = 0.12           # brightness / contrast / saturation amplitude
    noise_max: float = 0.04        # pixel noise σ (in [-1, 1] units), uniform in [0, noise_max]

    def __post_init__(self):
        for name in ("size", "width", "steps", "batch"):
            if int(getattr(self, name)) < 1:
                raise JudgeError(f"JudgeConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 < self.scale_min <= self.scale_max:
            raise JudgeError(f"JudgeConfig: need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}")


# ---------------------------------------------------------------------------------------------- data
@dataclass
class EmojiSet:
    """Single-emoji pictures: images (N, 3, 64, 64) in [-1, 1], labels index ``concepts``."""

    images: Tensor
    labels: Tensor
    styles: list[str]
    concepts: list[str]
    categories: list[str]          # per concept
    captions: dict[str, list[str]] = field(default_factory=dict)   # per concept, the union over its pictures
    fingerprint: str = ""

    def subset(self, keep: Sequence[bool] | Tensor) -> EmojiSet:
        keep = torch.as_tensor(keep, dtype=torch.bool)
        return EmojiSet(self.images[keep], self.labels[keep], [s for s, k in zip(self.styles, keep) if k],
                        self.concepts, self.categories, self.captions, self.fingerprint)


def _read_json_lines(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise JudgeError(f"{path}:{number}: not JSON ({exc.msg})") from None
    return records


def to_model_input(unit: np.ndarray | Tensor) -> Tensor:
    """(B, H, W, 3) floats in [0, 1] (what ``Pipeline(..., output_type="np")`` returns) -> (B, 3, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(unit), dtype=torch.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images of shape (B, H, W, 3), got {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2) * 2 - 1


def load_emoji(data: str | Path, styles: Sequence[str] | None = None, side: int = 64) -> EmojiSet:
    """The single-emoji records of a dataset made by scripts/prepare_emoji.py (metadata.jsonl + concepts.json)."""
    data = Path(data)
    meta, concepts_file = data / "metadata.jsonl", data / "concepts.json"
    for path in (data, meta, concepts_file):
        if not path.exists():
            raise JudgeError(f"{path} does not exist (expected an emoji dataset folder made by "
                             "scripts/prepare_emoji.py, with metadata.jsonl and concepts.json)")
    try:
        table = json.loads(concepts_file.read_text(encoding="utf-8"))
        concepts = [c["concept"] for c in table]
        categories = [c["category"] for c in table]
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise JudgeError(f"{concepts_file}: expected a list of {{'concept', 'category', ...}} ({exc})") from None
    index = {c: i for i, c in enumerate(concepts)}
    images, labels, kept_styles, captions = [], [], [], {}
    for r in _read_json_lines(meta):
        if r.get("kind") != "single" or (styles is not None and r.get("style") not in styles):
            continue
        if r.get("concept") not in index:
            raise JudgeError(f"{meta}: record {r.get('file_name')!r} names concept {r.get('concept')!r}, "
                             f"which {concepts_file.name} does not list")
        path = data / r["file_name"]
        if not path.is_file():
            raise JudgeError(f"{meta}: image {path} does not exist")
        with Image.open(path) as im:
            rgb = im.convert("RGB").resize((side, side), Image.Resampling.BICUBIC) if im.size != (side, side) \
                else im.convert("RGB")
        images.append(np.asarray(rgb, dtype=np.float32) / 255.0)
        labels.append(index[r["concept"]])
        kept_styles.append(r.get("style", ""))
        seen = captions.setdefault(r["concept"], [])
        seen.extend(c for c in r.get("captions", [r.get("text", r["concept"])]) if c not in seen)
    if not images:
        raise JudgeError(f"{meta}: no single-emoji records" + (f" of style(s) {list(styles)}" if styles else ""))
    digest = hashlib.sha256(meta.read_bytes() + concepts_file.read_bytes()).hexdigest()[:16]
    return EmojiSet(to_model_input(np.stack(images)), torch.tensor(labels), kept_styles, concepts, categories,
                    captions, digest)


# ---------------------------------------------------------------------------------------------- augmentation
def _gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Per-image separable Gaussian blur with standard deviation sigma (B,) in pixels; σ ≈ 0 leaves x as is."""
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)       # (B·C, taps)
    flat = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=b * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def augment(x: Tensor, g: torch.Generator, cfg: JudgeConfig) -> Tensor:
    """Random views of (B, 3, H, W) images in [-1, 1] drawn on white: affine, blur, colour jitter, noise."""
    b = x.shape[0]

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand((b, *shape), generator=g)

    # Affine: the sampling grid maps output coordinates to input ones, so a drawing scaled by s needs 1/s.
    scale = uniform(cfg.scale_min, cfg.scale_max)
    angle = uniform(-cfg.rotate_deg, cfg.rotate_deg) * math.pi / 180
    shift = uniform(-2 * cfg.shift, 2 * cfg.shift, 2)                 # grid units: the side spans 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1  # white fill
    x = _gaussian_blur(x, uniform(0.0, cfg.blur_max))
    # Colour: saturation (blend with the grey image), contrast (around the image mean), brightness.
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * uniform(1 - cfg.jitter, 1 + cfg.jitter)[:, None, None, None]
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * uniform(1 - cfg.jitter, 1 + cfg.jitter)[:, None, None, None]
    x = x + uniform(-cfg.jitter, cfg.jitter)[:, None, None, None]
    x = x + torch.randn(x.shape, generator=g) * uniform(0.0, cfg.noise_max)[:, None, None, None]
    return x.clamp(-1, 1)


def resize(x: Tensor, side: int) -> Tensor:
    """Area-average (downsampling) or bilinear (upsampling) resize of (B, 3, H, W) to side × side."""
    if x.shape[-2:] == (side, side):
        return x
    if x.shape[-1] > side and x.shape[-2] > side:
        return F.interpolate(x, size=(side, side), mode="area")
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------- network
def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class JudgeNet(nn.Module):
    """Four VGG-style stages (two 3×3 conv + BN + ReLU each, 2× max-pool between), global average pool, linear."""

    def __init__(self, classes: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(_stage(3, w), nn.MaxPool2d(2), _stage(w, 2 * w), nn.MaxPool2d(2),
                                      _stage(2 * w, 4 * w), nn.MaxPool2d(2), _stage(4 * w, 8 * w))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * w, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------- the judge
def topk_shares(ranks: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Share of images whose requested class ranks within the top k (rank 0 = the judge's first choice)."""
    ranks = torch.as_tensor(ranks)
    if ranks.numel() == 0:
        raise ValueError("no images to score")
    return {f"top{k}": int((ranks < k).sum()) / ranks.numel() for k in ks}


class Judge:
    """A trained JudgeNet with the concept names it distinguishes."""

    def __init__(self, net: JudgeNet, concepts: Sequence[str], config: JudgeConfig, info: dict | None = None):
        self.net, self.concepts, self.config = net.eval(), list(concepts), config
        self.info = dict(info or {})

    def logits(self, images: Tensor, batch: int = 256) -> Tensor:
        """(B, 3, H, W) images in [-1, 1], any size -> (B, classes) logits."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        with torch.no_grad():
            return torch.cat([self.net(resize(images[i:i + batch].float(), self.config.size)
                                       .contiguous(memory_format=torch.channels_last))
                              for i in range(0, len(images), batch)])

    def ranks(self, images: Tensor, labels: Tensor | Sequence[int]) -> Tensor:
        """Rank of each image's requested label among the judge's scores (0 = its top-1 choice)."""
        logits = self.logits(images)
        labels = torch.as_tensor(labels, dtype=torch.long)
        target = logits.gather(1, labels[:, None])
        return (logits > target).sum(1)

    def score(self, images: Tensor, labels, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
        return topk_shares(self.ranks(images, labels), ks)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "config": json.dumps(asdict(self.config)), "concepts": json.dumps(self.concepts),
                "info": json.dumps(self.info)}
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Judge:
        from ldm.checkpoints.tensor_io import CheckpointError, read_safetensors

        path = Path(path)
        try:
            state, meta = read_safetensors(path, "judge file")
        except CheckpointError as exc:
            raise JudgeError(str(exc)) from None
        if meta.get("format") != FORMAT:
            raise JudgeError(f"{path}: not an emoji judge file (metadata format {meta.get('format')!r})")
        config = JudgeConfig(**json.loads(meta["config"]))
        concepts = json.loads(meta["concepts"])
        net = JudgeNet(len(concepts), config.width)
        net.load_state_dict(state, strict=True)
        return cls(net, concepts, config, json.loads(meta["info"]))


def _schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 1 % (Loshchilov & Hutter 2017, SGDR without restarts)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def train_judge(data: EmojiSet, cfg: JudgeConfig = JudgeConfig(), progress: bool = False) -> Judge:
    """Fit a JudgeNet on ``data`` under ``augment``; deterministic in ``cfg.seed`` (for a fixed thread count)."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    net = JudgeNet(len(data.concepts), cfg.width).train().to(memory_format=torch.channels_last)  # faster on CPU
    decay = [p for p in net.parameters() if p.ndim > 1]
    rest = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg.steps, max(1, cfg.steps // 20)))
    g = torch.Generator().manual_seed(cfg.seed)
    n, order, cursor = len(data.labels), torch.randperm(len(data.labels), generator=g), 0
    start = time.perf_counter()
    for _ in tqdm(range(cfg.steps), desc="judge", disable=not progress, leave=False):
        if cursor + cfg.batch > n:           # reshuffle each epoch (with small data, an epoch may be < 1 batch)
            order, cursor = torch.cat([order[cursor:], torch.randperm(n, generator=g)]), 0
        idx, cursor = order[cursor:cursor + cfg.batch], cursor + cfg.batch
        x = resize(augment(data.images[idx], g, cfg), cfg.size).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(net(x), data.labels[idx], label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    info = {"train_seconds": round(time.perf_counter() - start, 1), "train_images": n,
            "data_fingerprint": data.fingerprint, "final_loss": round(float(loss.detach()), 4),
            "threads": torch.get_num_threads()}
    return Judge(net, data.concepts, cfg, info)


def held_out_views(judge: Judge, data: EmojiSet, seed: int = 12345, views: int = 2) -> dict[str, float]:
    """Top-1/top-5 on augmented views of ``data`` drawn with a seed the training never used."""
    g = torch.Generator().manual_seed(seed)
    images = torch.cat([augment(data.images, g, judge.config) for _ in range(views)])
    return judge.score(images, data.labels.repeat(views))


def validate(data: EmojiSet, cfg: JudgeConfig, judge: Judge, progress: bool = False) -> dict:
    """The judge's own figures: clean pictures, held-out augmented views, and cross-style transfer (a judge per
    style, trained for as many epochs as ``judge``: ``cfg.steps`` scaled by the style's share of the pictures)."""
    report = {"clean": judge.score(data.images, data.labels), "held_out_views": held_out_views(judge, data)}
    styles = sorted(set(data.styles))
    if len(styles) == 2:
        for train_style, test_style in (styles, styles[::-1]):
            mask = torch.tensor([s == train_style for s in data.styles])
            steps = max(1, round(cfg.steps * int(mask.sum()) / len(mask)))
            one = train_judge(data.subset(mask), dataclasses.replace(cfg, steps=steps), progress)
            report[f"cross_style_{train_style}_to_{test_style}"] = one.score(data.images[~mask], data.labels[~mask])
    return report


def obtain(path: str | Path | None, data: EmojiSet, cfg: JudgeConfig | None = None, *, check: bool = False,
           log: Callable[[str], None] = print, progress: bool = True) -> Judge:
    """The judge cached at ``path`` if it was trained on this data (with ``cfg``, unless None: then with any
    configuration), else a new one (``cfg`` or the default) trained and saved at ``path``. With ``check``, a
    judge without validity figures is validated (and saved again)."""
    judge = None
    if path is not None and Path(path).is_file():
        judge = Judge.load(path)
        if (judge.concepts == data.concepts and cfg in (None, judge.config)
                and judge.info.get("data_fingerprint") == data.fingerprint):
            log(f"judge: reusing {path}")
        else:
            log(f"judge: {path} was made for other data or settings; training a new one")
            judge = None
    if judge is not None and (not check or judge.info.get("validity")):
        return judge
    if judge is None:
        cfg = cfg or JudgeConfig()
        log(f"judge: training on {len(data.labels)} pictures of {len(data.concepts)} concepts ({cfg.steps} steps)")
        judge = train_judge(data, cfg, progress)
    if check:
        log("judge: measuring its validity (held-out views; a judge per style, tested on the other style)")
        judge.info["validity"] = validate(data, judge.config, judge, progress)
    if path is not None:
        judge.save(path)
        log(f"judge: saved {path}")
    return judge


def validity_lines(info: dict, steps: int, classes: int) -> list[str]:
    """Human-readable lines of a judge's ``info`` (its training time and, if validated, its validity figures)."""
    lines = [f"judge: {steps} steps, {info.get('train_seconds')} s on {info.get('threads')} thread(s), "
             f"{classes} classes"]
    for name, shares in (info.get("validity") or {}).items():
        lines.append(f"  {name.replace('_', ' ')}: top-1 {shares['top1']:.1%}, top-5 {shares['top5']:.1%}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("/work/data/emoji"), help="emoji dataset folder")
    p.add_argument("--out", type=Path, required=True, help="judge file to write (.safetensors)")
    p.add_argument("--steps", type=int, default=JudgeConfig.steps, help="training steps")
    p.add_argument("--width", type=int, default=JudgeConfig.width, help="channels of the first stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--styles", nargs="+", default=None, help="train on these styles only; none: all")
    p.add_argument("--validate", action="store_true", help="also measure held-out views and cross-style accuracy "
                                                          "(trains two more judges, one per style)")
    p.add_argument("--threads", type=int, default=None, help="torch threads; none: torch's choice")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        data = load_emoji(a.data, a.styles)
        cfg = JudgeConfig(steps=a.steps, width=a.width, seed=a.seed)
        judge = obtain(None, data, cfg, check=a.validate)
        judge.save(a.out)
    except JudgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(validity_lines(judge.info, judge.config.steps, len(judge.concepts))))
    print(f"saved {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
