"""Prompt files: the three formats and stdin, and every kind of bad line reported as file:line with a reason."""

import io

import pytest

from ldm.batch.prompt_file import long_prompts, parse_prompts, read_prompt_file
from ldm.models.tokenizer import bundled_tokenizer

SAMPLERS = ("ddim", "dpmpp_2m", "euler", "euler_a")


def parse(data, name="p.txt", fmt=None):
    return parse_prompts(data if isinstance(data, bytes) else data.encode(), name, fmt, samplers=SAMPLERS)


def errors(result):
    return {p.line: p.message for p in result.errors}


def test_txt_prompts_comments_and_per_line_options():
    text = ("# a comment\n"
            "\n"
            "a red apple\n"
            "a cat's hat, 8k --n \"blurry, dark\" --s 42 --w 64 --h 32 --l 7.5 --steps 3 --sampler euler\r\n"
            "--prompt \"quoted -- prompt\" --seed=7 --cfg_scale 2\n"
            "  spaced   out  \n")
    result = parse(text)
    assert result.errors == [] and result.format == "txt"
    lines = {p.line: p for p in result.lines}
    assert sorted(lines) == [3, 4, 5, 6]
    assert lines[3].prompt == "a red apple" and lines[3].options == {}
    assert lines[4].prompt == "a cat's hat, 8k"  # an apostrophe in the prompt needs no quoting
    assert lines[4].options == {"negative_prompt": "blurry, dark", "seed": 42, "width": 64, "height": 32,
                                "guidance": 7.5, "steps": 3, "sampler": "euler"}
    assert (lines[5].prompt, lines[5].options) == ("quoted -- prompt", {"seed": 7, "guidance": 2.0})
    assert lines[6].prompt == "spaced   out"


def test_mixed_file_every_error_names_its_line_and_good_lines_survive():
    data = ("good one\n"                                    # 1
            "bad seed --s 1.5\n"                            # 2
            "bad size --w 100\n"                            # 3
            "--s 5\n"                                       # 4  options but no prompt
            "typo --sed 4\n"                                # 5
            "bad sampler --sampler eular\n"                 # 6
            ).encode() + b"caf\xe9 latin-1\n" + (          # 7
            "a/../../etc/passwd\x00x\n"                     # 8
            "unclosed --n \"abc\n"                          # 9
            "twice --s 1 --s 2\n"                           # 10
            "missing value --steps\n"                       # 11
            "zero steps --steps 0\n"                        # 12
            "good two --s 3\n").encode()                    # 13
    result = parse(data, "mixed.txt")
    found = errors(result)
    assert sorted(found) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert "seed must be an integer" in found[2] and "'1.5'" in found[2]
    assert "100 is not divisible by 8" in found[3] and "96" in found[3]
    assert found[4] == "empty prompt"
    assert "unknown option '--sed'" in found[5] and "did you mean '--seed'" in found[5]
    assert "unknown sampler 'eular'" in found[6] and "did you mean 'euler'" in found[6]
    assert "not valid UTF-8" in found[7] and "0xe9" in found[7] and "column 4" in found[7]
    assert "NUL" in found[8]
    assert "closing quotation" in found[9]
    assert "seed given twice" in found[10]
    assert "--steps needs a value" in found[11]
    assert "steps must be at least 1" in found[12]
    assert all(str(p).startswith(f"mixed.txt:{p.line}: ") for p in result.errors)
    assert [(p.line, p.prompt) for p in result.lines] == [(1, "good one"), (13, "good two")]


def test_jsonl_errors_unknown_keys_suggest_the_nearest():
    data = ('{"prompt": "a", "seed": 3, "negative_prompt": "b", "guidance": 5, "width": 16}\n'   # 1
            '{"prompt": "b", "sed": 3, "cfg_scale": 2}\n'                                        # 2
            '{"prompt": "c",}\n'                                                                  # 3
            '["not", "an", "object"]\n'                                                           # 4
            '{"prompt": "   "}\n'                                                                 # 5
            '{"prompt": "d", "seed": "x"}\n'                                                      # 6
            '{"prompt": "e", "seed": 1, "seed": 2}\n'                                             # 7
            '{"prompt": "f", "height": 12}\n'                                                     # 8
            '{"prompt": "g", "seed": 4.0}\n'                                                      # 9
            '{"prompt": 5}\n'                                                                     # 10
            '{"prompt": "h", "seed": null, "steps": true}\n'                                      # 11
            '# comments and blank lines are allowed\n\n'
            '{"prompt": "i", "seed": -1}\n')                                                      # 14
    result = parse(data, "p.jsonl")
    found = errors(result)
    assert sorted(found) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14]
    assert "'sed' (did you mean 'seed'?)" in found[2] and "'cfg_scale' (did you mean 'guidance'?)" in found[2]
    assert found[3].startswith("invalid JSON") and "column" in found[3]
    assert "expected a JSON object" in found[4]
    assert found[5] == "empty prompt"
    assert "seed must be an integer" in found[6]
    assert "'seed' appears twice" in found[7]
    assert "height 12 is not divisible by 8" in found[8]
    assert "seed must be an integer, got 4.0" in found[9]
    assert "prompt must be a string" in found[10]
    assert "steps must be an integer, got true" in found[11]
    assert "outside [0, 2**64)" in found[14]
    (line,) = result.lines
    assert line.options == {"seed": 3, "negative_prompt": "b", "guidance": 5.0, "width": 16}


def test_csv_header_rows_and_multiline_cells():
    data = ("\ufeffprompt,seed,negative_prompt,steps\n"   # 1 (Excel's byte-order mark)
            '"a, quoted\nprompt",5,,\n'                     # 2-3: one row over two lines
            "b,x,,\n"                                       # 4
            "c,,neg,2\n"                                    # 5
            "d,1\n"                                         # 6 too few fields
            ",,,\n")                                        # 7 blank row: skipped
    result = parse(data, "p.csv")
    assert errors(result) == {4: "seed must be an integer, got 'x'",
                              6: "row has 2 fields but the header (line 1) names 4"}
    assert [(p.line, p.prompt, p.options) for p in result.lines] == [
        (2, "a, quoted\nprompt", {"seed": 5}), (5, "c", {"negative_prompt": "neg", "steps": 2})]
    bad_header = parse("prompt,sede,cfg\nx,1,2\n", "h.csv")
    messages = [str(p) for p in bad_header.errors]
    assert any("h.csv:1: unknown column 'sede' (did you mean 'seed'?)" in m for m in messages)
    assert any("unknown column 'cfg' (did you mean 'guidance'?)" in m for m in messages)
    assert any("n.csv:1: the header has no 'prompt' column" in str(e) for e in parse("text\nx\n", "n.csv").errors)


def test_long_prompt_warns_and_is_kept_whole():
    result = parse("word " * 2000 + "\nshort\n")
    assert result.errors == []
    (warning,) = result.warnings
    assert warning.line == 1 and "2000 tokens" in str(warning) and "first 75" in str(warning)
    assert len(result.lines[0].prompt) == len("word " * 2000) - 1


def test_long_prompts_for_a_text_encoder_with_a_short_context():
    # a small model (ldm's default reads 30 tokens) cuts prompts the CLIP-length check lets through
    result = parse("a turtle\n" + "word " * 40 + "\n")
    assert result.warnings == []
    tokenizer = bundled_tokenizer()
    (warning,) = long_prompts(result, tokenizer, 30)
    assert warning.line == 2 and "40 tokens" in warning.message and "first 30" in warning.message
    assert long_prompts(result, tokenizer, 75) == []


def test_emoji_slashes_and_dots_are_valid_prompts():
    result = parse("🐢🐢🐢\n../../..\n////\n")
    assert result.errors == [] and [p.prompt for p in result.lines] == ["🐢🐢🐢", "../../..", "////"]


def test_read_from_files_and_stdin(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    assert read_prompt_file(str(tmp_path / "p.jsonl"), samplers=SAMPLERS).lines[0].prompt == "a"
    stdin = io.BytesIO(b'{"prompt": "from stdin", "seed": 2}\n')
    result = read_prompt_file("-", stdin=stdin, samplers=SAMPLERS)
    assert (result.source, result.format, result.lines[0].options) == ("<stdin>", "jsonl", {"seed": 2})
    assert read_prompt_file("-", "txt", stdin=io.BytesIO(b"plain\n"), samplers=SAMPLERS).lines[0].prompt == "plain"
    with pytest.raises(ValueError, match="does not exist"):
        read_prompt_file(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_prompt_file(str(tmp_path / "p.yaml"))
    with pytest.raises(ValueError, match="is a folder"):
        read_prompt_file(str(tmp_path), "txt")


def test_utf16_file_is_named_as_such():
    result = parse("a cat\n".encode("utf-16"))
    assert result.lines == [] and "UTF-16" in result.errors[0].message
