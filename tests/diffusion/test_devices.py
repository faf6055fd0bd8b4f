"""ldm.devices: dtype names, and dtype="auto" choosing by the device and the CPU's flags."""

import pytest
import torch

from ldm import devices


def test_auto_picks_bf16_only_on_cpus_with_native_bf16(monkeypatch):
    for flags, expected in ((("avx2", "amx_bf16", "amx_tile"), torch.bfloat16), (("avx512f", "avx512_bf16"),
                            torch.bfloat16), (("avx2", "avx512f"), torch.float32), ((), torch.float32)):
        monkeypatch.setattr(devices, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert devices.resolve_dtype("auto") == expected, flags
        assert devices.resolve_dtype("AUTO", "cpu") == expected
    assert devices.auto_dtype("cuda") == torch.float16 and devices.auto_dtype("cuda:1") == torch.float16
    assert devices.auto_dtype("mps") == torch.float32


def test_default_stays_float32_and_names_are_checked():
    assert devices.resolve_dtype(None) == torch.float32
    assert devices.resolve_dtype("bf16") == devices.resolve_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="use auto or one of"):
        devices.resolve_dtype("fp8")


def test_cpu_flags_reads_this_machine():
    flags = devices.cpu_flags()
    assert isinstance(flags, frozenset)
    assert devices.cpu_has_native_bf16(frozenset({"avx512_bf16"})) and not devices.cpu_has_native_bf16(frozenset())


def test_the_vae_follows_auto_into_bf16_only(monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert devices.resolve_vae_dtype(None, "auto") == torch.bfloat16            # the fast setting, end to end
    assert devices.resolve_vae_dtype(None, "bfloat16") == torch.float32         # asked-for bf16 U-Net: VAE fp32
    assert devices.resolve_vae_dtype(None, None) == torch.float32
    assert devices.resolve_vae_dtype(None, "auto", "cuda") == torch.float32     # fp16 VAEs overflow
    assert devices.resolve_vae_dtype("bfloat16", None) == torch.bfloat16        # an explicit choice stands
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2"}))
    assert devices.resolve_vae_dtype(None, "auto") == torch.float32
