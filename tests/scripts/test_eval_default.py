"""scripts/emoji_judge.py, eval_default.py and contact_sheet.py on a synthetic emoji folder and a tiny random model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tiny_models import save_tiny_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import contact_sheet as cs  # noqa: E402
import emoji_judge as ej  # noqa: E402
import eval_default as ev  # noqa: E402

SMALL = ej.JudgeConfig(size=32, width=8, steps=60, batch=16, lr=1e-2, seed=0)
# Four concepts any judge must tell apart: shape and colour differ; the two styles draw them a little differently.
SHAPES = {"red disc": ("Animals & Nature", "ellipse", (220, 30, 30)),
          "blue square": ("Animals & Nature", "rectangle", (30, 60, 220)),
          "green triangle": ("Objects", "polygon", (30, 170, 60)),
          "black bar": ("Objects", "bar", (20, 20, 20))}


def _draw(kind: str, colour, inset: int) -> Image.Image:
    im = Image.new("RGB", (64, 64), (255, 255, 255))
    d, box = ImageDraw.Draw(im), (inset, inset, 63 - inset, 63 - inset)
    if kind == "polygon":
        d.polygon([(32, inset), (63 - inset, 63 - inset), (inset, 63 - inset)], fill=colour)
    elif kind == "bar":
        d.rectangle((inset, 26, 63 - inset, 38), fill=colour)
    else:
        getattr(d, kind)(box, fill=colour)
    return im


@pytest.fixture(scope="module")
def emoji_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("emoji")
    (root / "images").mkdir()
    concepts, lines = [], []
    for name, (category, kind, colour) in SHAPES.items():
        slug = name.replace(" ", "_")
        concepts.append({"concept": name, "category": category, "subcategory": "test", "emoji": "?", "slug": slug})
        for style, inset in (("google", 10), ("twitter", 14)):
            _draw(kind, colour, inset).save(root / "images" / f"{style}_{slug}.png")
            lines.append({"file_name": f"images/{style}_{slug}.png", "text": name, "concept": name, "style": style,
                          "captions": [name, f"a {name}", f"a {name} emoji", f"{name}, {style} style"],
                          "category": category, "kind": "single"})
    Image.new("RGB", (64, 64), "white").save(root / "images" / "pair.png")
    lines.append({"file_name": "images/pair.png", "text": "a red disc and a black bar", "captions": ["x"],
                  "concept": "red disc and black bar", "style": "google", "category": "pair", "kind": "pair"})
    (root / "concepts.json").write_text(json.dumps(concepts))
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return root


@pytest.fixture(scope="module")
def data(emoji_dir):
    return ej.load_emoji(emoji_dir)


@pytest.fixture(scope="module")
def judge(data):
    return ej.train_judge(data, SMALL)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("model") / "tiny")


class _FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)

    def forward(self, x):
        return self.logits[: len(x)]


# ---------------------------------------------------------------------------------------------- the judge
def test_load_emoji_reads_singles_only(data):
    assert data.images.shape == (8, 3, 64, 64) and data.images.min() >= -1 and data.images.max() <= 1
    assert data.concepts == list(SHAPES) and sorted(set(data.styles)) == ["google", "twitter"]
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert data.captions["red disc"][:2] == ["red disc", "a red disc"]


def test_topk_arithmetic_on_a_known_case():
    assert ej.topk_shares(torch.tensor([0, 1, 4, 5, 10])) == {"top1": 0.2, "top5": 0.6}
    judge = ej.Judge(_FixedLogits([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [9.0, 8.0, 7.0]]), ["a", "b", "c"], SMALL)
    ranks = judge.ranks(torch.zeros(3, 3, 8, 8), [0, 2, 2])
    assert ranks.tolist() == [0, 1, 2]
    assert judge.score(torch.zeros(3, 3, 8, 8), [0, 2, 2], ks=(1, 2)) == pytest.approx({"top1": 1 / 3, "top2": 2 / 3})


def test_judge_separates_distinguishable_classes(data, judge):
    assert judge.score(data.images, data.labels)["top1"] == 1.0
    assert ej.held_out_views(judge, data)["top1"] >= 0.9
    untrained = ej.Judge(ej.JudgeNet(4, SMALL.width), data.concepts, SMALL)
    assert untrained.score(data.images, data.labels)["top1"] < 1.0


def test_judge_is_deterministic_and_round_trips(tmp_path, data, judge):
    again = ej.train_judge(data, SMALL)
    for (k, a), b in zip(judge.net.state_dict().items(), again.net.state_dict().values()):
        assert torch.equal(a, b), k
    path = judge.save(tmp_path / "judge.safetensors")
    loaded = ej.Judge.load(path)
    assert loaded.concepts == judge.concepts and loaded.config == SMALL
    assert torch.equal(loaded.logits(data.images), judge.logits(data.images))


def test_augment_keeps_a_white_background():
    g = torch.Generator().manual_seed(0)
    white = ej.augment(torch.ones(4, 3, 64, 64), g, ej.JudgeConfig(jitter=0.0, noise_max=0.0))
    assert torch.allclose(white, torch.ones_like(white), atol=1e-4)
    views = ej.augment(torch.full((4, 3, 64, 64), -1.0), g, ej.JudgeConfig(jitter=0.0, noise_max=0.0, scale_max=0.8))
    assert views[..., 0, 0].min() > 0.9          # a black square shrunk to 80 %: the corners are filled with white


def test_obtain_reuses_a_matching_cache_and_errors_are_clear(tmp_path, data, judge, emoji_dir):
    path = judge.save(tmp_path / "j.safetensors")
    messages = []
    assert ej.obtain(path, data, None, log=messages.append).config == SMALL
    assert messages == [f"judge: reusing {path}"]
    with pytest.raises(ej.JudgeError, match="missing.safetensors"):
        ej.Judge.load(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a judge")
    with pytest.raises(ej.JudgeError, match="bad.safetensors"):
        ej.Judge.load(tmp_path / "bad.safetensors")
    with pytest.raises(ej.JudgeError, match="nowhere"):
        ej.load_emoji(tmp_path / "nowhere")


def test_validate_reports_cross_style(data, judge):
    report = ej.validate(data, ej.JudgeConfig(size=32, width=8, steps=5, batch=4), judge)
    assert set(report) == {"clean", "held_out_views", "cross_style_google_to_twitter", "cross_style_twitter_to_google"}
    assert all(0 <= v["top1"] <= v["top5"] <= 1 for v in report.values())


# ---------------------------------------------------------------------------------------------- evaluation
def test_select_concepts_is_stratified_and_seeded():
    categories = ["A"] * 60 + ["B"] * 30 + ["C"] * 10
    chosen = ev.select_concepts(categories, 10, seed=0)
    assert [sum(categories[i] == c for i in chosen) for c in "ABC"] == [6, 3, 1]
    assert chosen == ev.select_concepts(categories, 10, seed=0) != ev.select_concepts(categories, 10, seed=1)
    assert len(ev.select_concepts(["A"] * 3 + ["B"] * 3 + ["C"] * 3, 5)) == 5     # remainders rounded to n
    with pytest.raises(ev.EvalError, match="between 1 and 100"):
        ev.select_concepts(categories, 101)


def test_caption_forms():
    caps = ["turtle", "a turtle", "a turtle emoji", "turtle, google style", "an emoji of a turtle"]
    assert [ev.caption_for("turtle", caps, f) for f in ev.CAPTION_FORMS] == ["a turtle", "turtle", "a turtle emoji"]
    assert ev.caption_for("foggy", ["foggy", "a foggy emoji", "an emoji of foggy"], "article") == "foggy"


def test_eval_end_to_end_on_a_tiny_model(tmp_path, tiny_model, emoji_dir, judge, capsys):
    judge_path = judge.save(tmp_path / "judge.safetensors")
    out = tmp_path / "eval.json"
    rc = ev.main(["--model", str(tiny_model), "--data", str(emoji_dir), "--captions", "4", "--guidance", "1", "3",
                  "--steps", "2", "--batch", "3", "--judge", str(judge_path), "--skip-judge-validation",
                  "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [r["kind"] for r in result["rows"]] == ["real", "vae", "untrained", "model", "model"]
    assert [r["images"] for r in result["rows"]] == [8, 8, 4, 4, 4]
    assert result["rows"][0]["top1"] == 1.0                       # the judge knows the real pictures
    assert [c["caption"] for c in result["captions"]] == [f"a {name}" for name in SHAPES]
    printed = capsys.readouterr().out
    assert "| model, guidance 3 | 4 |" in printed and "chance (1/4, 5/4)" in printed


def test_untrained_pipeline_has_fresh_unet_and_text_encoder(tiny_model):
    from ldm import Pipeline

    pipe = Pipeline.from_pretrained(tiny_model)
    fresh = ev.untrained(pipe, seed=0)
    assert fresh.vae is pipe.vae
    for ours, theirs in ((fresh.unet, pipe.unet), (fresh.text_encoder, pipe.text_encoder)):
        a, b = dict(ours.named_parameters()), dict(theirs.named_parameters())
        assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flag", ["--model", "--data"])
def test_eval_missing_paths_are_named(tmp_path, tiny_model, emoji_dir, flag, capsys):
    paths = {"--model": str(tiny_model), "--data": str(emoji_dir), flag: str(tmp_path / "absent")}
    rc = ev.main(["--model", paths["--model"], "--data", paths["--data"], "--out", str(tmp_path / "o.json")])
    assert rc == 2
    assert f"{flag} {tmp_path / 'absent'} does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- contact sheet
def test_default_prompts_cover_the_issue():
    assert len(cs.DEFAULT_PROMPTS) >= 32 and len(set(cs.DEFAULT_PROMPTS)) == len(cs.DEFAULT_PROMPTS)
    assert "a turtle playing basketball" in cs.DEFAULT_PROMPTS
    assert sum(" and " in p for p in cs.DEFAULT_PROMPTS) >= 3


def test_contact_sheet_grid_on_a_tiny_model(tmp_path, tiny_model):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# three prompts\na turtle\n\na pizza\na turtle playing basketball\n")
    out = tmp_path / "sheet.png"
    rc = cs.main(["--model", str(tiny_model), "--out", str(out), "--prompts", str(prompts), "--seeds", "0", "1",
                  "--cols", "2", "--steps", "2"])
    assert rc == 0
    sheet = np.asarray(Image.open(out))
    # tiny model: 16 px images, enlarged 8x to 128; cells 2 x 128 + 2 wide, two cells a row, two rows, a title.
    line = 15 + 3
    cell_w, cell_h = 2 * 128 + 2, 128 + 2 * line + 4
    assert sheet.shape == (line + 2 * cs.GAP + 2 * (cell_h + cs.GAP), cs.GAP + 2 * (cell_w + cs.GAP), 3)
    top = line + 2 * cs.GAP
    first, missing = sheet[top:top + 128, cs.GAP:cs.GAP + 128], sheet[top + cell_h + cs.GAP:, -cell_w:]
    assert (first != cs.BACKGROUND).any() and (missing == cs.BACKGROUND).all()   # 3 prompts: the 4th cell is empty
    text = sheet[top + 128 + 2:top + cell_h, cs.GAP:cs.GAP + cell_w]
    assert (text.sum(-1) < 200).any()                                              # the caption is drawn


def test_contact_sheet_errors(tmp_path, tiny_model, capsys):
    assert cs.main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "s.png")]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    assert cs.main(["--model", str(tiny_model), "--out", str(tmp_path / "s.png"), "--prompts", str(empty)]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    with pytest.raises(cs.SheetError, match="3 images for 2 prompts"):
        cs.layout([Image.new("RGB", (8, 8))] * 3, ["a", "b"], 2, 2)
