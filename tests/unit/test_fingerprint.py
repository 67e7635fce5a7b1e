"""The encoder fingerprint that latent shards record: what it covers, its stability, where it is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from zturbo.backends import TorchBackend
from zturbo.config import ServeConfig
from zturbo.errors import UsageError
from zturbo.model import VAE, ModelConfig
from zturbo.distill.fingerprint import encoder_fingerprint
from zturbo.serve import build_index, encode_collection

CONFIG = ModelConfig(block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=1, latent_channels=4,
                     sample_size=16, mid_block_add_attention=False, patch_size=[2, 2])

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def _vae(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(CONFIG)


def test_fingerprint_covers_the_encoder_side_only():
    vae = _vae()
    base = encoder_fingerprint(vae)
    assert base.startswith("sha256:") and base == encoder_fingerprint(vae.state_dict(), vae.config)
    with torch.no_grad():
        # What encode(x).mean does not depend on: the decoder side and the latent normalisation.
        vae.decoder.conv_in.weight.add_(1.0)
        vae.post_quant_conv.bias.add_(1.0)
        vae.bn.running_mean.add_(1.0)
        vae.bn.running_var.mul_(2.0)
    vae.config = vae.config.model_copy(update={"scaling_factor": 0.5, "shift_factor": 0.1})
    assert encoder_fingerprint(vae) == base
    with torch.no_grad():  # one ulp of one encoder weight, and of the quant conv, each change it
        w = vae.encoder.conv_in.weight
        w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(float("inf")))
    nudged = encoder_fingerprint(vae)
    assert nudged != base
    with torch.no_grad():
        vae.quant_conv.bias.view(-1)[0] += 1e-3
    assert encoder_fingerprint(vae) not in (base, nudged)
    other = VAE(CONFIG.model_copy(update={"norm_num_groups": 2}))  # same shapes, other GroupNorm
    other.load_state_dict(_vae().state_dict())
    assert encoder_fingerprint(other) != base


def test_fingerprint_survives_save_and_load_and_hashes_values_not_storage(tmp_path):
    vae = _vae()
    fp32 = encoder_fingerprint(vae)
    assert encoder_fingerprint(VAE.from_pretrained(vae.save_pretrained(tmp_path / "fp32"))) == fp32
    # Stored in fp16 and read back into the fp32 model: every fp16 value is an fp32 value, so the
    # loaded model holds exactly the fp16 weights and hashes as the fp16 model itself does.
    half = {k: v.half() if v.is_floating_point() else v for k, v in vae.state_dict().items()}
    loaded = VAE.from_pretrained(vae.save_pretrained(tmp_path / "fp16", state_dict=half))
    assert loaded.encoder.conv_in.weight.dtype == torch.float32
    assert encoder_fingerprint(loaded) == encoder_fingerprint(half, CONFIG) == encoder_fingerprint(_vae().half())
    # Rounding to fp16 changed the weights (and so the latents): another model.
    assert encoder_fingerprint(loaded) != fp32


def test_backend_fingerprints_the_weights_before_casting_them():
    vae = _vae()
    fp32 = encoder_fingerprint(vae)
    backend = TorchBackend(vae, torch.device("cpu"), torch.bfloat16)
    assert backend.vae.encoder.conv_in.weight.dtype == torch.bfloat16
    assert backend.fingerprint == fp32


def _photos(folder: Path) -> Path:
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(folder / f"p{i}.png")
    return folder


def test_encode_records_the_fingerprint_and_refuses_to_mix_models(tmp_path):
    photos = _photos(tmp_path / "photos")
    cfg = ServeConfig(size=16, device="cpu", reading="phased")
    teacher, other = _vae(0), _vae(1)
    out = tmp_path / "latents"
    encode_collection(teacher, photos, out, cfg)
    index = json.loads((out / "index.json").read_text())
    assert index["encoder_fingerprint"] == encoder_fingerprint(_vae(0))
    # A rerun into the same folder with another model would mix two latent spaces.
    with pytest.raises(UsageError, match="other encoder weights"):
        encode_collection(other, photos, out, cfg)
    second = tmp_path / "latents2"
    encode_collection(_vae(1), photos, second, cfg)
    with pytest.raises(UsageError, match="another encoder"):
        build_index([out, second], tmp_path)
    assert not (tmp_path / "index.json").exists()
