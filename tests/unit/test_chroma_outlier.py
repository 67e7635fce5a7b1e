"""chroma_outlier: the largest local colour a reconstruction invents, against closed forms."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from zturbo.backends import Backend
from zturbo.cli import run
from zturbo.config import EvalConfig
from zturbo.eval import evaluate
from zturbo.eval.chroma import OUTLIER_REACH, OUTLIER_WINDOW, chroma, chroma_outlier, chroma_outlier_map
from zturbo.eval.metrics import higher_is_better


def _grey(h: int = 48, w: int = 48, seed: int = 0) -> torch.Tensor:
    """A grey textured photo (R = G = B), uint8-valued float (1, 3, H, W)."""
    g = torch.Generator().manual_seed(seed)
    level = torch.randint(40, 216, (1, 1, h, w), generator=g).float()
    return level.expand(1, 3, h, w).clone()


def _colour(h: int = 48, w: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, h, w), generator=g).float()


def test_grey_has_no_chroma_and_chroma_is_linear():
    assert chroma(_grey()).abs().max() < 1e-4
    a, b = _colour(seed=1), _colour(seed=2)
    # Linear in RGB: a blend's chroma is the blend of the chromas (why a blur scores 0).
    assert torch.allclose(chroma(0.3 * a + 0.7 * b), 0.3 * chroma(a) + 0.7 * chroma(b), atol=1e-3)


def test_a_green_spot_on_grey_scores_its_mean_chroma_over_the_window():
    photo = _grey()
    recon = photo.clone()
    spot = torch.tensor([-20.0, 30.0, -20.0])  # greener than grey, luma roughly kept
    recon[0, :, 10:15, 20:25] += spot[:, None, None]  # exactly one 5x5 window
    cb, cr = chroma(spot.view(1, 3, 1, 1)).flatten().tolist()
    expected = math.hypot(cb, cr)  # the photo's chroma is 0 everywhere: the whole spot is outside
    assert chroma_outlier(recon, photo).item() == pytest.approx(expected, rel=1e-4)
    # Smaller spots count by the share of the window they fill.
    small = photo.clone()
    small[0, :, 10:11, 20:21] += spot[:, None, None]
    assert chroma_outlier(small, photo).item() == pytest.approx(expected / OUTLIER_WINDOW**2, rel=1e-3)


def test_blurs_and_small_shifts_of_a_colour_photo_score_zero():
    photo = _colour(64, 64, seed=3)
    kernel = torch.full((3, 1, 3, 3), 1 / 9)
    blurred = F.conv2d(F.pad(photo, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    # Away from the border (where the padding weighs the edge pixels twice) a 3x3 blur's 5x5 means
    # are averages of the photo's 5x5 means one pixel around, inside their range.
    assert chroma_outlier_map(blurred, photo)[:, 1:-1, 1:-1].max() < 1e-3
    r = OUTLIER_REACH
    shifted = torch.roll(photo, shifts=(r, -r), dims=(2, 3))  # shifted[y, x] = photo[y - r, x + r]
    assert chroma_outlier_map(shifted, photo)[:, r:, :-r].max() < 1e-3  # where nothing wrapped round
    assert chroma_outlier_map(torch.roll(photo, 2 * r, dims=2), photo)[:, 2 * r :].max() > 1  # too far
    # A colour that exists nowhere in the photo does not score zero.
    cast = photo.clone()
    cast[..., 20:30, 20:30] = torch.tensor([0.0, 255.0, 0.0])[:, None, None]
    assert chroma_outlier(cast, photo).item() > 0


def test_map_shape_and_small_images():
    photo = _grey(20, 30)
    assert chroma_outlier_map(photo, photo).shape == (1, 20 - OUTLIER_WINDOW + 1, 30 - OUTLIER_WINDOW + 1)
    tiny = _grey(4, 4)
    assert math.isnan(chroma_outlier(tiny, tiny).item())
    assert not higher_is_better("chroma_outlier")


class TintBackend(Backend):
    """Encode is the identity; decode adds a green square to every image."""

    name = "tint"

    def __init__(self):
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.downsample_factor = 8
        self.latent_channels = 3

    @classmethod
    def load(cls, model, **options):
        return cls()

    def encode(self, images):
        return images.clone()

    def decode(self, latents):
        out = latents.clone()
        out[:, 1, 8:16, 8:16] += 0.4  # +51 levels of green
        return out


def test_eval_reports_chroma_outlier(tmp_path, capsys):
    data = tmp_path / "photos"
    data.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(60, 200, (32, 32), dtype=np.uint8), "L").save(data / "grey.png")
    report = evaluate(TintBackend(), data, EvalConfig(size=32, metrics=["psnr", "chroma_outlier"], device="cpu"))
    value = report.per_image[0]["model"]["chroma_outlier"]
    cb, cr = chroma(torch.tensor([0.0, 51.0, 0.0]).view(1, 3, 1, 1)).flatten().tolist()
    assert value == pytest.approx(math.hypot(cb, cr), rel=0.02)  # a full 5x5 window inside the square
    assert report.summary["model"]["chroma_outlier"]["worst"][0]["name"] == "grey.png"


def test_cli_accepts_chroma_outlier(tmp_path, capsys):
    from zturbo.commands.eval import parse_metrics
    from zturbo.model import VAE

    assert parse_metrics("psnr,chroma-outlier") == (["psnr", "chroma_outlier"], None)
    model = VAE(block_out_channels=[8, 8], norm_num_groups=4, layers_per_block=1, latent_channels=4,
                mid_block_add_attention=False).save_pretrained(tmp_path / "m")
    data = tmp_path / "photos"
    data.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(data / "a.png")
    rc = run(["eval", str(model), "--data", str(data), "--size", "16", "--metrics", "chroma_outlier", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)["summary"]["model"]["chroma_outlier"]
    assert math.isfinite(summary["mean"]) and summary["mean"] >= 0


DROPLETS = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize(
    ("name", "box"),
    # Each file is photo | demo reconstruction (128 px each); box: (top, bottom, left, right) of the
    # droplet in the reconstruction as seen by eye (gravel: the ringed droplet at the top left; brick:
    # the green square near the bottom).
    [("gravel", (0, 28, 18, 48)), ("brick", (92, 128, 46, 76))],
)
def test_real_droplets_score_where_they_are(name, box):
    pair = torch.from_numpy(np.array(Image.open(DROPLETS / f"droplet_{name}.png").convert("RGB")))
    pair = pair.permute(2, 0, 1).float()[None]
    photo, recon = pair[..., :128], pair[..., 128:]
    assert (photo[:, 0] == photo[:, 1]).all() and (photo[:, 1] == photo[:, 2]).all()  # grey photos
    outlier = chroma_outlier_map(recon, photo)[0]
    y, x = divmod(int(outlier.argmax()), outlier.shape[1])
    centre_y, centre_x = y + OUTLIER_WINDOW // 2, x + OUTLIER_WINDOW // 2
    top, bottom, left, right = box
    assert top <= centre_y < bottom and left <= centre_x < right
    # 10 chroma levels of colour on a grey photo is plainly visible.
    assert chroma_outlier(recon, photo).item() > 10
    # The same reconstruction without its colour (luma kept) invents nothing: 0 up to the float32
    # rounding of the YCbCr matrix on 0..255 values (a few 1e-5 levels).
    greyed = recon.mean(dim=1, keepdim=True).expand_as(recon)
    assert chroma_outlier(greyed, photo).item() < 1e-4
