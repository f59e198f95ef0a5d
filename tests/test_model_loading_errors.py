"""Strict loading: every bad checkpoint is a ValueError that names the file."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from codec.models import build, load_model


def tiny_state():
    return {f"encoder.{k}": v for k, v in build("taesd", width=8).encoder.state_dict().items()} | {
        f"decoder.{k}": v for k, v in build("taesd", width=8).decoder.state_dict().items()}


def expect_error(path, *needles):
    with pytest.raises(ValueError) as info:
        load_model(path)
    msg = str(info.value)
    assert str(path) in msg or os.path.basename(str(path)) in msg
    for n in needles:
        assert n in msg, msg
    assert "\n" not in msg
    return msg


def test_unet_checkpoint_refused(tmp_path):
    p = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, p)
    expect_error(p, "UNet")


def test_text_encoder_refused(tmp_path):
    p = tmp_path / "clip.safetensors"
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)}, p)
    expect_error(p, "text-encoder")


def test_missing_keys_refused(tmp_path):
    state = build("sd15", block_out_channels=(32, 32), norm_num_groups=8).state_dict()
    state.pop("decoder.conv_out.weight")
    p = tmp_path / "vae.safetensors"
    save_file(state, p)
    expect_error(p, "missing", "decoder.conv_out.weight")


def test_extra_keys_refused(tmp_path):
    state = build("sd15", block_out_channels=(32, 32), norm_num_groups=8).state_dict()
    state["decoder.surprise.weight"] = torch.zeros(1)
    p = tmp_path / "vae.safetensors"
    save_file(state, p)
    expect_error(p, "unexpected", "decoder.surprise.weight")


def test_shape_mismatch_refused(tmp_path):
    state = build("sd15", block_out_channels=(32, 32), norm_num_groups=8).state_dict()
    state["decoder.mid_block.resnets.0.conv1.bias"] = torch.zeros(7)
    p = tmp_path / "vae.safetensors"
    save_file(state, p)
    expect_error(p, "shape")


def test_truncated_safetensors_refused(tmp_path):
    p = tmp_path / "ok.safetensors"
    save_file(tiny_state(), p)
    data = p.read_bytes()
    q = tmp_path / "cut.safetensors"
    q.write_bytes(data[: len(data) // 2])
    expect_error(q, "safetensors")


def test_not_safetensors_refused(tmp_path):
    p = tmp_path / "fake.safetensors"
    p.write_text("this is not a checkpoint at all")
    expect_error(p, "safetensors")


def test_empty_file_refused(tmp_path):
    p = tmp_path / "empty.pth"
    p.write_bytes(b"")
    expect_error(p, "empty")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_refused(tmp_path):
    p = tmp_path / "evil_encoder.pth"
    with open(p, "wb") as f:
        pickle.dump({"0.weight": Evil()}, f)
    expect_error(p, "weights_only")


def test_unknown_source_and_preset_without_weights():
    with pytest.raises(ValueError, match="no such file"):
        load_model("/nonexistent/vae.safetensors")
    with pytest.raises(ValueError, match="pass a local file"):
        load_model("flux1")


def test_wrong_extension_refused(tmp_path):
    p = tmp_path / "vae.onnx"
    p.write_bytes(b"x")
    expect_error(p, ".safetensors")
