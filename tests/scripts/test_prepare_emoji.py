"""scripts/prepare_emoji.py on fake npm tarballs (a handful of synthesized emoji; no network, no real npm)."""
from __future__ import annotations

import io
import json
import os
import stat
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import emoji_captions as ec  # noqa: E402
import prepare_emoji as pe  # noqa: E402

# (char, unified, category, subcategory, CLDR name, slug, fill colour); the image file is <unified lower>.png
FAKE = [
    ("🐢", "1F422", "Animals & Nature", "animal-reptile", "turtle", "turtle", (0, 160, 0)),
    ("🐂", "1F402", "Animals & Nature", "animal-mammal", "ox", "ox", (150, 90, 30)),
    ("🏀", "1F3C0", "Activities", "sport", "basketball", "basketball", (240, 120, 0)),
    ("😀", "1F600", "Smileys & Emotion", "face-smiling", "grinning face", "grinning_face", (250, 200, 0)),
    ("👋", "1F44B", "People & Body", "hand-fingers-open", "waving hand", "waving_hand", (250, 180, 120)),
    ("#️⃣", "0023-FE0F-20E3", "Symbols", "keycap", "keycap: #", "keycap_number_sign", (90, 90, 90)),
    ("🈁", "1F201", "Symbols", "alphanum", "Japanese “here” button", "japanese_here_button", (0, 0, 200)),
    ("♻️", "267B-FE0F", "Symbols", "other-symbol", "recycling symbol", "recycling_symbol", (0, 140, 60)),
    ("🇯🇵", "1F1EF-1F1F5", "Flags", "country-flag", "flag: Japan", "flag_japan", (200, 0, 0)),
]
SKIN = "1f44b-1f3fd.png"  # a skin-tone variant image that must never be used


def sprite(colour) -> bytes:
    """64x64 RGBA: transparent, an opaque disk in the middle, and a half-transparent red strip at the top."""
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    draw.ellipse((12, 12, 52, 52), fill=colour + (255,))
    draw.rectangle((0, 0, 63, 3), fill=(255, 0, 0, 128))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_tgz(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_tarballs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    index = []
    for i, (char, uni, cat, sub, name, slug, _) in enumerate(FAKE):
        entry = {"unified": uni, "image": f"{uni.lower()}.png", "category": cat, "subcategory": sub,
                 "short_name": slug, "added_in": "15.1" if name == "ox" else "6.0", "sort_order": i,
                 "has_img_google": True, "has_img_twitter": True, "has_img_apple": True}
        if name == "waving hand":
            entry["skin_variations"] = {"1F3FD": {"unified": "1F44B-1F3FD", "image": SKIN}}
        index.append(entry)
    for style in ("google", "twitter"):
        files = {"emoji.json": json.dumps(index).encode()}
        for char, uni, *_, colour in FAKE:
            files[f"img/{style}/64/{uni.lower()}.png"] = sprite(colour)
        files[f"img/{style}/64/{SKIN}"] = sprite((90, 50, 20))
        files["img/apple/64/1f422.png"] = sprite((1, 2, 3))
        write_tgz(folder / f"emoji-datasource-{style}-16.0.0.tgz", files)
    names = {char: {"name": name, "slug": slug, "group": cat} for char, _, cat, _, name, slug, _ in FAKE}
    write_tgz(folder / "unicode-emoji-json-0.9.0.tgz", {"data-by-emoji.json": json.dumps(names).encode()})
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_tarballs(tmp_path_factory.mktemp("npm"))


def build(cache: Path, out: Path, *extra: str) -> int:
    return pe.main(["--cache", str(cache), "--out", str(out), "--quiet", *extra])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("name, phrase", [
    ("turtle", "a turtle"), ("ox", "an ox"), ("unicorn", "a unicorn"), ("umbrella", "an umbrella"),
    ("euro banknote", "a euro banknote"), ("x-ray", "an x-ray"), ("T-Rex", "a T-Rex"),
    ("hourglass done", "an hourglass done"), ("one-piece swimsuit", "a one-piece swimsuit"),
    ("8 ball", "an 8 ball"), ("1st place medal", "a 1st place medal"), ("grapes", "grapes"),
    ("nest with eggs", "a nest with eggs"), ("bus", "a bus"), ("octopus", "an octopus"), ("sushi", "sushi"),
    ("people hugging", "people hugging"), ("Statue of Liberty", "the Statue of Liberty"),
    ("woman lifting weights", "a woman lifting weights"), ("clapping hands", "clapping hands"),
    ("flower playing cards", "flower playing cards"),
    ("SOS button", "an SOS button"), ("NEW button", "a NEW button"),
    ("A button (blood type)", "an A button (blood type)"),
])
def test_noun_phrases(name, phrase):
    assert ec.with_article(name) == phrase


def test_caption_variants():
    assert ec.single_captions("ox", "twitter") == ["ox", "an ox", "an ox emoji", "ox, twitter style",
                                                    "an emoji of an ox"]
    assert ec.single_captions("grapes", "google") == ["grapes", "a grapes emoji", "grapes, google style",
                                                      "an emoji of grapes"]
    turtle = ec.Emoji("turtle", "turtle", "🐢", "Animals & Nature", "animal-reptile", "1f422.png", "6.0")
    ball = ec.Emoji("basketball", "basketball", "🏀", "Activities", "sport", "1f3c0.png", "6.0")
    caps = ec.pair_captions(turtle, ball, "google")
    assert caps[:3] == ["a turtle and a basketball", "turtle and basketball", "a turtle next to a basketball"]
    assert "a turtle playing basketball" in caps
    assert not any("playing" in c for c in ec.pair_captions(ball, turtle, "google"))


def test_dataset_contents(cache, tmp_path):
    out = tmp_path / "emoji"
    assert build(cache, out, "--pairs", "4", "--seed", "3") == 0
    concepts = json.loads((out / "concepts.json").read_text(encoding="utf-8"))
    assert {c["concept"]: c["category"] for c in concepts} == {
        "turtle": "Animals & Nature", "ox": "Animals & Nature", "basketball": "Activities"}
    rows = records(out)
    singles = [r for r in rows if r["kind"] == "single"]
    pairs = [r for r in rows if r["kind"] == "pair"]
    assert len(singles) == 6 and len(pairs) == 4
    assert {(r["concept"], r["style"]) for r in singles} == {
        (c, s) for c in ("turtle", "ox", "basketball") for s in ("google", "twitter")}
    ox = next(r for r in singles if r["concept"] == "ox" and r["style"] == "twitter")
    assert ox == {"file_name": "images/twitter_ox.png", "text": "ox",
                  "captions": ["ox", "an ox", "an ox emoji", "ox, twitter style", "an emoji of an ox"],
                  "concept": "ox", "style": "twitter", "category": "Animals & Nature", "kind": "single"}
    for r in pairs:
        left, right = r["concepts"]
        assert left != right and r["category"] == "pair" and r["style"] in ("google", "twitter")
        assert r["text"] == r["captions"][0] == f"{ec.with_article(left)} and {ec.with_article(right)}"
        assert f"{left} and {right}" in r["captions"] and r["file_name"].startswith(f"images/pair_{r['style']}_")
    files = sorted(p.name for p in (out / "images").iterdir())
    assert files == sorted(Path(r["file_name"]).name for r in rows)
    assert (out / "licenses" / "NOTICE-twemoji.txt").is_file()
    assert "CC-BY 4.0" in (out / "README.txt").read_text(encoding="utf-8")


def test_images_are_composited_on_white(cache, tmp_path):
    out = tmp_path / "emoji"
    assert build(cache, out, "--pairs", "2") == 0
    im = Image.open(out / "images" / "google_turtle.png")
    assert im.mode == "RGB" and im.size == (64, 64)
    assert im.getpixel((32, 40)) == (0, 160, 0)       # opaque disk unchanged
    assert im.getpixel((5, 40)) == (255, 255, 255)    # transparent -> white
    r, g, b = im.getpixel((32, 1))                    # alpha 128 red over white: 255·(1 − 128/255) ≈ 127
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1
    for row in records(out):
        pic = Image.open(out / row["file_name"])
        assert pic.mode == "RGB" and pic.size == (64, 64) and pic.getpixel((0, 63)) == (255, 255, 255)
    pair = next(r for r in records(out) if r["kind"] == "pair")
    pic = Image.open(out / pair["file_name"])
    left, right = (next(c[-1] for c in FAKE if c[4] == name) for name in pair["concepts"])
    assert pic.getpixel((16, 32)) == left and pic.getpixel((47, 32)) == right


def test_pairs_are_deterministic(cache, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert build(cache, a, "--pairs", "6", "--seed", "7") == 0
    assert build(cache, b, "--pairs", "6", "--seed", "7") == 0
    assert records(a) == records(b)
    for r in records(a):
        assert (a / r["file_name"]).read_bytes() == (b / r["file_name"]).read_bytes()


def test_category_flag_and_exclusions(cache, tmp_path):
    out = tmp_path / "emoji"
    assert build(cache, out, "--pairs", "0", "--categories", "default,smileys,people,symbols") == 0
    names = {c["concept"] for c in json.loads((out / "concepts.json").read_text(encoding="utf-8"))}
    assert names == {"turtle", "ox", "basketball", "grinning face", "waving hand", "recycling symbol"}
    assert not any("1f3fd" in p.name for p in (out / "images").iterdir())   # no skin-tone variant
    assert len([r for r in records(out) if r["concept"] == "waving hand"]) == 2
    with pytest.raises(SystemExit):
        build(cache, tmp_path / "x", "--categories", "flags")


def test_max_version(cache, tmp_path):
    out = tmp_path / "emoji"
    assert build(cache, out, "--pairs", "0", "--max-version", "15.0") == 0
    assert {r["concept"] for r in records(out)} == {"turtle", "basketball"}


def test_second_run_is_a_no_op(cache, tmp_path, capsys):
    out = tmp_path / "emoji"
    assert build(cache, out, "--pairs", "2") == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert pe.main(["--cache", str(cache), "--out", str(out), "--pairs", "2"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_failure_leaves_no_partial_output(cache, tmp_path, monkeypatch):
    out = tmp_path / "emoji"
    assert build(cache, out, "--pairs", "2") == 0
    good = records(out)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pe, "pair_image", broken)
    with pytest.raises(RuntimeError):
        build(cache, out, "--pairs", "3")
    with pytest.raises(RuntimeError):
        build(cache, tmp_path / "fresh", "--pairs", "3")
    assert records(out) == good                                  # the old dataset is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emoji"]  # no temp folder, no half-built "fresh"


def test_refuses_to_replace_a_foreign_folder(cache, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "keep.jpg").write_bytes(b"x")
    assert build(cache, out) == 1
    assert "not made by this script" in capsys.readouterr().err and (out / "keep.jpg").exists()


def fake_npm(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + body)
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)


def test_missing_npm_is_a_clear_error(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    cache, out = tmp_path / "cache", tmp_path / "emoji"
    assert build(cache, out) == 1
    err = capsys.readouterr().err
    assert "install node.js/npm" in err.lower() and str(cache) in err and "emoji-datasource-google-16.0.0.tgz" in err
    assert not out.exists()


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch, capsys):
    fake_npm(tmp_path / "bin", 'echo "npm error 404 Not Found - GET https://registry.npmjs.org/$2" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert build(tmp_path / "cache", tmp_path / "emoji") == 1
    err = capsys.readouterr().err
    assert "npm pack emoji-datasource-google@16.0.0" in err and "404 Not Found" in err
    assert not list((tmp_path / "cache").iterdir()) and not (tmp_path / "emoji").exists()


def test_downloads_with_npm_pack(cache, tmp_path, monkeypatch):
    # A stand-in npm that "downloads" NAME@VERSION by copying NAME-VERSION.tgz from the fake registry.
    fake_npm(tmp_path / "bin", f'[ "$1" = pack ] || exit 2\nspec="$2"\ncp "{cache}/${{spec%@*}}-${{spec##*@}}.tgz" .\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    fresh = tmp_path / "cache"
    assert build(fresh, tmp_path / "emoji", "--pairs", "1") == 0
    assert sorted(p.name for p in fresh.iterdir()) == sorted(p.name for p in cache.iterdir())


def test_corrupt_tarball_is_named(cache, tmp_path, capsys):
    bad = tmp_path / "cache"
    bad.mkdir()
    for p in cache.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "unicode-emoji-json-0.9.0.tgz").write_bytes(b"not a tarball")
    assert build(bad, tmp_path / "emoji") == 1
    assert "unicode-emoji-json-0.9.0.tgz is not a readable npm tarball" in capsys.readouterr().err


def test_contact_sheet(cache, tmp_path):
    out = tmp_path / "emoji"
    assert build(cache, out, "--pairs", "2") == 0
    sheet = Image.open(pe.contact_sheet(out, tmp_path / "sheet.png", cols=3, rows=2))
    assert sheet.size == (3 * (128 + 8) + 8, 2 * (128 + 30 + 8) + 8)
