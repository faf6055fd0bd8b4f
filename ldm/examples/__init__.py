"""Worked examples built from ldm's own pieces (not imported by ``import ldm``).

``ldm.examples.digits``: pixel-space diffusion on scikit-learn's 8×8 handwritten digits, trained in about a minute
on a CPU, with classifier-free and classifier guidance measured by a judge (see docs/how-diffusion-works.md).
"""
