"""LyCORIS files (LoCon with and without the Tucker core, LoHa, LoKr) written by LyCORIS' own networks: the
image equals LyCORIS' own application (its modules running the diffusers pipeline's forward) within 2/255,
3×3 convolutions included."""
import numpy as np
import pytest
import torch
from adapter_files import diffusers_images, diffusers_pipeline, ldm_images, lycoris_network

from ldm import Pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = [("locon", {"conv_dim": 4, "conv_alpha": 1.0}),
         ("locon", {"conv_dim": 4, "conv_alpha": 1.0, "use_tucker": True}),
         ("loha", {"conv_dim": 2, "conv_alpha": 1.0}),
         ("loha", {"conv_dim": 2, "conv_alpha": 1.0, "use_tucker": True}),
         ("lokr", {"conv_dim": 2, "conv_alpha": 1.0, "factor": 4}),
         ("lokr", {"conv_dim": 2, "conv_alpha": 1.0, "factor": 4, "use_tucker": True, "decompose_both": True})]


@pytest.mark.parametrize("algo, options", CASES, ids=[f"{a}{'-tucker' if o.get('use_tucker') else ''}"
                                                      for a, o in CASES])
def test_lycoris_file_matches_lycoris(algo, options, sd1_folder, tmp_path):
    theirs = diffusers_pipeline(sd1_folder)
    net = lycoris_network(theirs, algo, tmp_path, multiplier=0.8, **options)
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    expected = diffusers_images(theirs)                            # LyCORIS' modules run the forward

    pipe = Pipeline.from_pretrained(sd1_folder)
    base = ldm_images(pipe)
    handle = pipe.load_lora(path, scale=0.8)
    assert handle.format == "LyCORIS" or algo == "locon"
    assert handle.layers == len(net.unet_loras) + len(net.text_encoder_loras)
    kernels = {tuple(p.target.shape) for k in pipe.adapters._patches.values() for p in k}
    assert any(len(s) == 4 and s[-1] == 3 for s in kernels)       # 3×3 convolutions were patched too
    ours = ldm_images(pipe)
    assert np.abs(ours - expected).max() <= 2 / 255
    assert np.abs(ours - base).max() > 0.03                      # well beyond the tolerance
    handle.remove()
    assert np.array_equal(ldm_images(pipe), base)
