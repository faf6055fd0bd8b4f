"""Batch invariance at batch speed: an image is bitwise the same alone and among other prompts, in fp32 and bf16,
while the U-Net runs groups of images per call (Pipeline.micro_batch) instead of one image a call."""

import numpy as np
import pytest
from ldm import Pipeline

RUN = dict(steps=3, height=16, width=16, progress=False, output_type="np")
TARGET, OTHERS = "a turtle playing basketball", ["a red apple", "a blue car", "an owl", "a cup of tea", "a boat"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pipes(sd1_folder):
    return {dtype: Pipeline.from_pretrained(sd1_folder, dtype=dtype) for dtype in ("float32", "bfloat16")}


@pytest.fixture
def pipe(pipes):
    return pipes["float32"]


# One thread: several threads on maps this tiny are slow on a shared CPU (scripts/bench_pipeline.py
# --check-invariance checks the full-size models at the benchmark's thread count).
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_image_is_bitwise_the_same_alone_and_in_batches_of_3_4_and_6(pipes, dtype):
    pipe = pipes[dtype]
    for guidance in (7.5, 1.0):   # two rows an image (CFG), and one (padded to two when alone)
        alone = pipe(TARGET, seed=11, guidance=guidance, **RUN)[0]
        # position 1 of 3, last of 4 (one call of 4 images), 5th of 6 (the second group of a micro-batch of 4)
        for batch, at in ((3, 1), (4, 3), (6, 4)):
            prompts = OTHERS[:batch - 1]
            prompts.insert(at, TARGET)
            seeds = [100 + i for i in range(batch)]
            seeds[at] = 11
            images = pipe(prompts, seed=seeds, guidance=guidance, **RUN)
            np.testing.assert_array_equal(images[at], alone, err_msg=f"{pipe.dtype} batch {batch} at {at}")
            assert np.abs(images[at] - images[at - 1]).max() > 0.01   # the batch mates are other images


def test_the_sub_pixel_upsampler_keeps_an_image_independent_of_its_batch(pipe, monkeypatch):
    # The tiny model's maps never reach the sub-pixel threshold; lowered, every upsampler takes that path, and the
    # choice must still be the image's alone (it once counted the batch's rows: 8-row and 2-row calls differed).
    import ldm.models.upsample

    for threshold in (4, 8, 16, 32, 64, 128):   # some sit between a 2-row and an 8-row call's map sizes
        monkeypatch.setattr(ldm.models.upsample, "SUBPIXEL_MIN_POSITIONS", threshold)
        alone = pipe(TARGET, seed=11, **RUN)[0]
        images = pipe([OTHERS[0], OTHERS[1], OTHERS[2], TARGET], seed=[100, 101, 102, 11], **RUN)
        np.testing.assert_array_equal(images[3], alone, err_msg=f"threshold {threshold}")


def test_calls_carry_groups_of_images_never_a_single_row(pipe, monkeypatch):
    rows = []
    network = pipe._network
    monkeypatch.setattr(pipe, "_network", lambda x, t, **c: rows.append(x.shape[0]) or network(x, t, **c))
    pipe(OTHERS[:5], seed=0, steps=1, height=16, width=16, progress=False, output_type="latent")
    pipe(OTHERS[0], seed=0, steps=1, guidance=1.0, height=16, width=16, progress=False, output_type="latent")
    assert pipe.micro_batch == 4
    assert rows == [8, 2, 2]   # 5 images under CFG: 4 + 1 images; one image without CFG: its row twice


def test_bf16_images_are_within_2_of_255_of_float32(sd1_folder, pipe):
    fp32 = pipe(TARGET, seed=3, **RUN)
    for vae_dtype in ("float32", "bfloat16"):
        bf16 = Pipeline.from_pretrained(sd1_folder, dtype="bfloat16", vae_dtype=vae_dtype)(TARGET, seed=3, **RUN)
        assert np.abs(bf16 - fp32).mean() < 2 / 255, vae_dtype
