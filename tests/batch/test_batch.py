"""`ldm batch` on a tiny random model: plan, seeds, safe names, resume, refusals, full disk, SIGKILL, 2 processes."""

import errno
import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ldm.batch.manifest as mf
import ldm.batch.run as batch_run
from ldm.files import TMP_SUFFIX
from ldm.cli import main
from ldm.pipeline.png_info import read_png_info
from tiny_models import save_tiny_pipeline

REPO = Path(__file__).resolve().parents[2]
# 7 lines, mixed settings (a 24-pixel-wide line cannot share a batch), explicit and derived seeds
PROMPTS = ("a red apple\n"
           "# a comment, then a blank line\n"
           "\n"
           "a turtle playing basketball --s 5\n"
           "../../etc/passwd 🐢 --n \"blurry\"\n"
           "wide --w 24\n"
           "a blue cat --l 3\n"
           "a green dog --steps 3\n"
           "a tree\n")
LINES = [1, 4, 5, 6, 7, 8, 9]
FAST = ["--steps", "2", "--height", "16", "--width", "16", "--num", "2", "--batch-size", "3", "-q"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny model gains nothing from more, and on a shared CPU they only contend."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model", "sd1")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(PROMPTS, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(model, prompt_file, tmp_path_factory):
    """An uninterrupted single-process run: {file name: sha256}."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(["batch", str(prompt_file), "--out", str(out), "--model", str(model), *FAST]) == 0
    return out


def run(capsys, *argv):
    try:
        status = main(["batch", *map(str, argv)])
    except SystemExit as e:
        status = e.code
    captured = capsys.readouterr()
    return status, captured.err


def check_folder(out: Path) -> dict[str, str]:
    """Every manifest record names an existing PNG with the recorded sha256 that opens; every PNG has exactly one
    record; returns {file: sha256}."""
    records = mf.read_records(out / mf.MANIFEST)
    files = [r["file"] for r in records]
    assert len(files) == len(set(files)), "a file is recorded twice"
    assert len({(r["line"], r["image"]) for r in records}) == len(records), "an image is recorded twice"
    assert sorted(p.name for p in out.glob("*.png") if p.name != batch_run.GRID) == sorted(files)
    assert not list(out.glob(f".*{TMP_SUFFIX}")) and not list(out.glob("manifest.rank*"))
    for r in records:
        data = (out / r["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    return {r["file"]: r["sha256"] for r in records}


def test_splitmix64_and_line_seeds():
    assert batch_run.splitmix64(0) == 0xE220A8397B1DCDAF  # SplitMix64's first output from state 0 (reference value)
    seeds = [batch_run.line_seed(0, line) for line in range(1, 200)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**32 for s in seeds)
    assert batch_run.line_seed(0, 7) == batch_run.line_seed(0, 7) != batch_run.line_seed(1, 7)


def test_slugs_are_safe_bounded_and_stable():
    assert batch_run.slug("A Turtle, playing Basketball!") == "a-turtle-playing-basketball"
    assert batch_run.slug("../../etc/passwd") == "etc-passwd"
    assert batch_run.slug("🐢🐢🐢") == batch_run.slug("////") == batch_run.slug("..") == "prompt"
    assert batch_run.slug("café crème") == "cafe-creme"
    long = batch_run.file_name(12345, "word " * 2000, 2**64 - 1)
    assert long.startswith("12345-word-word") and len(long) <= 5 + 1 + 60 + 1 + 20 + 4
    for text in ("a/b\\c", "x\0y", "..", "\u202e evil", "CON"):
        name = batch_run.file_name(1, text, 0)
        assert "/" not in name and "\\" not in name and "\0" not in name and not name.startswith(".")


def test_run_writes_images_manifest_and_metadata_then_resumes(reference, model, prompt_file, capsys):
    files = check_folder(reference)
    records = {(r["line"], r["image"]): r for r in mf.read_records(reference / mf.MANIFEST)}
    assert sorted(records) == [(line, k) for line in LINES for k in range(2)]
    assert (records[4, 0]["seed"], records[4, 1]["seed"]) == (5, 6)  # an explicit seed: s, s+1
    assert records[1, 0]["seed"] == batch_run.line_seed(0, 1) and records[1, 1]["seed"] == batch_run.line_seed(0, 1) + 1
    assert records[6, 0]["width"] == 24 and records[8, 0]["steps"] == 3 and records[7, 0]["guidance"] == 3.0
    assert records[5, 0]["negative_prompt"] == "blurry" and records[5, 0]["file"].startswith("00005-etc-passwd-")
    info = read_png_info(reference / records[4, 1]["file"])
    assert (info.prompt, info.seed, info.steps, info.width, info.height) == ("a turtle playing basketball", 6, 2, 16,
                                                                             16)
    # the same command again: nothing to do, nothing rewritten
    stamps = {f: (reference / f).stat().st_mtime_ns for f in files}
    status, err = run(capsys, prompt_file, "--out", reference, "--model", model, *FAST)
    assert status == 0 and "14 images: 0 made, 14 already done, 0 failed" in err
    assert {f: (reference / f).stat().st_mtime_ns for f in files} == stamps


def test_an_image_depends_only_on_its_line(model, prompt_file, reference, tmp_path, capsys):
    """Batch size 1 vs 3: same seeds and file names; pixels equal to a direct Pipeline call to within 1/255."""
    from ldm import Pipeline

    out = tmp_path / "one"
    status, _ = run(capsys, prompt_file, "--out", out, "--model", model, *FAST[:-3], "--batch-size", "1", "-q")
    assert status == 0
    assert sorted(check_folder(out)) == sorted(check_folder(reference))
    pipe = Pipeline.from_pretrained(model)
    record = next(r for r in mf.read_records(out / mf.MANIFEST) if r["line"] == 5 and r["image"] == 1)
    (direct,) = pipe(record["prompt"], "blurry", 2, None, "dpmpp_2m", 16, 16, seed=record["seed"], progress=False)
    assert np.array_equal(np.asarray(Image.open(out / record["file"])), np.asarray(direct))
    mine = np.asarray(Image.open(reference / record["file"]), dtype=int)
    assert np.abs(mine - np.asarray(direct, dtype=int)).max() <= 1


def test_changed_file_or_settings_are_refused_until_overwrite(model, prompt_file, tmp_path, capsys):
    src = tmp_path / "p.txt"
    src.write_text("one\ntwo\nthree\n")
    out = tmp_path / "out"
    args = ["--out", out, "--model", model, "--steps", "2", "--height", "16", "--width", "16", "-q"]
    assert run(capsys, src, *args)[0] == 0
    old_files = set(check_folder(out))
    src.write_text("one\nTWO\nthree\nfour\n")
    status, err = run(capsys, src, *args)
    assert status == 2 and "changed line 2" in err and "added line 4" in err and "--overwrite" in err
    src.write_text("one\ntwo\nthree\n")
    status, err = run(capsys, src, *args[:-1], "--seed", "9", "-q")
    assert status == 2 and "seed: 0 -> 9" in err
    status, err = run(capsys, src, *args[:-1], "--seed", "9", "--overwrite", "-q")
    assert status == 0 and "3 made" in err
    new_files = set(check_folder(out))
    assert len(new_files) == 3 and not old_files & new_files  # the old images went with --overwrite


def test_mixed_errors_file_reports_every_line_before_any_model_loads(tmp_path, capsys):
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b'{"prompt": "fine"}\n'
                    b'{"prompt": "x", "sed": 1}\n'
                    b'{"prompt": "x", "seed": "one"}\n'
                    b'{"prompt": "x", "width": 30}\n'
                    b'{"prompt": ""}\n'
                    b'{"prompt": "\xff"}\n'
                    b'{broken\n'
                    b'{"prompt": "a\\u0000b"}\n')
    out = tmp_path / "out"
    status, err = run(capsys, src, "--out", out, "--model", tmp_path / "no-such-model")
    assert status == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    for n, words in [(2, "did you mean 'seed'"), (3, "seed must be an integer"), (4, "not divisible by 8"),
                     (5, "empty prompt"), (6, "not valid UTF-8"), (7, "invalid JSON"), (8, "NUL")]:
        assert any(line.startswith(f"{src}:{n}: ") and words in line for line in lines), (n, err)
    assert "7 invalid lines" in lines[-1] and "--skip-invalid" in lines[-1]
    assert not out.exists()  # nothing was made, not even the folder
    status, err = run(capsys, src, "--out", out, "--model", tmp_path / "no-such-model", "--skip-invalid")
    assert status == 2 and f"{src}:2: warning: line left out" in err and "no-such-model" in err.splitlines()[-1]


def test_skip_invalid_makes_the_good_lines_and_stdin_works(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"good\n--s x\nalso good --s 3\n")))
    out = tmp_path / "out"
    status, err = run(capsys, "-", "--out", out, "--model", model, "--steps", "1", "--height", "16", "--width",
                      "16", "--skip-invalid", "-q")
    assert status == 0 and "<stdin>:2: warning: line left out: empty prompt" in err
    assert "2 made" in err and "1 invalid lines left out" in err
    assert sorted(r["line"] for r in mf.read_records(out / mf.MANIFEST)) == [1, 3]


def test_unwritable_output_folder(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a\n")
    (tmp_path / "file").write_text("not a folder")
    status, err = run(capsys, tmp_path / "p.txt", "--out", tmp_path / "file" / "out")
    assert status == 2 and "cannot write to output folder" in err and len(err.strip().splitlines()) == 1


def test_full_disk_fails_cleanly_then_resumes(model, prompt_file, reference, tmp_path, capsys, monkeypatch):
    real, calls = mf.write_atomic, []

    def filling_disk(path, data):
        calls.append(path)
        if len(calls) > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    for module in (mf, batch_run):   # the plan record, then the images
        monkeypatch.setattr(module, "write_atomic", filling_disk)
    out = tmp_path / "out"
    status, err = run(capsys, prompt_file, "--out", out, "--model", model, *FAST)
    assert status == 2 and "Traceback" not in err
    assert "No space left on device" in err and str(out / "0000") in err and "run the same command again" in err
    assert len(mf.read_records(out / mf.MANIFEST)) == 3  # batch.json, then 3 images before the disk "filled"
    for module in (mf, batch_run):
        monkeypatch.setattr(module, "write_atomic", real)
    status, err = run(capsys, prompt_file, "--out", out, "--model", model, *FAST)
    assert status == 0 and "11 made, 3 already done" in err
    assert check_folder(out) == check_folder(reference)


def test_png_without_a_record_is_made_again(model, prompt_file, reference, tmp_path, capsys, monkeypatch):
    """A kill between the PNG's rename and its manifest record: the next run redoes (overwrites) the image."""
    real, calls = mf.ManifestWriter.append, []

    def killed_after_two(self, record):
        calls.append(record)
        if len(calls) > 2:
            raise KeyboardInterrupt
        real(self, record)

    monkeypatch.setattr(mf.ManifestWriter, "append", killed_after_two)
    out = tmp_path / "out"
    assert run(capsys, prompt_file, "--out", out, "--model", model, *FAST)[0] == 130
    assert len(list(out.glob("0*.png"))) == 3 and len(mf.read_records(out / mf.MANIFEST)) == 2
    monkeypatch.setattr(mf.ManifestWriter, "append", real)
    status, err = run(capsys, prompt_file, "--out", out, "--model", model, *FAST)
    assert status == 0 and "12 made, 2 already done" in err
    assert check_folder(out) == check_folder(reference)


def test_manifest_reader_skips_torn_lines_and_merge_deduplicates(tmp_path):
    (tmp_path / mf.MANIFEST).write_text('{"line": 2, "image": 0, "v": "old"}\n{"line": 1, "ima')
    mf.part_path(tmp_path, 1).write_text('{"line": 2, "image": 0, "v": "new"}\n{"line": 1, "image": 0}\n')
    records = mf.merge(tmp_path, lambda r: (r["line"], r["image"]))
    assert records == [{"line": 1, "image": 0}, {"line": 2, "image": 0, "v": "new"}]
    assert mf.read_records(tmp_path / mf.MANIFEST) == records and not list(tmp_path.glob("manifest.rank*"))


def _environment() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


# A process that pays for the imports once and then forks one `ldm batch` job per line it reads: it prints the
# job's pid, then its wait status. Each job is a real process the test can SIGKILL; forking only saves the
# seconds that importing torch and transformers takes. OMP_NUM_THREADS=1: no thread pool exists at the fork.
FORKER = """
import os, sys
from ldm.cli import main
from ldm.pipeline import Pipeline
Pipeline.from_pretrained(sys.argv[sys.argv.index("--model") + 1])  # every lazy import happens here, once
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            code = main(sys.argv[1:])
        except SystemExit as e:
            code = e.code
        sys.stderr.flush()
        os._exit(code or 0)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_images(model, prompt_file, reference,
                                                                              tmp_path):
    out = tmp_path / "out"
    argv = ["batch", str(prompt_file), "--out", str(out), "--model", str(model), *FAST]
    forker = subprocess.Popen([sys.executable, "-c", FORKER, *argv], env=_environment(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def job() -> int:
        forker.stdin.write("go\n")
        forker.stdin.flush()
        return int(forker.stdout.readline())

    try:
        rng, kills, statuses, start = random.Random(1234), 0, [], time.monotonic()
        while kills < 4 and (kills < 2 or time.monotonic() < start + 20) and time.monotonic() < start + 90:
            target = len(mf.read_records(out / mf.MANIFEST)) + rng.randint(1, 3)
            pid = job()
            while _alive(pid) and len(mf.read_records(out / mf.MANIFEST)) < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.1))  # somewhere in the next batch's sampling, PNG write or record
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
            status = int(forker.stdout.readline())
            statuses.append(status)
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                kills += 1
            elif os.WEXITSTATUS(status) == 0:
                break
        assert kills >= 2, f"only {kills} kill(s) landed before the job finished (wait statuses {statuses})"
        job()
        assert int(forker.stdout.readline()) == 0  # the resume finishes the batch
    finally:
        forker.kill()
        forker.wait()
    assert check_folder(out) == check_folder(reference)


def test_two_processes_make_exactly_the_images_one_process_makes(model, prompt_file, reference, tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "ldm", "batch", str(prompt_file), "--out", str(out), "--model", str(model),
                    *["--images" if a == "--num" else a for a in FAST]],  # torchrun reads --num as its --numa...
                   env=_environment(), check=True, capture_output=True, timeout=300)
    assert check_folder(out) == check_folder(reference)
    assert mf.read_records(out / mf.MANIFEST) == mf.read_records(reference / mf.MANIFEST)
