"""Where coloured blobs ("droplets") in reconstructions come from, and what removes them.

    # per-layer activation spikes of a trained model on one photo
    python benchmarks/bench_droplets.py layers runs/demo/final --image zturbo/data/demo/gravel.png
    # the outlier metric per demo photo for one or more models (run folders, step-N, model folders)
    python benchmarks/bench_droplets.py score runs/demo runs/demo/checkpoints/step-250/ema
    # train a demo variant, changing one thing, then score it (in-process, same photos)
    OMP_NUM_THREADS=1 python benchmarks/bench_droplets.py ablate --name groups8 --set model.norm_num_groups=8
    OMP_NUM_THREADS=1 python benchmarks/bench_droplets.py ablate --name replicate --padding replicate --upsample nearest

``layers`` hooks every layer of the encoder and decoder and reports, for its output on
the photo's 128 px centre crop (what eval scores), the largest activation as a z-score
within its channel (how many of that channel's standard deviations the largest value
lies from its mean: a Gaussian map of 16k pixels rarely passes 5, a learned spike reaches
tens), its position in photo pixels, and the share of the channel's variance that the
3x3 neighbourhood of that position holds: GroupNorm divides the whole group by that
variance, so a spike that holds most of it sets the scale of everything else.

``score`` prints ``chroma_outlier`` (``zturbo.eval.chroma``) per demo photo with PSNR.

``reference`` gives the metric a scale: the same scores for JPEG (Pillow) at chosen
qualities, with 4:2:0 and 4:4:4 chroma, on the same 128 px crops. JPEG never invents colour
on a grey photo (it scores 0 there), so what it scores elsewhere is what plain colour error
at that PSNR costs in this metric, droplets or not.

``ablate`` trains the demo profile (``--set`` overrides as in bench_demo_quality.py)
with one change: a profile value, the border padding of every 3x3 convolution and of the
encoder's downsampling (``--padding``; training-time only, applied to the live model, so it
is scored here and not saved for diffusers), the upsampling kernel (``--upsample``), or the
normalisation (``--channel-norm``: per pixel over channels instead of GroupNorm, likewise
training-time only), or the training crop (``--crop N``: random N px crops of the photo as
resized for training, so no photo is seen twice at the same offset; pair it with a larger
``train.batch_size`` for the same pixels per step).
It scores the EMA model at every checkpoint, so one run shows whether the blobs grow with
steps, and appends one JSON line per checkpoint to ``--log``; each line also holds the
live (non-EMA) weights' scores and the EMA decoder's largest activation on gravel
(``activation_peak``: the residual-stream growth that breeds the blobs).

One script of about 700 lines on purpose: the probes, the scores and the ablations share
the photos, the model loading and the log format, and a reader follows one investigation.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import parse_set
from torch import nn

from zturbo.config import load_settings
from zturbo.data import demo_dir
from zturbo.data.datasets import ImageFolderDataset
from zturbo.data.images import DEFAULT_MAX_PIXELS
from zturbo.eval.chroma import chroma_outlier, chroma_outlier_map
from zturbo.eval.data import find_images, load_pixels
from zturbo.eval.metrics import psnr_uint8
from zturbo.model import VAE, load_pretrained
from zturbo.model.blocks import Downsample2D
from zturbo.train import Trainer

SIZE = 128


def load_model(path: Path) -> VAE:
    """A model folder, a step-N checkpoint (its EMA weights) or a run folder (its final model)."""
    for candidate in (path, path / "ema", path / "final"):
        if (candidate / "config.json").is_file():
            return load_pretrained(candidate).eval()
    raise SystemExit(f"{path}: no model folder (config.json) there, in ema/ or in final/")


def photos(size: int = SIZE) -> tuple[list[str], torch.Tensor]:
    """The demo photos' centre crops as eval takes them: names and uint8 (N, 3, size, size)."""
    paths = find_images(demo_dir(), None).paths
    return [p.name for p in paths], torch.stack([load_pixels(p, size, DEFAULT_MAX_PIXELS)[0] for p in paths])


@torch.no_grad()
def reconstruct(model: nn.Module, pixels: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """uint8 -> the model's mode reconstruction, clamped and rounded to 8 bits as eval does."""
    model.eval()
    out = []
    for chunk in pixels.split(batch):
        x = chunk.float() / 127.5 - 1.0
        recon = model.decode(model.encode(x).mode()).clamp(-1, 1)
        out.append(((recon + 1.0) * 127.5).round())
    return torch.cat(out)


def score(model: nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    recon = reconstruct(model, pixels)
    return {"chroma_outlier": chroma_outlier(recon, pixels.float()), "psnr": psnr_uint8(recon, pixels.float())}


# ---------------------------------------------------------------------------------------------------
# Per-layer spikes


def spike_stats(a: torch.Tensor, scale: int) -> dict:
    """The largest within-channel z-score of a (1, C, H, W) map, where it is and how much of its
    channel's variance the 3x3 neighbourhood around it holds."""
    a = a[0].double()
    c, h, w = a.shape
    dev = a - a.mean(dim=(1, 2), keepdim=True)
    std = dev.flatten(1).std(dim=1).clamp(min=1e-12)
    z = dev.abs() / std[:, None, None]
    flat = int(z.flatten().argmax())
    ch, y, x = flat // (h * w), (flat // w) % h, flat % w
    sq = dev[ch].pow(2)
    share = float(sq[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].sum() / sq.sum())
    return {
        "shape": [c, h, w], "max_abs": float(a.abs().max()), "z": float(z[ch, y, x]), "channel": ch,
        "at": [y * scale + scale // 2, x * scale + scale // 2], "var_share_3x3": share,
        # How many times its fair share (9 of h*w pixels) of the channel's variance the neighbourhood holds.
        "concentration": share * h * w / 9,
    }


def group_kurtosis(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, G) kurtosis of each GroupNorm group's values: E[d^4] / E[d^2]^2 with d the deviation from the
    group mean. 3 for a Gaussian; a spike holding most of a group's variance in a few pixels makes it
    large (a 3x3 spot holding 90% of a 16-channel 128 px map's variance: about 1500)."""
    d = x.double().flatten(2).reshape(x.shape[0], groups, -1)
    d = d - d.mean(dim=2, keepdim=True)
    second = d.pow(2).mean(dim=2)
    return d.pow(4).mean(dim=2) / second.pow(2).clamp(min=1e-30)


def offset_share(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, G) share of each GroupNorm group's variance that lies between its channels' means.

    Near 1: the group's channels sit at different constant levels and those offsets, not the
    image, set the normalising deviation (GroupNorm then scales the image's features by a
    nearly fixed amount). Near 0: the image's own variation sets it, and a spike can steer it.
    """
    d = x.double().reshape(x.shape[0], groups, x.shape[1] // groups, -1)
    total = d.flatten(2).var(dim=2, unbiased=False)
    return d.mean(dim=3).var(dim=2, unbiased=False) / total.clamp(min=1e-30)


@torch.no_grad()
def layer_report(model: VAE, pixels: torch.Tensor) -> list[dict]:
    """spike_stats of every leaf layer and block output, in call order."""
    rows: list[dict] = []
    hooks = []
    side = pixels.shape[-1]

    def hook(name):
        def record(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                rows.append({"layer": name, **spike_stats(output, side // output.shape[-1])})
                if isinstance(module, nn.GroupNorm):
                    rows[-1]["kurtosis"] = float(group_kurtosis(inputs[0], module.num_groups).max())
                    rows[-1]["offset_share"] = float(offset_share(inputs[0], module.num_groups).mean())
        return record

    for name, module in model.named_modules():
        if name and (not list(module.children()) or type(module).__name__ in ("ResnetBlock2D", "Attention")):
            if isinstance(module, (nn.Dropout, nn.SiLU)):
                continue
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        x = pixels.float() / 127.5 - 1.0
        model.eval()
        recon = model.decode(model.encode(x).mode()).clamp(-1, 1)
    finally:
        for h in hooks:
            h.remove()
    recon_u8 = ((recon + 1.0) * 127.5).round()
    outlier = chroma_outlier_map(recon_u8, pixels.float())[0]
    flat = int(outlier.flatten().argmax())
    half = 2  # the map's positions are 5x5 windows; report their centres
    rows.append({"layer": "chroma_outlier", "value": float(outlier.max()),
                 "at": [flat // outlier.shape[1] + half, flat % outlier.shape[1] + half]})
    return rows


def cmd_layers(args) -> None:
    model = load_model(args.model)
    pixels = load_pixels(args.image, args.size, DEFAULT_MAX_PIXELS)[0][None]
    rows = layer_report(model, pixels)
    print(f"{args.image.name} at {args.size} px, {args.model}")
    print(f"{'layer':<44}{'shape':>14}{'max|a|':>9}{'z':>8}{'ch':>4}{'at (y,x)':>11}{'var 3x3':>9}{'x fair':>8}")
    for r in rows:
        if r["layer"] == "chroma_outlier":
            print(f"chroma_outlier {r['value']:.1f} levels at {tuple(r['at'])}")
            continue
        flag = "  <-" if r["concentration"] >= args.flag else ""
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['layer']:<44}{shape:>14}{r['max_abs']:>9.2f}{r['z']:>8.1f}{r['channel']:>4}"
              f"{tuple(r['at'])!s:>11}{r['var_share_3x3']:>9.3f}{r['concentration']:>8.0f}{flag}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


# ---------------------------------------------------------------------------------------------------
# Scores per photo


def outlier_sheet(path: Path, pixels: torch.Tensor, recon: torch.Tensor, full_scale: float = 40.0) -> None:
    """Rows of photo | reconstruction | outlier map (full_scale chroma levels white), with the
    largest outlier's 5x5 window boxed in red on the reconstruction."""
    from PIL import Image, ImageDraw

    outlier = chroma_outlier_map(recon, pixels.float())
    pad = (pixels.shape[-1] - outlier.shape[-1]) // 2
    heat = F.pad(outlier / full_scale, (pad, pad, pad, pad)).clamp(0, 1).mul(255).round()
    tiles = []
    for i in range(len(pixels)):
        row = torch.cat([pixels[i].float(), recon[i], heat[i].expand(3, -1, -1)], dim=2)
        tile = Image.fromarray(row.permute(1, 2, 0).to(torch.uint8).numpy())
        flat = int(outlier[i].flatten().argmax())
        y, x = flat // outlier.shape[-1], flat % outlier.shape[-1]
        w = pixels.shape[-1]
        ImageDraw.Draw(tile).rectangle([w + x - 1, y - 1, w + x + 5, y + 5], outline=(255, 0, 0))
        tiles.append(tile)
    sheet = Image.new("RGB", (tiles[0].width, sum(t.height for t in tiles)))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (0, i * tile.height))
    sheet.save(path)


def cmd_score(args) -> None:
    names, pixels = photos(args.size)
    table = {}
    for path in args.models:
        model = load_model(path)
        table[str(path)] = score(model, pixels)
        if args.sheet:
            args.sheet.mkdir(parents=True, exist_ok=True)
            folder = args.sheet / path.as_posix().replace("/", "_")
            outlier_sheet(folder.with_suffix(".png"), pixels, reconstruct(model, pixels))
    print(f"{'photo':<34}" + "".join(f"{Path(k).name[-22:]:>24}" for k in table))
    for i, name in enumerate(names):
        print(f"{name:<34}" + "".join(f"{v['chroma_outlier'][i]:>14.1f}{v['psnr'][i]:>8.2f} dB" for v in table.values()))
    print(f"{'mean':<34}" + "".join(f"{v['chroma_outlier'].mean():>14.1f}{v['psnr'].mean():>8.2f} dB"
                                     for v in table.values()))
    print(f"{'max':<34}" + "".join(f"{v['chroma_outlier'].max():>14.1f}{'':>11}" for v in table.values()))


def jpeg_roundtrip(pixels: torch.Tensor, quality: int, subsampling: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the same photos through Pillow's JPEG encoder and decoder, as float."""
    import io

    import numpy as np
    from PIL import Image

    out = []
    for photo in pixels:
        buffer = io.BytesIO()
        Image.fromarray(photo.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=quality, subsampling=subsampling)
        decoded = np.array(Image.open(buffer).convert("RGB"))
        out.append(torch.from_numpy(decoded).permute(2, 0, 1))
    return torch.stack(out).float()


def cmd_reference(args) -> None:
    names, pixels = photos(args.size)
    grey = grey_mask(pixels)
    print(f"{'JPEG quality':>12} {'chroma':>7} {'PSNR (dB)':>10} {'chroma_outlier mean':>20} {'grey photos':>12} "
          f"{'colour photos':>14} {'max':>6}")
    for quality in args.qualities:
        for subsampling, label in ((2, "4:2:0"), (0, "4:4:4")):
            recon = jpeg_roundtrip(pixels, quality, subsampling)
            outlier = chroma_outlier(recon, pixels.float())
            psnr = psnr_uint8(recon, pixels.float())
            print(f"{quality:>12} {label:>7} {psnr.mean():>10.2f} {outlier.mean():>20.1f} {outlier[grey].mean():>12.1f} "
                  f"{outlier[~grey].mean():>14.1f} {outlier.max():>6.1f}")
            if args.per_photo:
                print("    " + ", ".join(f"{n} {o:.1f}" for n, o in zip(names, outlier.tolist())))


def grey_mask(pixels: torch.Tensor) -> torch.Tensor:
    """Which photos are grey (R = G = B everywhere): on those any chroma at all is invented."""
    return (pixels[:, 0] == pixels[:, 1]).flatten(1).all(1) & (pixels[:, 1] == pixels[:, 2]).flatten(1).all(1)


@torch.no_grad()
def activation_peak(part: nn.Module, model: VAE, photo: torch.Tensor) -> float:
    """The largest |activation| any layer of ``part`` (e.g. the decoder) outputs on one photo: how far the
    residual stream's levels have grown (GroupNorm reads it scale-free, fp16 ends at 65504)."""
    peak = [0.0]

    def record(module, inputs, output):
        if isinstance(output, torch.Tensor):
            peak[0] = max(peak[0], float(output.abs().max()))

    hooks = [m.register_forward_hook(record) for m in part.modules()]
    try:
        model.eval()
        model.decode(model.encode(photo.float() / 127.5 - 1.0).mode())
    finally:
        for h in hooks:
            h.remove()
    return peak[0]


def spike_summary(model: VAE, photo: torch.Tensor) -> dict:
    """The latent's spike (quant_conv output) and the most concentrated GroupNorm input of encoder and decoder."""
    rows = {r["layer"]: r for r in layer_report(model, photo) if r["layer"] != "chroma_outlier"}
    out = {"latent": rows["quant_conv"]}
    for part in ("encoder", "decoder"):
        norms = [r for name, r in rows.items() if name.startswith(part) and "kurtosis" in r]
        out[part] = max(norms, key=lambda r: r["concentration"])
        out[f"{part}_kurtosis"] = max(norms, key=lambda r: r["kurtosis"])
        out[f"{part}_offset_share"] = sum(r["offset_share"] for r in norms) / len(norms)
    return out


def cmd_steps(args) -> None:
    """How the spike and the outliers grow over a run's checkpoints."""
    from zturbo.train.checkpoint import step_folders

    names, pixels = photos(args.size)
    grey = grey_mask(pixels)
    probe = pixels[names.index(args.image)][None]
    folders = [(step, folder / "ema") for step, folder in step_folders(args.run / "checkpoints")]
    print(f"{args.run}: spike on {args.image} (concentration: x its fair share of variance; largest decoder "
          "GroupNorm kurtosis; decoder offset share), chroma_outlier")
    print(f"{'step':>6}{'latent':>8}{'enc GN':>8}{'dec GN':>8}{'dec k':>7}{'offsets':>8}{args.image:>12}"
          f"{'grey mean':>10}{'all mean':>9}{'PSNR':>7}")
    for step, folder in folders:
        model = load_model(folder)
        spikes = spike_summary(model, probe)
        values = score(model, pixels)
        outlier = values["chroma_outlier"]
        print(f"{step:>6}{spikes['latent']['concentration']:>8.0f}{spikes['encoder']['concentration']:>8.0f}"
              f"{spikes['decoder']['concentration']:>8.0f}{spikes['decoder_kurtosis']['kurtosis']:>7.0f}"
              f"{spikes['decoder_offset_share']:>8.2f}"
              f"{outlier[names.index(args.image)]:>12.1f}{outlier[grey].mean():>10.1f}{outlier.mean():>9.1f}"
              f"{values['psnr'].mean():>7.2f}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Ablations


_DOWNSAMPLE_ZEROS = Downsample2D.forward


def _downsample_replicate(self: Downsample2D, x: torch.Tensor) -> torch.Tensor:
    return self.conv(F.pad(x, (0, 1, 0, 1), mode="replicate"))


def apply_padding(model: nn.Module, mode: str) -> None:
    """Border padding of every padded convolution (read at call time) and of the downsampling pad."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.padding != (0, 0):
            module.padding_mode = mode
    if mode == "replicate":
        Downsample2D.forward = _downsample_replicate


class ChannelNorm(nn.GroupNorm):
    """An ablation: each pixel normalised over its channels (LayerNorm over C, ConvNeXt's), the same
    affine parameters as the GroupNorm it replaces. Its statistics are per pixel, so no spot
    elsewhere in the image can set them: StyleGAN2's argument for why removing image-wide
    normalisation removes droplets. Not a diffusers layer (training-time only, scored here)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True, unbiased=False)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


def apply_norm(model: nn.Module, where: str) -> None:
    """Swap the GroupNorms of the decoder (or both coders) for ChannelNorm, keeping their parameters."""
    parts = (model.decoder,) if where == "decoder" else (model.encoder, model.decoder)
    for part in parts:
        for module in part.modules():
            if isinstance(module, nn.GroupNorm):
                module.__class__ = ChannelNorm


class SpikePenalty:
    """A loss term on the kurtosis of every GroupNorm input (an ablation: larger, softer blobs evade it).

    A spike holding most of a group's variance in a few pixels makes the group's kurtosis
    E[d^4] / E[d^2]^2 run into the hundreds (``group_kurtosis``); the term is
    mean(relu(kurtosis / limit - 1)) over the GroupNorm calls of the recorded forward.
    """

    def __init__(self, model: nn.Module, limit: float = 30.0):
        self.limit, self.active, self.terms = limit, False, []
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.register_forward_pre_hook(self.record)

    def record(self, module: nn.GroupNorm, inputs: tuple[torch.Tensor, ...]) -> None:
        if not torch.is_grad_enabled():
            return
        # Computed on every call with autograd, kept only while recording: a checkpointed layer's
        # recompute in the backward must save the same tensors as its forward.
        excess = group_kurtosis(inputs[0], module.num_groups).float() / self.limit - 1.0
        term = excess.clamp(min=0).mean()
        if self.active:
            self.terms.append(term)

    def attach(self, engine, weight: float) -> None:
        """Record during the engine's forward; add ``weight`` x the term to its loss (logged as 'spike')."""
        forward, combine = engine.forward, engine.loss.combine

        def recorded_forward(*args, **kwargs):
            self.active = True
            try:
                return forward(*args, **kwargs)
            finally:
                self.active = False

        def combine_with_penalty(nll, kl, terms, *rest):
            spike, self.terms = torch.stack(self.terms).mean(), []
            terms["spike"] = spike.detach()
            return combine(nll, kl, terms, *rest) + weight * spike

        engine.forward, engine.loss.combine = recorded_forward, combine_with_penalty


def apply_crop(side: int) -> None:
    """Training crops of ``side`` px at a random place in the photo as resized for training (its shorter
    side at ``data.image_size``), not the whole resized photo: the model sees each photo at the scale it
    is scored at, but never twice at the same offset, so nothing can be tied to a place in the frame.
    The sample grid (centre crops, no generator) keeps the full size. Each photo counts four times
    per epoch, so a batch of smaller crops may hold more crops than there are photos."""
    whole = ImageFolderDataset._transform
    ImageFolderDataset.__len__ = lambda self: 4 * len(self.paths)  # __getitem__ wraps the index

    def transform(self, image, generator):
        tensor = whole(self, image, generator)
        if generator is None or not self.random_crop or tensor.shape[-1] <= side:
            return tensor
        top, left = (int(torch.randint(0, n - side + 1, (1,), generator=generator)) for n in tensor.shape[-2:])
        return tensor[..., top : top + side, left : left + side]

    ImageFolderDataset._transform = transform


def cmd_ablate(args) -> None:
    overrides = parse_set(args.set)
    train = overrides.setdefault("train", {})
    train.setdefault("output_dir", str(Path(args.runs) / args.name))
    train.setdefault("checkpoint_every", args.score_every)
    train.setdefault("keep_last", 1)
    overrides.setdefault("data", {}).setdefault("data_dir", str(demo_dir()))
    settings = load_settings(args.profile, None, overrides)
    names, pixels = photos(args.size)
    if args.crop:
        apply_crop(args.crop)
    trainer = Trainer(settings, quiet=True, resume=args.resume)
    if args.upsample:  # the kernel choice is the model's: the trained one and its EMA copy
        trainer.engine.vae.set_kernels(upsample=args.upsample)
        trainer.engine.ema.model.set_kernels(upsample=args.upsample)
    if args.padding != "zeros":
        if args.upsample != "nearest":
            raise SystemExit("--padding other than zeros needs --upsample nearest (the per-phase kernel pads with zeros)")
        apply_padding(trainer.engine.vae, args.padding)
        apply_padding(trainer.engine.ema.model, args.padding)
    if args.channel_norm:
        apply_norm(trainer.engine.vae, args.channel_norm)
        apply_norm(trainer.engine.ema.model, args.channel_norm)
    if args.spike_weight:
        SpikePenalty(trainer.engine.vae).attach(trainer.engine, args.spike_weight)
    scoring = 0.0
    records = []

    def on_step(step: int, result) -> None:
        nonlocal scoring
        if step % args.score_every and step != trainer.total_steps:
            return
        t = time.perf_counter()
        values = score(trainer.engine.ema.model, pixels)
        row = {
            "name": args.name, "step": step, "set": args.set, "padding": args.padding, "upsample": args.upsample,
            "spike_weight": args.spike_weight, "channel_norm": args.channel_norm, "crop": args.crop,
            "profile": args.profile,
            "chroma_outlier_mean": float(values["chroma_outlier"].mean()),
            "chroma_outlier_max": float(values["chroma_outlier"].max()),
            "psnr_mean": float(values["psnr"].mean()),
            "per_photo": {n: [round(float(c), 2), round(float(p), 2)]
                          for n, c, p in zip(names, values["chroma_outlier"], values["psnr"], strict=True)},
        }
        grey = grey_mask(pixels)
        row["chroma_outlier_grey_mean"] = float(values["chroma_outlier"][grey].mean())
        live = score(trainer.engine.vae, pixels)
        trainer.engine.vae.train()
        row["live"] = {"chroma_outlier_mean": float(live["chroma_outlier"].mean()),
                       "chroma_outlier_grey_mean": float(live["chroma_outlier"][grey].mean()),
                       "psnr_mean": float(live["psnr"].mean())}
        row["decoder_peak"] = activation_peak(trainer.engine.ema.model.decoder, trainer.engine.ema.model,
                                              pixels[names.index("gravel.png")][None])
        if step == trainer.total_steps:
            spikes = spike_summary(trainer.engine.ema.model, pixels[names.index("gravel.png")][None])
            row["spike_gravel"] = {k: round(spikes[k]["concentration"], 1) for k in ("latent", "encoder", "decoder")}
            row["spike_gravel"]["decoder_layer"] = spikes["decoder"]["layer"]
            row["spike_gravel"]["decoder_kurtosis"] = round(spikes["decoder_kurtosis"]["kurtosis"], 1)
            row["spike_gravel"]["decoder_offset_share"] = round(spikes["decoder_offset_share"], 3)
        records.append(row)
        scoring += time.perf_counter() - t
        print(f"{args.name} step {step}: chroma_outlier mean {row['chroma_outlier_mean']:.1f} (grey "
              f"{row['chroma_outlier_grey_mean']:.1f}) max {row['chroma_outlier_max']:.1f}, PSNR "
              f"{row['psnr_mean']:.2f} dB; live weights {row['live']['chroma_outlier_mean']:.1f} (grey "
              f"{row['live']['chroma_outlier_grey_mean']:.1f}); decoder peak {row['decoder_peak']:.3g}", flush=True)

    class StopEarly(Exception):
        pass

    def on_step_or_stop(step: int, result) -> None:
        on_step(step, result)
        if args.stop_at and step >= args.stop_at:
            raise StopEarly

    trainer.on_step = on_step_or_stop
    train_s = None
    try:
        result = trainer.fit()
        train_s = round(result.wall_s - scoring, 1)
        print(f"{args.name}: {result.steps} steps in {train_s:.0f} s of training "
              f"(OMP threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f})")
    except StopEarly:
        print(f"{args.name}: stopped at step {args.stop_at} (checkpoints in {settings.train.output_dir})")
    if args.log:
        with open(args.log, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps({**row, "train_s": train_s}) + "\n" for row in records)


GREY_PHOTOS = ("brick.png", "camera.png", "cell.png", "clock_motion.png", "grass.png", "gravel.png")


# A GroupNorm input group with this kurtosis or more counts as spiked. Measured on the demo:
# freshly initialised models and a droplet-free trained one stay under 30 on every photo;
# the photos with droplets reach 78 to 1000.
SPIKED = 40.0


def spikes_per_photo(model: VAE, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per photo: the latent's spike concentration, and the largest GroupNorm-group kurtosis in encoder and decoder."""
    rows = [spike_summary(model, pixels[i : i + 1]) for i in range(len(pixels))]
    out = {"latent": torch.tensor([r["latent"]["concentration"] for r in rows])}
    for part in ("encoder", "decoder"):
        out[part] = torch.tensor([r[f"{part}_kurtosis"]["kurtosis"] for r in rows])
    out["offset_share"] = torch.tensor([r["decoder_offset_share"] for r in rows])
    return out


def load_variant(folder: Path, row: dict) -> VAE:
    """A saved ablation model, computed the way it was trained (upsampling kernel and padding)."""
    Downsample2D.forward = _DOWNSAMPLE_ZEROS
    model = load_model(folder)
    model.set_kernels(upsample=row["upsample"] or "subpixel")
    if row["padding"] != "zeros":
        apply_padding(model, row["padding"])
    return model


def cmd_table(args) -> None:
    """The ablation log as a table: each run's last record, with spikes measured on its saved final model
    over all fifteen photos: the latent's median spike concentration, the median of the largest GroupNorm
    kurtosis in encoder and decoder, how many photos pass SPIKED in the decoder (the droplet's way out), and the decoder's mean offset
    share on the four texture photos (brick, grass, gravel, clock)."""
    last: dict[str, dict] = {}
    for line in args.log.read_text().splitlines():
        row = json.loads(line)
        last[row["name"]] = row
    names, pixels = photos()
    textures = [names.index(n) for n in ("brick.png", "grass.png", "gravel.png", "clock_motion.png")]
    print(f"{'run':<22}{'steps':>6}{'latent':>7}{'enc k':>7}{'dec k':>7}{'spiked':>8}{'offsets':>8}{'gravel':>8}"
          f"{'grey':>7}{'all':>7}{'max':>7}{'PSNR':>7}{'train s':>8}")
    for name, row in last.items():
        final = args.log.parent / name / "final"
        if args.runs and name not in args.runs:
            continue
        if not final.is_dir():
            continue
        spikes = spikes_per_photo(load_variant(final, row), pixels)
        spiked = int((spikes["decoder"] >= SPIKED).sum())
        grey = [row["per_photo"][n][0] for n in GREY_PHOTOS]
        print(f"{name:<22}{row['step']:>6}{spikes['latent'].median():>7.0f}{spikes['encoder'].median():>7.0f}"
              f"{spikes['decoder'].median():>7.0f}{spiked:>5}/{len(names)}"
              f"{spikes['offset_share'][textures].mean():>8.2f}"
              f"{row['per_photo']['gravel.png'][0]:>8.1f}{sum(grey) / len(grey):>7.1f}"
              f"{row['chroma_outlier_mean']:>7.1f}{row['chroma_outlier_max']:>7.1f}{row['psnr_mean']:>7.2f}"
              f"{row['train_s'] or float('nan'):>8.0f}", flush=True)


def cmd_grid(args) -> None:
    """One row per ablation run: the chosen photos' reconstructions side by side (the photos on top)."""
    from PIL import Image

    last: dict[str, dict] = {}
    for line in args.log.read_text().splitlines():
        row = json.loads(line)
        last[row["name"]] = row
    names, pixels = photos()
    pick = torch.stack([pixels[names.index(n)] for n in args.photos])
    rows = [pick.float()]
    for name in args.runs or list(last):
        rows.append(reconstruct(load_variant(args.log.parent / name / "final", last[name]), pick))
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
    image = Image.fromarray(grid.permute(1, 2, 0).to(torch.uint8).numpy())
    image.resize((image.width * args.zoom, image.height * args.zoom), Image.Resampling.NEAREST).save(args.out)
    print(f"{args.out}: rows photos, {', '.join(args.runs or list(last))}")


def cmd_speed(args) -> None:
    """The trainer's full step (losses, AdamW, EMA) for the profile and a variant (--set), interleaved."""
    from zturbo.bench.timing import time_interleaved
    from zturbo.train.engine import TrainEngine

    device = torch.device("cpu")
    variants = {"profile": load_settings(args.profile, None, {}),
                "variant": load_settings(args.profile, None, parse_set(args.set))}
    batch = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    steps = []
    for settings in variants.values():
        engine = TrainEngine(settings, device, total_steps=10**6)
        counter = iter(range(10**9))
        steps.append(lambda engine=engine, counter=counter: engine.step(batch, next(counter)))
    timings = time_interleaved(steps, device, warmup=2, repeats=args.repeats, alternate=True)
    for name, timing in zip(variants, timings, strict=True):
        print(f"{name:<8} {timing.median_ms:8.1f} ms per step (median of {args.repeats})")
    print(f"variant / profile: {timings[1].median_ms / timings[0].median_ms:.3f} ({', '.join(args.set)}; "
          f"{args.profile}, batch {args.batch}, {args.size} px, {torch.get_num_threads()} threads)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("layers", help="per-layer activation spikes on one photo")
    p.add_argument("model", type=Path)
    p.add_argument("--image", type=Path, default=demo_dir() / "gravel.png")
    p.add_argument("--size", type=int, default=SIZE)
    p.add_argument("--flag", type=float, default=50.0,
                   help="mark layers whose spike neighbourhood holds this many times its fair share of variance")
    p.add_argument("--json", type=Path)
    p.set_defaults(handler=cmd_layers)
    p = sub.add_parser("score", help="chroma_outlier and PSNR per demo photo")
    p.add_argument("models", type=Path, nargs="+")
    p.add_argument("--size", type=int, default=SIZE)
    p.add_argument("--sheet", type=Path, help="write photo | reconstruction | outlier map sheets into this folder")
    p.set_defaults(handler=cmd_score)
    p = sub.add_parser("reference", help="the metric's scale: JPEG at chosen qualities on the same photos")
    p.add_argument("--qualities", type=int, nargs="+", default=[5, 10, 20, 40])
    p.add_argument("--size", type=int, default=SIZE)
    p.add_argument("--per-photo", action="store_true")
    p.set_defaults(handler=cmd_reference)
    p = sub.add_parser("steps", help="spike and outliers at every checkpoint of a run")
    p.add_argument("run", type=Path)
    p.add_argument("--image", default="gravel.png")
    p.add_argument("--size", type=int, default=SIZE)
    p.set_defaults(handler=cmd_steps)
    p = sub.add_parser("table", help="the ablation log as a table")
    p.add_argument("runs", nargs="*", help="run names from the log (default: all)")
    p.add_argument("--log", type=Path, default=Path("runs/droplets/log.jsonl"))
    p.set_defaults(handler=cmd_table)
    p = sub.add_parser("grid", help="the ablation runs' reconstructions of chosen photos, one row per run")
    p.add_argument("runs", nargs="*", help="run names from the log (default: all)")
    p.add_argument("--photos", nargs="+", default=["brick.png", "clock_motion.png", "grass.png", "gravel.png",
                                                   "cell.png", "chelsea.png"])
    p.add_argument("--log", type=Path, default=Path("runs/droplets/log.jsonl"))
    p.add_argument("--zoom", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/droplets/grid.png"))
    p.set_defaults(handler=cmd_grid)
    p = sub.add_parser("speed", help="training step time of the profile against a variant, interleaved")
    p.add_argument("--profile", default="demo")
    p.add_argument("--set", action="append", default=[], help="the variant, e.g. model.norm_num_groups=2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=SIZE)
    p.add_argument("--repeats", type=int, default=20)
    p.set_defaults(handler=cmd_speed)
    p = sub.add_parser("ablate", help="train a demo variant with one change and score it")
    p.add_argument("--name", required=True)
    p.add_argument("--profile", default="demo")
    p.add_argument("--set", action="append", default=[], help="profile override, e.g. model.norm_num_groups=8")
    p.add_argument("--padding", choices=("zeros", "replicate"), default="zeros")
    p.add_argument("--upsample", choices=("subpixel", "nearest"))
    p.add_argument("--spike-weight", type=float, default=0.0, help="weight of SpikePenalty in the loss (0: off)")
    p.add_argument("--channel-norm", choices=("decoder", "both"),
                   help="replace GroupNorm by a per-pixel norm over channels in the decoder or both coders")
    p.add_argument("--crop", type=int, help="train on random crops of this side of the resized photos")
    p.add_argument("--stop-at", type=int, help="stop after this step (the schedule still spans max_steps)")
    p.add_argument("--resume", help="continue the run from its newest checkpoint ('auto') or a step-N folder")
    p.add_argument("--score-every", type=int, default=250)
    p.add_argument("--size", type=int, default=SIZE)
    p.add_argument("--runs", default="runs/droplets")
    p.add_argument("--log", type=Path, default=Path("runs/droplets/log.jsonl"))
    p.set_defaults(handler=cmd_ablate)
    args = parser.parse_args()
    args.handler(args)


if __name__ == "__main__":
    main()
