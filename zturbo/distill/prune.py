"""Channel pruning: a narrower encoder or decoder that starts from a wider one's weights.

Every tensor between two layers is a *site*: a set of channels that some layers write,
others read, and (almost always) a GroupNorm normalises. Channels that meet in a
residual add (a ResNet without a shortcut conv, the attention's residual) are one site,
so one choice of kept channels serves the whole residual stream; a shortcut conv, a
ResNet's inner conv and an up/down-sampling conv start new sites. The student keeps,
for each site, a subset of the teacher's channels of the student's width, and each of
its layers is the teacher's layer restricted to the kept input and output channels.

Importance of a channel: the sum, over every layer that touches it (convs and linears
that write it, convs and linears that read it, the GroupNorm scale that normalises it),
of that layer's mean absolute weight on the channel divided by the layer's mean of that
figure over all its channels, so wide and narrow layers weigh alike. A channel that is
written strongly, read strongly and scaled up by its norm ranks high.

GroupNorm: the student has the teacher's group count, so each student group has fewer
channels than the teacher's. Student group g takes the most important channels of
teacher group g (the same number from each group), in their original order. A student
group's statistics are then those of a subset of the channels the teacher's group
normalised together, the closest the narrower model can get to the teacher's; taking
the globally most important channels instead would mix channels from different teacher
groups into one student group and normalise them by statistics neither had. Sites no
GroupNorm sees (the attention's query/key and value spaces) keep their most important
channels overall. Pruning a model to its own widths keeps every channel: the student
is the teacher exactly.

In the attention, the score ``q.k / sqrt(d)`` changes scale with the width ``d``: the
student's query weights are scaled by ``sqrt(d_student / d_teacher)`` so its scores on
the kept dimensions equal the teacher's.

Calibration: restricting weights alone does not preserve the teacher's function. Every
layer reading a narrowed site loses the removed channels' contribution, and each student
GroupNorm group normalises by the statistics of fewer channels; the errors compound, and
on the demo model the pruned decoder starts no better than random weights. Given
calibration inputs (``prune_vae(..., images=...)``: training crops), every conv that reads
a narrowed site is then refit, in forward order, to reproduce the teacher's value of the
site it writes from the student's own input (``zturbo.distill.prune_fit``). The channel
choice stays the weight rule above: on the demo model, choosing by calibration activations
(mean |input| x the reader's weight norm) starts better without the refit but worse with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from zturbo.distill.prune_fit import refit
from zturbo.model.blocks import Attention, ResnetBlock2D
from zturbo.model.errors import UsageError
from zturbo.model.vae import VAE, Decoder, Encoder


@dataclass
class SiteGraph:
    """Which channels each layer of a coder reads and writes."""

    widths: list[int] = field(default_factory=list)  # site -> channel count
    grouped: set[int] = field(default_factory=set)  # sites a GroupNorm normalises
    layers: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)  # conv/linear -> (in, out)
    norms: dict[str, int] = field(default_factory=dict)  # GroupNorm -> site

    def site(self, width: int) -> int:
        self.widths.append(width)
        return len(self.widths) - 1

    def norm(self, name: str, site: int) -> None:
        self.norms[name] = site
        self.grouped.add(site)


def _resnet(g: SiteGraph, name: str, block: ResnetBlock2D, x: int) -> int:
    g.norm(f"{name}.norm1", x)
    inner = g.site(block.conv1.out_channels)
    g.layers[f"{name}.conv1"] = (x, inner)
    g.norm(f"{name}.norm2", inner)
    out = x
    if block.conv_shortcut is not None:
        out = g.site(block.conv2.out_channels)
        g.layers[f"{name}.conv_shortcut"] = (x, out)
    g.layers[f"{name}.conv2"] = (inner, out)
    return out


def _attention(g: SiteGraph, name: str, attn: Attention, x: int) -> None:
    g.norm(f"{name}.group_norm", x)
    qk, v = g.site(attn.to_q.out_features), g.site(attn.to_v.out_features)
    g.layers[f"{name}.to_q"] = (x, qk)
    g.layers[f"{name}.to_k"] = (x, qk)
    g.layers[f"{name}.to_v"] = (x, v)
    g.layers[f"{name}.to_out.0"] = (v, x)


def site_graph(coder: Encoder | Decoder) -> SiteGraph:
    """The sites of an Encoder or Decoder (layer names relative to it), from its layer plan.

    The first layer reads the coder's input and the last writes its output: neither is a site (their
    channels are the image's or the latent's, never pruned).
    """
    g = SiteGraph()
    names = {id(m): n for n, m in coder.named_modules()}
    plan = coder.plan()
    x: int | None = None
    for i, layer in enumerate(plan):
        if layer.kind == "conv":
            if layer.norm is not None:
                g.norm(names[id(layer.norm)], x)
            out = None if i == len(plan) - 1 else g.site(layer.cout)
            g.layers[layer.name] = (x, out)
            x = out
        elif layer.kind == "resnet":
            x = _resnet(g, layer.name, layer.module, x)
        elif layer.kind == "attention":
            _attention(g, layer.name, layer.module, x)
        elif layer.kind in ("downsample", "upsample"):
            out = g.site(layer.cout)
            g.layers[f"{layer.name}.conv"] = (x, out)
            x = out
        else:
            raise UsageError(f"pruning reads the AutoencoderKL family's layers; {layer.name} is a {layer.kind} layer",
                             "start this student from random weights (--init random)")
    return g


def _per_channel(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean |w| per channel along ``dim``, divided by its mean over the channels."""
    dims = [d for d in range(weight.dim()) if d != dim]
    score = weight.detach().float().abs().mean(dim=dims)
    return score / score.mean().clamp_min(1e-12)


def channel_importance(coder: Encoder | Decoder, graph: SiteGraph | None = None) -> list[torch.Tensor]:
    """One importance score per channel of every site (see the module docstring)."""
    graph = graph or site_graph(coder)
    scores = [torch.zeros(w) for w in graph.widths]
    modules = dict(coder.named_modules())
    for name, (src, dst) in graph.layers.items():
        weight = modules[name].weight
        if src is not None:
            scores[src] += _per_channel(weight, 1)
        if dst is not None:
            scores[dst] += _per_channel(weight, 0)
    for name, site in graph.norms.items():
        scores[site] += _per_channel(modules[name].weight.unsqueeze(1), 0)
    return scores


def kept_channels(scores: torch.Tensor, width: int, groups: int | None) -> torch.Tensor:
    """Indices of the ``width`` channels to keep, ascending; per GroupNorm group when ``groups``."""
    if groups is None:
        return scores.topk(width).indices.sort().values
    per_group, per_student = scores.numel() // groups, width // groups
    picks = scores.view(groups, per_group).topk(per_student, dim=1).indices.sort(dim=1).values
    return (picks + torch.arange(groups).unsqueeze(1) * per_group).flatten()


def check_prunable(teacher: list[int], student: list[int], what: str) -> None:
    """A student can start from a pruned teacher when it is nowhere wider and has the same shortcut convs."""
    if len(teacher) != len(student):
        raise UsageError(f"{what} widths {student} have {len(student)} levels, the teacher's {teacher} {len(teacher)}")
    wider = [(s, t) for s, t in zip(student, teacher) if s > t]
    if wider:
        raise UsageError(
            f"--init prune: {what} widths {student} are wider than the teacher's {teacher}",
            "pruning keeps a subset of the teacher's channels; use --init random for a wider student",
        )
    same_t = [a == b for a, b in zip(teacher, teacher[1:])]
    same_s = [a == b for a, b in zip(student, student[1:])]
    if same_t != same_s:
        raise UsageError(
            f"--init prune: {what} widths {student} change width between levels where the teacher's {teacher} "
            "does not (or the reverse), so their shortcut convs differ",
            "keep the teacher's pattern of equal neighbouring widths, or use --init random",
        )


@torch.no_grad()
def prune_into(teacher: Encoder | Decoder, student: Encoder | Decoder, groups: int,
               calibration: torch.Tensor | None = None) -> None:
    """Set every weight of ``student`` from ``teacher``'s most important channels (same layout, narrower).

    With ``calibration`` (the coder's input on real data), the convs that read a narrowed
    site are then refit to follow the teacher (``zturbo.distill.prune_fit.refit``).
    """
    tg, sg = site_graph(teacher), site_graph(student)
    if list(tg.layers) != list(sg.layers) or tg.norms != sg.norms:
        raise UsageError("the student's layers do not match the teacher's (levels, layers per block, attention)")
    scores = channel_importance(teacher, tg)
    keep = [
        kept_channels(scores[s], sg.widths[s], groups if s in tg.grouped else None) for s in range(len(tg.widths))
    ]
    t_mods, s_mods = dict(teacher.named_modules()), dict(student.named_modules())
    for name, (src, dst) in tg.layers.items():
        t, s = t_mods[name], s_mods[name]
        weight, bias = t.weight, t.bias
        if dst is not None:
            weight, bias = weight[keep[dst]], bias[keep[dst]]
        if src is not None:
            weight = weight[:, keep[src]]
        if name.endswith(".to_q"):
            ratio = math.sqrt(sg.widths[dst] / tg.widths[dst])
            weight, bias = weight * ratio, bias * ratio
        s.weight.copy_(weight)
        s.bias.copy_(bias)
    for name, site in tg.norms.items():
        s_mods[name].weight.copy_(t_mods[name].weight[keep[site]])
        s_mods[name].bias.copy_(t_mods[name].bias[keep[site]])
    narrowed = {s for s in range(len(tg.widths)) if sg.widths[s] < tg.widths[s]}
    if calibration is not None and narrowed:
        refit(teacher, student, tg.layers, keep, narrowed, calibration)


@torch.no_grad()
def copy_except(teacher: VAE, student: VAE, skip: tuple[str, ...]) -> None:
    """Copy every tensor of ``teacher`` into ``student`` but those of the top-level parts ``skip``."""
    own = student.state_dict()
    for key, value in teacher.state_dict().items():
        if key.split(".")[0] not in skip:
            own[key].copy_(value)


@torch.no_grad()
def prune_vae(teacher: VAE, student: VAE, parts: tuple[str, ...] = ("encoder", "decoder"),
              images: torch.Tensor | None = None) -> VAE:
    """``student`` (same architecture, narrower ``parts``) initialised from ``teacher``.

    The parts not pruned, the quant convs and the latent normaliser are copied unchanged
    (their shapes must match the teacher's). ``images`` (a batch in [-1, 1], e.g. training
    crops) calibrate the pruned layers: the encoder on them, the decoder on the teacher's
    latents of them.
    """
    cfg_t, cfg_s = teacher.config, student.config
    if cfg_t.norm_num_groups != cfg_s.norm_num_groups:
        raise UsageError("the student must have the teacher's norm_num_groups to be pruned from it")
    if "encoder" in parts:
        check_prunable(cfg_t.block_out_channels, cfg_s.block_out_channels, "encoder")
        prune_into(teacher.encoder, student.encoder, cfg_s.norm_num_groups, images)
    if "decoder" in parts:
        check_prunable(cfg_t.decoder_channels, cfg_s.decoder_channels, "decoder")
        prune_into(teacher.decoder, student.decoder, cfg_s.norm_num_groups, _decoder_input(teacher, images))
    copy_except(teacher, student, parts)
    return student


@torch.no_grad()
def _decoder_input(teacher: VAE, images: torch.Tensor | None) -> torch.Tensor | None:
    """What the teacher's decoder module reads for ``images``: the post-quant conv of their posterior mean."""
    if images is None:
        return None
    z = teacher.encode(images).mean
    return teacher.post_quant_conv(z) if teacher.post_quant_conv is not None else z
