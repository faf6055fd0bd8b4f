"""The control-image preprocessors: canny (OpenCV) and the A1111 module registry."""

import numpy as np
import pytest
from PIL import Image

from ldm.pipeline.preprocess import DEPTH_ENV, MODULES, available_modules, canny, depth, get_module, preprocess


def _square(size=64, inner=(16, 48), value=255, background=0) -> Image.Image:
    a = np.full((size, size, 3), background, np.uint8)
    a[inner[0]:inner[1], inner[0]:inner[1]] = value
    return Image.fromarray(a)


def test_canny_marks_the_outline_of_a_square_white_on_black():
    edges = canny(_square())
    a = np.asarray(edges)
    assert edges.mode == "RGB" and edges.size == (64, 64)
    assert set(np.unique(a)) == {0, 255} and (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()
    on = np.argwhere(a[..., 0] == 255)
    # every edge pixel lies on the square's boundary (within a pixel), none inside or far outside it
    near_side = np.minimum(np.abs(on - 15.5).min(1), np.abs(on - 47.5).min(1))
    assert near_side.max() <= 1.0
    assert (on >= 14).all() and (on <= 49).all()
    assert len(on) >= 4 * 28       # the whole outline, not a few specks


def test_canny_thresholds_decide_which_steps_are_edges():
    faint = _square(value=25)   # a weak step of 25 grey levels: no edge at 100 / 200, an edge at 10 / 20
    assert not np.asarray(canny(faint)).any()
    assert np.asarray(canny(faint, low=10, high=20)).any()
    with pytest.raises(ValueError, match="low threshold 200 is above the high threshold 100"):
        canny(faint, 200, 100)
    with pytest.raises(ValueError, match="canny high threshold"):
        canny(faint, 10, float("nan"))


def test_canny_on_a_real_photo():
    from sklearn.datasets import load_sample_image

    photo = Image.fromarray(load_sample_image("china.jpg"))
    a = np.asarray(canny(photo))[..., 0] > 0
    assert a.shape == (photo.height, photo.width)
    assert 0.02 < a.mean() < 0.3   # a textured photo: a few percent of the pixels are edges


def test_modules_as_a1111_names_them():
    photo = _square(96, (20, 70))
    assert list(MODULES)[:2] == ["none", "canny"]
    assert preprocess("none", photo) is photo
    # processor_res: detected with the short side at that resolution (as sd-webui-controlnet's canny module)
    wide = _square(64).resize((128, 64))
    out = preprocess("canny", wide, resolution=128)
    assert out.size == (256, 128) and np.asarray(out).any()
    assert np.array_equal(np.asarray(preprocess("Canny", photo, None, 100, 200)), np.asarray(canny(photo)))
    assert [s["name"] for s in get_module("canny").sliders] == ["Resolution", "Canny Low Threshold",
                                                                 "Canny High Threshold"]
    with pytest.raises(ValueError, match="unknown preprocessor 'hed'; ldm has none, canny"):
        get_module("hed")
    with pytest.raises(ValueError, match="processor resolution"):
        preprocess("canny", photo, resolution=8)


def test_depth_from_a_local_transformers_folder(tmp_path, monkeypatch):
    """The depth module is transformers' depth-estimation pipeline on a model folder the user has (here a tiny
    random DPT); without one it says what it needs, and is not listed."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor, pipeline

    config = DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=16,
                       image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 8, 8],
                       fusion_hidden_size=8, reassemble_factors=[4, 2, 1, 0.5])
    DPTForDepthEstimation(config).save_pretrained(tmp_path)
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    photo = _square(64).resize((56, 40))
    got = depth(photo, tmp_path)
    expected = pipeline("depth-estimation", model=str(tmp_path))(photo)["depth"]
    assert got.mode == "RGB" and got.size == photo.size
    np.testing.assert_array_equal(np.asarray(got)[..., 0], np.asarray(expected))
    monkeypatch.delenv(DEPTH_ENV, raising=False)
    assert "depth" not in available_modules()
    with pytest.raises(ValueError, match="needs a transformers depth-estimation model folder"):
        preprocess("depth", photo)
    monkeypatch.setenv(DEPTH_ENV, str(tmp_path))
    assert "depth" in available_modules() and preprocess("depth", photo, resolution=64).size == (90, 64)
    with pytest.raises(ValueError, match="has no config.json"):
        depth(photo, tmp_path / "nope")
