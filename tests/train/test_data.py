"""Data loading: layouts, bad input, transforms, data order, latent cache; and the trainer's config parser."""

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.train import data as D
from ldm.train.config import ConfigError, load_config
from ldm.train.latent_cache import LatentCache


def _png(path, color=(255, 0, 0), size=(16, 16), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def test_sidecar_jsonl_and_csv_layouts(tmp_path):
    a = tmp_path / "side"
    _png(a / "x.png")
    (a / "x.txt").write_text(" a red square \n", encoding="utf-8")
    _png(a / "sub" / "y.jpg", (0, 0, 255))
    (a / "sub" / "y.txt").write_text("blue", encoding="utf-8")
    recs = D.scan(a)
    assert [(r.path.name, r.captions) for r in recs] == [("y.jpg", ["blue"]), ("x.png", ["a red square"])]

    b = tmp_path / "jsonl"
    _png(b / "x.png")
    rows = [{"file_name": "x.png", "captions": ["turtle", "a turtle"]}, {"file_name": "x.png", "text": "t"}]
    (b / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert [r.captions for r in D.scan(b)] == [["turtle", "a turtle"], ["t"]]

    c = tmp_path / "csv"
    _png(c / "x.png")
    (c / "metadata.csv").write_text('file_name,text\nx.png,"red, square"\n', encoding="utf-8")
    assert D.scan(c)[0].captions == ["red, square"]


def test_bad_input_errors_name_the_culprit(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.scan(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="no captioned images"):
        D.scan(tmp_path / "empty")
    _png(tmp_path / "nocap" / "lonely.png")
    with pytest.raises(D.DataError, match="lonely.png"):
        D.scan(tmp_path / "nocap")
    _png(tmp_path / "enc" / "a.png")
    (tmp_path / "enc" / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(D.DataError, match=r"a\.txt is not valid UTF-8"):
        D.scan(tmp_path / "enc")
    (tmp_path / "js").mkdir()
    (tmp_path / "js" / "metadata.jsonl").write_text('{"file_name": "a.png"}\n', encoding="utf-8")
    with pytest.raises(D.DataError, match=r"metadata.jsonl:1.*no caption"):
        D.scan(tmp_path / "js")


def test_corrupt_images_are_skipped_with_count_or_fail_under_strict(tmp_path):
    root = tmp_path / "d"
    for i in range(3):
        _png(root / f"ok{i}.png")
        (root / f"ok{i}.txt").write_text("ok")
    for i in range(2):
        (root / f"bad{i}.png").write_bytes(b"not a png at all")
        (root / f"bad{i}.txt").write_text("bad")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        good = D.check_images(D.scan(root))
    assert len(good) == 3 and good[0].size == (16, 16)
    msg = str(caught[0].message)
    assert "skipped 2 unreadable" in msg and "bad0.png" in msg
    with pytest.raises(D.DataError, match="bad0.png"):
        D.check_images(D.scan(root), strict=True)


def test_transform_composites_alpha_on_white_and_augment_keeps_identity(tmp_path):
    p = tmp_path / "a.png"
    im = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    im.paste((0, 200, 0, 255), (8, 8, 24, 24))
    im.save(p)
    t = D.Transform()(p, (16, 16), D.generator(0))
    assert t.shape == (3, 16, 16) and t.min() >= -1 and t.max() <= 1
    assert torch.allclose(t[:, 0, 0], torch.ones(3))             # transparent corner -> white
    aug = D.Transform(augment=True, shift=0.1, scale=0.2)
    outs = [aug(p, (16, 16), D.generator(s)) for s in range(8)]
    assert len({o.sum().item() for o in outs}) > 1                # different views
    for o in outs:
        green = ((o[1] > 0.2) & (o[0] < -0.5)).float().mean()
        assert 0.1 < green < 0.3                                  # the square is still there, roughly whole
    assert torch.equal(aug(p, (16, 16), D.generator(3)), outs[3])  # a function of the seed


def test_resize_crop_and_buckets(tmp_path):
    img = Image.new("RGB", (100, 50))
    assert D.resize_crop(img, (32, 32), "center", D.generator(0)).size == (32, 32)
    buckets = D.make_buckets(128, 32, 2.0)
    assert (128, 128) in buckets and (96, 160) in buckets and all(w * h <= 128 * 128 for w, h in buckets)
    assert buckets[D.assign_bucket((200, 100), buckets)] == (160, 96)
    assert buckets[D.assign_bucket((100, 190), buckets)] == (96, 160)


def test_data_order_shards_match_one_process_and_cover_epochs():
    order = D.DataOrder(10, 4, seed=3)
    one = [order.shard(s, 0, 4, 0, 1) for s in range(5)]
    two = [order.shard(s, 0, 2, 0, 2) + order.shard(s, 0, 2, 1, 2) for s in range(5)]
    assert one == two
    stream = [i for s in range(5) for i, _ in one[s]]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert D.DataOrder(10, 4, seed=4).global_batch(0) != order.global_batch(0)
    bucketed = D.DataOrder(7, 2, seed=0, bucket_of=[0, 0, 0, 1, 1, 1, 2])
    for s in range(6):
        b = bucketed.global_batch(s)
        assert len({[0, 0, 0, 1, 1, 1, 2][i] for i in b}) == 1   # never mixes sizes


def test_dataset_caption_choice_and_dropout(tmp_path):
    p = _png(tmp_path / "a.png")
    recs = [D.Record(p, ["one", "two", "three"])]
    ds = D.CaptionDataset(recs, [(8, 8)], D.Transform(), caption_dropout=0.3)
    caps = [ds[(0, s)]["caption"] for s in range(300)]
    assert set(caps) == {"", "one", "two", "three"}
    assert 0.2 < caps.count("") / 300 < 0.4
    assert ds[(0, 5)]["caption"] == ds[(0, 5)]["caption"]
    batch = D.collate([ds[(0, s)] for s in range(3)])
    assert batch["pixels"].shape == (3, 3, 8, 8) and len(batch["caption"]) == 3


class _CountingVAE(torch.nn.Module):
    """Stands in for AutoencoderKL: 'encodes' by 2x average pooling; counts images encoded."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.calls = 0

    def encode(self, x):
        self.calls += x.shape[0]
        m = torch.nn.functional.avg_pool2d(x, 2) * self.w
        return SimpleNamespace(mean=m, logvar=torch.zeros_like(m))


def test_latent_cache_reuses_and_invalidates(tmp_path):
    recs = [D.Record(_png(tmp_path / f"{i}.png", (50 * i, 0, 0)), ["c"]) for i in range(3)]
    sizes = [(8, 8)] * 3
    vae = _CountingVAE()
    lat = LatentCache(tmp_path / "cache", vae, D.Transform()).prepare(recs, sizes)
    assert vae.calls == 3 and lat[1][0].shape == (1, 3, 4, 4)
    LatentCache(tmp_path / "cache", vae, D.Transform()).prepare(recs, sizes)
    assert vae.calls == 3                                         # all reused
    _png(recs[0].path, (0, 255, 0))                               # an input file changes
    lat2 = LatentCache(tmp_path / "cache", vae, D.Transform()).prepare(recs, sizes)
    assert vae.calls == 4 and not torch.equal(lat2[0][0], lat[0][0])
    with torch.no_grad():
        vae.w.fill_(2.0)                                          # new VAE weights: everything again
    LatentCache(tmp_path / "cache", vae, D.Transform()).prepare(recs, sizes)
    assert vae.calls == 7
    aug = LatentCache(tmp_path / "cache", vae, D.Transform(augment=True), variants=4).prepare(recs[:1], sizes[:1])
    assert aug[0][0].shape[0] == 4 and not torch.equal(aug[0][0][0], aug[0][0][1])


def test_config_overrides_types_and_suggestions(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("lr: 1e-3\ndata:\n  resolution: 32\nmodel:\n  unet:\n    layers_per_block: 1\n")
    cfg = load_config(preset, ["data.flip=true", "lr=2e-4", "model.unet.block_out_channels=[32,64]"],
                      {"max_steps": 7})
    assert cfg.lr == 2e-4 and cfg.data.resolution == 32 and cfg.data.flip is True and cfg.max_steps == 7
    assert cfg.model.unet == {"layers_per_block": 1, "block_out_channels": [32, 64]}
    with pytest.raises(ConfigError, match=r"unknown config key 'data.resolutoin'.*'data.resolution'"):
        load_config(None, ["data.resolutoin=64"])
    with pytest.raises(ConfigError, match=r"'learning_rate'.*did you mean 'lr'|'ema_deacy'.*'ema_decay'"):
        load_config(None, ["ema_deacy=0.9"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"batch_sise.*batch_size.*bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"max_steps='ten'"):
        load_config(None, ["max_steps=ten"])
    with pytest.raises(ConfigError, match="stage='gan'"):
        load_config(None, ["stage=gan"])
    assert np.isclose(load_config(None, ["adam_betas=[0.9, 0.99]"]).adam_betas[1], 0.99)


def test_repeats_rules_and_weighted_order(tmp_path):
    rows = [{"file_name": f"{i}.png", "text": "x", "kind": "single" if i < 2 else "pair"} for i in range(4)]
    for i in range(4):
        _png(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    recs = D.scan(tmp_path)
    assert D.repeats_for(recs, {"kind=single": 3}) == [3, 3, 1, 1]
    with pytest.raises(D.DataError, match="data.repeats"):
        D.repeats_for(recs, {"kind": 2})
    order = D.DataOrder(4, 8, seed=0, repeats=[3, 3, 1, 1])
    epoch = order.global_batch(0)
    assert sorted(epoch) == [0, 0, 0, 1, 1, 1, 2, 3]


def test_stage_sections_in_presets(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("lr: 1e-3\nbatch_size: 4\nstages:\n  vae:\n    lr: 5e-4\n    data: {augment: true}\n"
                      "  unet:\n    max_steps: 9\n")
    assert load_config(preset, ["stage=vae"]).lr == 5e-4
    vae = load_config(preset, ["stage=vae", "lr=1e-5"])
    assert vae.lr == 1e-5 and vae.data.augment and vae.batch_size == 4
    unet = load_config(preset)
    assert unet.lr == 1e-3 and unet.max_steps == 9 and not unet.data.augment
    preset.write_text("stages:\n  vae:\n    ema_dcay: 0.9\n")
    with pytest.raises(ConfigError, match=r"stages.vae.ema_dcay.*ema_decay"):
        load_config(preset)
