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


# ---- partial state dicts: a one-line ValueError naming the file, never a KeyError ------------

def small_kl_state():
    return build("sd15", block_out_channels=(32, 32), layers_per_block=1).state_dict()


@pytest.mark.parametrize("drop", [
    "decoder.",  # an encoder-only file
    "encoder.",  # a decoder-only file
    "decoder.conv_in.",  # the latent channel count must come from the encoder
    "encoder.down_blocks.0.",
    "decoder.up_blocks.",
    "encoder.conv_out.",
])
def test_partial_kl_refused_naming_missing_keys(tmp_path, drop):
    state = {k: v for k, v in small_kl_state().items() if not k.startswith(drop)}
    p = tmp_path / "sd15_partial.safetensors"
    save_file(state, p)
    expect_error(p, "missing", drop.rstrip("."))


def test_random_partial_kl_and_tiny_dicts_give_one_line_errors(tmp_path):
    """Random subsets of a KL single file and of a TAESD pair: always a ValueError naming the file."""
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        for kind, full in (("kl", small_kl_state()), ("tiny", tiny_state())):
            keys = sorted(full)
            keep = torch.rand(len(keys), generator=g) < (0.2 + 0.06 * i)
            state = {k: full[k] for k, m in zip(keys, keep) if m} or {keys[0]: full[keys[0]]}
            p = tmp_path / f"{kind}_sd15_{i}.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, p)
            expect_error(p)


def test_partial_taesd_pair_refused(tmp_path):
    enc = build("taesd", width=8).encoder.state_dict()
    dec = build("taesd", width=8).decoder.state_dict()
    last = max(int(k.split(".")[0]) for k in enc)
    enc = {k: v for k, v in enc.items() if not k.startswith(f"{last}.")}  # no final conv: no latent width
    torch.save(enc, tmp_path / "taesd_encoder.pth")
    torch.save(dec, tmp_path / "taesd_decoder.pth")
    expect_error(tmp_path / "taesd_encoder.pth", "missing", f"encoder.{last}.weight")


# ---- codec_config metadata ---------------------------------------------------------------------

@pytest.mark.parametrize("text,needle", [
    ("[1, 2]", "expected a JSON object"),
    ('"tiny"', "expected a JSON object"),
    ("{not json", "not JSON"),
    ('{"family": "vq"}', "expected family 'kl', 'tiny' or 'wan'"),
    ('{"family": "tiny", "latent_channels": "four"}', "latent_channels: expected a positive integer"),
    ('{"family": "tiny", "width": -8}', "width: expected a positive integer"),
    ('{"family": "kl", "block_out_channels": "abc"}', "block_out_channels: expected a non-empty list"),
    ('{"family": "tiny", "scaling_factor": 0}', "positive finite scaling_factor"),
    ('{"family": "tiny", "colour": 1}', "unknown TinyConfig fields colour"),
    ('{"family": "wan", "latents_mean": 5}', "latents_mean: expected null or a list of finite numbers"),
    ('{"family": "wan", "decoder_base_dim": [1.5]}', "decoder_base_dim: expected a positive integer"),
])
def test_bad_codec_config_metadata_refused(tmp_path, text, needle):
    p = tmp_path / "m.safetensors"
    save_file(tiny_state(), p, metadata={"codec_config": text})
    expect_error(p, "codec_config", needle)


def test_bad_config_json_refused(tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    save_file(small_kl_state(), folder / "diffusion_pytorch_model.safetensors")
    for text, needle in (("[]", "expected a JSON object"),
                         ('{"_class_name": "AutoencoderKLWan"}', "does not fit a wan autoencoder"),
                         ('{"act_fn": "gelu"}', "act_fn"), ('{"norm_num_groups": 0}', "norm_num_groups"),
                         ('{"_class_name": "AutoencoderTiny"}', "config.json describes a tiny")):
        (folder / "config.json").write_text(text)
        expect_error(folder, needle)


def test_widths_that_groups_do_not_divide_refused(tmp_path):
    """A single file carries no group count: 32 groups do not divide width 24, said in one line."""
    state = build("sd15", block_out_channels=(24, 24), norm_num_groups=8).state_dict()
    p = tmp_path / "sd15_vae.safetensors"
    save_file(state, p)
    expect_error(p, "cannot be built", "32 groups")
