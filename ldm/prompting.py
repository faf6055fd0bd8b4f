"""A1111's prompt syntax (``ldm.pipeline.prompting``): ``parse_emphasis(text)`` -> [[text, weight], ...]."""
from ldm.pipeline.prompting import parse_emphasis  # noqa: F401
