"""Files that ship inside the package: the default model and its canny ControlNet, the CLIP BPE tokenizer files,
and their licences.

Callers read these paths as attributes (``assets.DEFAULT_MODEL``) when they need them, so a test can point
them elsewhere with one ``monkeypatch.setattr(ldm.assets, "DEFAULT_MODEL", ...)``.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "default"        # a diffusers folder: ldm's own emoji model (docs/default-model.md)
DEFAULT_CANNY = ROOT / "default-canny"  # its canny ControlNet (diffusers folder, fp16; docs/control.md)
TOKENIZER_DIR = ROOT / "tokenizer"      # vocab.json + merges.txt of OpenAI's CLIP BPE
DEFAULT_MODEL_NAME = "ldm-default"      # how images made with DEFAULT_MODEL name it in their metadata
