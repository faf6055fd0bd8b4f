"""A1111 prompt syntax: parse_emphasis against A1111's documented examples and awkward inputs, chunking of
long prompts and BREAK, emphasis in the context, plain prompts bit-identical, <lora:...> tags."""
import numpy as np
import pytest
import torch

from ldm import Pipeline
from ldm.pipeline.prompting import chunk_tokens, extract_lora_tags, parse_emphasis
from ldm.prompting import parse_emphasis as reexported

pytestmark = pytest.mark.usefixtures("single_thread")

# A1111's parse_prompt_attention docstring examples, then awkward cases (derived by its documented rules).
CASES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
    ("", [["", 1.0]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1.0], ["b", 1.0]]),
    ("(a BREAK b)", [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]),
    ("BREAKfast", [["BREAKfast", 1.0]]),
    ("a \\ b", [["a  b", 1.0]]),
    ("trailing \\", [["trailing ", 1.0]]),
    ("\\\\(x)", [["\\", 1.0], ["x", 1.1]]),
    ("unopened) and ]", [["unopened) and ]", 1.0]]),
    ("[a:1.5]", [["a:1.5", 1 / 1.1]]),
    ("(word:abc)", [["word:abc", 1.1]]),
    ("(x:1.2.3)", [["x:1.2.3", 1.1]]),                      # A1111 raises here; ldm reads text
    ("a:1.2) b", [["a:1.2) b", 1.0]]),
    ("((a)", [["a", 1.2100000000000002]]),
    ("[[a]", [["a", 1 / 1.1 / 1.1]]),
    ("(red:1.5) [blue]", [["red", 1.5], [" ", 1.0], ["blue", 1 / 1.1]]),
]


@pytest.mark.parametrize("text, expected", CASES)
def test_parse_emphasis_matches_a1111(text, expected):
    assert parse_emphasis(text) == expected
    assert reexported is parse_emphasis


@pytest.mark.parametrize("text", ["((((", "))))", "[[[(", "(:", ":)", "\\", "(a:)", "<lora:", "[(])", "((a:1)b:2)"])
def test_unbalanced_and_odd_input_never_raises(text):
    assert all(isinstance(t, str) and isinstance(w, float) for t, w in parse_emphasis(text))


def test_chunks_break_after_a_late_comma_and_at_break():
    runs = [[[i] for i in range(70)] + [[999]] + [[i] for i in range(100, 110)], 1.0]
    chunks = chunk_tokens([tuple(runs)], 75, 999, set())
    assert [len(c.ids) for c in chunks] == [71, 10]                # moved the words after the comma along
    chunks = chunk_tokens([([[1], [2]], 1.0), ([], -1.0), ([[3]], 1.2)], 75, None, {1})
    assert [c.ids for c in chunks] == [[1, 2], [3]] and chunks[1].weights == [1.2]
    chunks = chunk_tokens([([[i] for i in range(74)] + [[7, 8, 9]], 1.0)], 75, None, set())
    assert [len(c.ids) for c in chunks] == [74, 3]                 # an embedding's vectors stay together


def test_lora_tags_are_removed_and_read():
    text, tags = extract_lora_tags("a cat <lora:style:0.8>, <lora:other> <lyco:x:0.5:0.25>")
    assert text == "a cat ,  " and [(t.name, t.text_encoder, t.unet) for t in tags] == [
        ("style", 0.8, 0.8), ("other", 1.0, 1.0), ("x", 0.5, 0.25)]


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return Pipeline.from_pretrained(sd1_folder)


def test_plain_prompt_is_bit_identical_and_emphasis_changes_the_context(pipe):
    te = pipe.text_encoder
    plain = pipe.encode_prompts(["a red apple on a table"])
    with torch.no_grad():
        assert torch.equal(plain, te(["a red apple on a table"]))
    weighted = pipe.encode_prompts(["a (red:1.5) apple on a table"])
    assert weighted.shape == plain.shape and not torch.equal(weighted, plain)
    assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-6)   # A1111 restores the mean
    off = Pipeline.from_pretrained(pipe.source, emphasis=False)
    assert not torch.equal(off.encode_prompts(["a (red:1.5) apple"]), pipe.encode_prompts(["a (red:1.5) apple"]))


def test_long_prompts_become_chunks_and_the_negative_is_padded(pipe):
    long = ", ".join(["a red apple"] * 20)                          # 79 tokens
    ctx = pipe.encode_prompts([long, "short"])
    assert ctx.shape[1] == 2 * 77
    empty = pipe.text_encoder([""])
    with torch.no_grad():
        assert torch.equal(ctx[1:, 77:], empty)                    # the short prompt padded with empty chunks
    broken = pipe.encode_prompts(["red apple BREAK blue sky"])
    assert broken.shape[1] == 2 * 77
    images = pipe([long], negative_prompt="blurry", steps=2, seed=0, output_type="np", progress=False)
    assert images.shape[0] == 1


def test_a1111_png_regenerated_from_png_uses_its_emphasis_and_lora_tag(sd1_folder, tmp_path):
    """An A1111 infotext with (x:1.5) and <lora:...>: `ldm generate --from-png` reads the emphasis and the tag
    (from --lora-dir), records Lora hashes, and --no-emphasis draws another image."""
    import subprocess
    import sys

    from adapter_files import diffusers_pipeline, peft_lora_file
    from PIL import Image, PngImagePlugin

    lora, _ = peft_lora_file(diffusers_pipeline(sd1_folder), tmp_path / "loras")
    lora.rename(tmp_path / "loras" / "style.safetensors")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a (red:1.5) apple <lora:style:0.8>\nNegative prompt: blurry\n"
                                "Steps: 3, Sampler: DDIM, CFG scale: 5, Seed: 7, Size: 32x32")
    Image.new("RGB", (32, 32)).save(tmp_path / "a1111.png", pnginfo=info)

    def generate(name, *flags):
        subprocess.run([sys.executable, "-m", "ldm", "generate", "--from-png", str(tmp_path / "a1111.png"),
                        "--model", str(sd1_folder), "--lora-dir", str(tmp_path / "loras"), "-q",
                        "-o", str(tmp_path / name), *flags], check=True, capture_output=True)
        return Image.open(tmp_path / name)

    ours = generate("ours.png")
    assert 'Lora hashes: "style: ' in ours.info["parameters"]
    pipe = Pipeline.from_pretrained(sd1_folder, lora_dir=tmp_path / "loras")
    same = pipe("a (red:1.5) apple <lora:style:0.8>", negative_prompt="blurry", steps=3, sampler="ddim",
                guidance=5, seed=7, height=32, width=32, progress=False)[0]
    assert abs(np.asarray(same, dtype=int) - np.asarray(ours, dtype=int)).max() <= 1
    literal = generate("literal.png", "--no-emphasis")
    assert np.asarray(literal).tolist() != np.asarray(ours).tolist()
    assert not pipe.adapters.owners()                              # the tag's LoRA came off after the call


def test_a_prompt_is_encoded_once_and_again_after_its_encoder_changes(pipe):
    conditioner, calls = pipe.conditioner, []
    conditioner.clear_cache()              # other tests drew prompts through this pipeline
    encode = conditioner._encode_one
    conditioner._encode_one = lambda *args: calls.append(args[0]) or encode(*args)
    try:
        run = dict(steps=2, height=32, width=32, progress=False, output_type="np")
        first = pipe("a (red:1.2) apple", seed=1, **run)
        again = pipe("a (red:1.2) apple", seed=1, **run)
        np.testing.assert_array_equal(first, again)                       # the very same conditions
        assert calls == ["a (red:1.2) apple", ""]                          # prompt and empty negative, once
        weight = pipe.text_encoder.input_embeddings().weight
        saved = weight.detach().clone()
        with torch.no_grad():                                               # a LoRA writes in place like this
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
        try:
            changed = pipe("a (red:1.2) apple", seed=1, **run)
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        assert calls[2:] == ["a (red:1.2) apple", ""] and np.abs(changed - first).max() > 1e-3
    finally:
        del conditioner._encode_one
