"""Control units as text (``ldm.batch.control_units``), a control folder as sd-webui-controlnet lists it, and
``Control(module=...)``: the preprocessor run inside the pipeline draws what the preprocessed image draws."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from control_fixtures import tiny_controlnet
from ldm import Control, Pipeline
from ldm.pipeline.control import control_info
from ldm.batch.control_units import ControlFiles, UnitSpec, a1111_hash, parse_unit, units_from_info, \
    units_from_value
from ldm.pipeline.preprocess import control_image


def test_unit_specs_from_text_and_objects():
    assert parse_unit("cn.safetensors:edges.png") == UnitSpec("cn.safetensors", "edges.png")
    spec = parse_unit("cn.pth:photo.jpg:0.8:0.1:0.9:module=canny:threshold_a=50:resize_mode=Crop and Resize")
    assert spec == UnitSpec("cn.pth", "photo.jpg", 0.8, 0.1, 0.9, module="canny", threshold_a=50.0,
                            resize_mode="Crop and Resize")
    assert parse_unit(r"C:\models\cn.pth:D:/img/e.png:0.5").model == r"C:\models\cn.pth"
    assert parse_unit(r"C:\models\cn.pth:D:/img/e.png:0.5").image == "D:/img/e.png"
    assert units_from_value([{"model": "a", "image": "b", "weight": 2}, "c:d:0.3"]) == [
        UnitSpec("a", "b", 2.0), UnitSpec("c", "d", 0.3)]
    for text, message in [("cn.pth", "expected MODEL:IMAGE"), ("a:b:x", "weight must be a finite number"),
                          ("a:b:1:0.9:0.1", "start and end must satisfy"), ("a:b:module=hed", "unknown preprocessor"),
                          ("a:b:colour=red", "unknown key 'colour'"), ("a:b:module=canny:0.5", "come before KEY"),
                          ("a:b:1:0:1:processor_res=8", "processor_res must be in"),
                          ("a:b:1:0:1:mode=louder", "mode must be")]:
        with pytest.raises(ValueError, match=message):
            parse_unit(text)
    with pytest.raises(ValueError, match=r"control\[1\]: unknown key\(s\) 'strength'"):
        units_from_value(["a:b", {"model": "a", "image": "b", "strength": 1}])


def test_a_control_folder_lists_models_as_a1111_titles(tmp_path):
    data = bytes(range(256)) * 4500   # > 1 MiB + 64 KiB
    (tmp_path / "Canny_Model.safetensors").write_bytes(data)
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "diffusers_cn").mkdir()
    (tmp_path / "diffusers_cn" / "config.json").write_text("{}")
    files = ControlFiles(tmp_path)
    digest = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]   # A1111's sd_models.model_hash
    assert a1111_hash(tmp_path / "Canny_Model.safetensors") == digest
    titles = files.titles()
    assert titles[0] == f"Canny_Model [{digest}]" and titles[1].startswith("diffusers_cn [")
    for name in ("canny_model", f"Canny_Model [{digest}]", "Canny_Model.safetensors", f"renamed [{digest}]"):
        assert files.find(name) == tmp_path / "Canny_Model.safetensors", name
    with pytest.raises(ValueError, match="no control model 'depth'.*available: Canny_Model, diffusers_cn"):
        files.resolve("depth")
    assert ControlFiles(tmp_path, allow_paths=False).find(str(tmp_path / "notes.txt")) is None
    with pytest.raises(ValueError, match="does not exist"):
        ControlFiles(tmp_path / "nope")


@pytest.fixture(scope="module")
def pipe_and_unit(sd1_folder, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("units") / "cn"
    tiny_controlnet(UNet2DConditionModel.from_pretrained(sd1_folder / "unet"), seed=5).save_pretrained(folder)
    pipe = Pipeline.from_pretrained(sd1_folder)
    return pipe, pipe.load_control(folder)


def test_a_module_runs_in_the_pipeline_and_is_recorded(pipe_and_unit):
    pipe, unit = pipe_and_unit
    a = np.full((40, 56, 3), 80, np.uint8)
    a[6:30, 10:34] = 220
    photo = Image.fromarray(a)
    run = dict(steps=3, guidance=5.0, sampler="euler", height=32, width=24, seed=3, progress=False)
    fields = dict(module="canny", resize_mode="Crop and Resize", processor_res=128, threshold_a=50, threshold_b=150)
    got = pipe("a box", control=Control(unit, photo, 0.9, **fields), **run)[0]
    edges = control_image(photo, "canny", 24, 32, "Crop and Resize", 128, 50, 150)
    assert edges.size == (24, 32) and np.asarray(edges).max() > 0
    expected = pipe("a box", control=Control(unit, edges, 0.9), **run)[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    info = control_info([Control(unit, photo, 0.9, **fields)])
    assert info["ControlNet 0"] == ("Module: canny, Model: cn, Weight: 0.9, Resize Mode: Crop and Resize, Processor "
                                    "Res: 128, Threshold A: 50.0, Threshold B: 150.0, Guidance Start: 0.0, Guidance "
                                    "End: 1.0, Control Mode: Balanced")
    # the infotext reads back into the same unit (less its image, which A1111 does not record either)
    (spec,) = units_from_info({"ControlNet 0": info["ControlNet 0"], "Lora hashes": "x"})
    assert spec == UnitSpec("cn", None, 0.9, module="canny", resize_mode="Crop and Resize", processor_res=128,
                            threshold_a=50.0, threshold_b=150.0)
    with pytest.raises(ValueError, match="Control.module: unknown preprocessor 'hed'"):
        Control(unit, photo, module="hed")
    with pytest.raises(ValueError, match="Control.resize_mode"):
        Control(unit, photo, resize_mode="Stretch")
