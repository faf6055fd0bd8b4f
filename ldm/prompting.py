"""A1111's prompt syntax (``ldm.pipeline.prompting``): ``parse_emphasis(text)`` -> [[text, weight], ...]."""
from ldm.pipeline.prompting import extract_lora_tags, parse_emphasis  # noqa: F401   (the documented short path)
