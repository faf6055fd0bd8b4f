"""A1111's names for the newer samplers and schedules, both ways: request fields -> ldm, ldm -> infotext."""

import pytest

from ldm.pipeline.png_info import GenerationInfo, info_from_parameters
from ldm.samplers import SAMPLERS
from ldm.serve import a1111
from ldm.serve.spec import FieldError


@pytest.mark.parametrize("label,name", [("LCM", "lcm"), ("UniPC", "unipc"), ("DPM++ SDE", "dpmpp_sde"),
                                        ("DPM++ 3M SDE", "dpmpp_3m_sde"), ("DPM++ 2S a", "dpmpp_2s_a"),
                                        ("LMS", "lms"), ("TCD", "tcd")])
def test_sampler_labels(label, name):
    assert a1111.sampler_from(label, None) == (name, None)
    assert a1111.sampler_from(name, "Automatic") == (name, None)
    assert {"name": label, "aliases": [name], "options": {}} in a1111.samplers()


@pytest.mark.parametrize("scheduler,spacing", [("SGM Uniform", "sgm_uniform"), ("sgm_uniform", "sgm_uniform"),
                                               ("Simple", "simple"), ("simple", "simple"), ("Beta", "beta"),
                                               ("Align Your Steps", "ays"), ("align_your_steps", "ays"),
                                               ("Karras", "karras"), ("Uniform", None)])
def test_scheduler_names_and_labels(scheduler, spacing):
    assert a1111.sampler_from("Euler", scheduler) == ("euler", spacing)


def test_schedulers_listing_uses_a1111_names():
    listed = {s["name"]: s["label"] for s in a1111.schedulers()}
    assert {"sgm_uniform": "SGM Uniform", "simple": "Simple", "beta": "Beta",
            "align_your_steps": "Align Your Steps"}.items() <= listed.items()
    assert all(a1111.sampler_from("Euler", name)[0] == "euler" for name in listed)
    with pytest.raises(FieldError, match="scheduler 'Cosine' is not available; use Automatic, Uniform, Karras"):
        a1111.sampler_from("Euler", "Cosine")


def test_every_sampler_has_an_a1111_name():
    assert all(name in {alias for s in a1111.samplers() for alias in s["aliases"]} for name in SAMPLERS)


@pytest.mark.parametrize("sampler,spacing,text", [("unipc", "sgm_uniform", "Sampler: UniPC, Schedule type: SGM Uniform"),
                                                  ("lcm", "lcm", "Sampler: LCM"),
                                                  ("dpmpp_3m_sde", "ays_sdxl", "Schedule type: Align Your Steps"),
                                                  ("tcd", "beta", "Sampler: TCD, Schedule type: Beta")])
def test_infotext_round_trip(sampler, spacing, text):
    info = GenerationInfo(prompt="a turtle", seed=3, steps=4, sampler=sampler, guidance=1.5, width=64, height=64,
                          spacing=spacing, eta=0.3 if sampler == "tcd" else 0.0)
    parameters = info.to_parameters()
    assert text in parameters
    back = info_from_parameters(parameters)
    # LCM's grid is the sampler's own (no A1111 schedule type); "Align Your Steps" reads back as the family-neutral
    # "ays", which the pipeline resolves to the model's table
    expected = {"lcm": None, "ays_sdxl": "ays"}.get(spacing, spacing)
    assert (back.sampler, back.spacing, back.eta) == (sampler, expected, info.eta)
