"""Key names of control files: ControlNet's original layout and TencentARC's T2I-Adapter layouts -> ours.

Ours are diffusers' (ControlNetModel, T2IAdapter). Each function maps one of *our* keys to the file's key, as
``ldm.checkpoints.keys`` does for SD files, so the loader enumerates our module's keys and any file key left over
is reported as unexpected.

ControlNet, original layout (lllyasviel's ``cldm.py``: ControlNet under ``control_model.``, or bare): the U-Net
copy keeps the U-Net's original names (``time_embed``, ``input_blocks``, ``middle_block``, SDXL's ``label_emb``);
then ``input_hint_block`` (Sequential of conv, SiLU, conv, ...: convolutions at even indices, the last one our
``conv_out``), ``zero_convs.i.0`` (our ``controlnet_down_blocks.i``) and ``middle_block_out.0`` (our
``controlnet_mid_block``): the pairing of diffusers' ``convert_controlnet_checkpoint``.

T2I-Adapter, TencentARC's layout (github.com/TencentARC/T2I-Adapter ``ldm/modules/encoders/adapter.py``):
``Adapter`` numbers its resnets flat (``body.{level·n + j}``, the level's 1×1 ``in_conv`` on its first), ours
nest them (``adapter.body.level.resnets.j``); ``Adapter_light`` nests as ours does, with ``body`` for
``resnets``. The pairing of diffusers' ``scripts/convert_original_t2i_adapter.py``.
"""
from __future__ import annotations

import re

from ldm.checkpoints.keys import unet_key

CONTROL_PREFIX = "control_model."                      # ControlNet inside an lllyasviel / A1111 .pth
HINT, ZERO_CONVS, MIDDLE_OUT = "input_hint_block.", "zero_convs.", "middle_block_out."
DIFFUSERS_CONTROLNET = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
T2I_DIFFUSERS_PREFIX = "adapter."

_CONTROL = re.compile(r"controlnet_(down_blocks\.(\d+)|mid_block)\.(weight|bias)")
_HINT = re.compile(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(weight|bias)")


def controlnet_key(key: str, layers_per_block: list[int], hint_blocks: int) -> str:
    """Our ControlNet key -> the original layout's key (without ``control_model.``)."""
    match = _HINT.fullmatch(key)
    if match:
        part, block, param = match.groups()
        index = 0 if part == "conv_in" else 2 * (hint_blocks + 1) if part == "conv_out" else 2 * (int(block) + 1)
        return f"{HINT}{index}.{param}"
    match = _CONTROL.fullmatch(key)
    if match:
        part, index, param = match.groups()
        return f"{MIDDLE_OUT}0.{param}" if part == "mid_block" else f"{ZERO_CONVS}{index}.0.{param}"
    return unet_key(key, layers_per_block, [])


_FULL = re.compile(r"adapter\.body\.(\d+)\.(in_conv|resnets\.(\d+))\.(.*)")
_LIGHT = re.compile(r"adapter\.body\.(\d+)\.resnets\.(.*)")


def t2i_key(key: str, adapter_type: str, num_res_blocks: int) -> str:
    """Our T2IAdapter key -> TencentARC's (full: ``Adapter``; light: ``Adapter_light``)."""
    if adapter_type == "light_adapter":
        match = _LIGHT.fullmatch(key)
        return (f"body.{match.group(1)}.body.{match.group(2)}" if match
                else key.removeprefix(T2I_DIFFUSERS_PREFIX))
    match = _FULL.fullmatch(key)
    if not match:
        return key.removeprefix(T2I_DIFFUSERS_PREFIX)
    level, part, j, rest = match.groups()
    first = int(level) * num_res_blocks
    if part == "in_conv":
        return f"body.{first}.in_conv.{rest}"
    return f"body.{first + int(j)}.{rest}"

