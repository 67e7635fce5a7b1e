"""The training loop: data, steps, logging, samples and checkpoints, top to bottom.

    >>> from zturbo.config import load_settings
    >>> from zturbo.train import Trainer

    >>> settings = load_settings("demo")
    >>> result = Trainer(settings).fit()          # RUN_DIR/final/ holds the EMA model

Under torchrun pass ``dist_ctx=DistContext.from_env(os.environ)``; every rank
runs the same loop, rank 0 alone logs, samples and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from zturbo.config import Settings
from zturbo.console import info, progress
from zturbo.data.datasets import (
    ImageFolderDataset,
    ResumableSampler,
    load_batch,
    make_loader,
    split_data,
    steps_per_epoch,
)
from zturbo.data.images import tensor_to_uint8
from zturbo.data.jpeg_device import decode_on_device
from zturbo.errors import CheckpointError, InputError, UsageError
from zturbo.model import load_state_dict_strict
from zturbo.model.diffusers import config_from_diffusers
from zturbo.train import checkpoint as ckpt
from zturbo.train import distributed
from zturbo.train.distill import Distillation
from zturbo.train.distributed import DistContext
from zturbo.train.engine import StepResult, TrainEngine
from zturbo.utils import atomic_path, atomic_write_text, resolve_device


@dataclass
class TrainResult:
    run_dir: str
    final_dir: str | None
    steps: int
    start_step: int
    epochs_completed: float
    images_seen: int
    wall_s: float
    images_per_s: float
    first_loss: float | None
    last_loss: float | None
    last_terms: dict[str, float]
    skipped_steps: int
    micro_batch: int
    precision: str
    device: str
    world_size: int
    resumed_from: str | None
    checkpoints: list[str] = field(default_factory=list)
    peak_memory_gib: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Trainer:
    def __init__(
        self,
        settings: Settings,
        *,
        resume: str | os.PathLike | None = None,
        dist_ctx: DistContext | None = None,
        quiet: bool = False,
        lpips_random_backbone: bool = False,
        on_step: Callable[[int, StepResult], None] | None = None,
    ):
        self.settings = settings
        self.dist = dist_ctx or DistContext()
        self.quiet = quiet or not self.dist.is_main
        self.on_step = on_step
        tcfg, dcfg = settings.train, settings.data
        self.run_dir = Path(tcfg.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"

        device = resolve_device(tcfg.device)
        if device.type == "cuda" and self.dist.enabled:
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        distributed.setup(self.dist, device)
        # Distillation (zturbo.train.distill): a student in the teacher's latent space; its settings
        # carry the student's model config.
        self.distill = Distillation(settings, device, self._log) if settings.distill.teacher is not None else None
        if self.distill is not None:
            self.settings = settings = self.distill.settings

        if dcfg.data_dir is None:
            raise UsageError(
                "no training data given", "pass --data DIR (a folder of images or `zturbo prepare` output)"
            )
        if tcfg.batch_size % self.dist.world_size:
            raise UsageError(
                f"batch size {tcfg.batch_size} is not divisible by the {self.dist.world_size} processes",
                "the batch size is the effective batch over all processes; pick a multiple of the process count",
            )
        self.per_rank_batch = tcfg.batch_size // self.dist.world_size
        split = self.split = split_data(dcfg.data_dir, dcfg.val_images)
        # data.decode: JPEGs stay encoded for the device to decode (image folders; --latents pairs are read as pixels).
        self.device_decode = decode_on_device(dcfg.decode, device, split.train, dcfg.image_size)
        dataset = self.distill.dataset(split.train, dcfg.data_dir, dcfg.image_size) if self.distill else None
        if dataset is None:
            # uint8 crops: a quarter of the bytes through the workers and to the device (the engine scales them).
            dataset = ImageFolderDataset(split.train, dcfg.image_size, dcfg.random_crop, dcfg.random_flip,
                                         device_decode=self.device_decode, as_uint8=True)
        else:
            self.device_decode = False
        self.steps_per_epoch = steps_per_epoch(len(dataset), self.dist.world_size, self.per_rank_batch)
        if self.steps_per_epoch == 0:
            raise InputError(
                f"{len(dataset)} training images are fewer than the per-process batch of {self.per_rank_batch}",
                "add images or lower --batch-size",
            )
        self.sampler = ResumableSampler(dataset, self.dist.world_size, self.dist.rank, seed=tcfg.seed)
        self.loader = make_loader(
            dataset, self.sampler, self.per_rank_batch, dcfg.num_workers, pin_memory=device.type == "cuda"
        )
        self.total_steps = tcfg.max_steps or tcfg.epochs * self.steps_per_epoch
        warmup = (
            tcfg.warmup_steps
            if tcfg.warmup_steps is not None
            else round(tcfg.warmup_epochs * self.steps_per_epoch)
        )
        self.warmup_steps = min(warmup, self.total_steps)
        self.val_batch = load_batch(split.val, dcfg.image_size) if split.val and self.dist.is_main else None
        # As many training photos, evenly spaced, shown beside the held-out ones: what the model has learned
        # next to how it generalises.
        shown = split.train[:: max(1, len(split.train) // max(1, len(split.val)))][: len(split.val)]
        held = set(split.val)
        self.train_batch = (
            load_batch(shown, dcfg.image_size)
            if self.val_batch is not None and shown and not held.intersection(shown) else None
        )

        self.engine = TrainEngine(
            settings,
            device,
            dist_ctx=self.dist,
            model=self.distill.student if self.distill else None,
            forward_module=self.distill.forward if self.distill else None,
            lpips_random_backbone=lpips_random_backbone,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            per_rank_batch=self.per_rank_batch,
            log=self._log,
        )
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.resumed_from: Path | None = None
        self.resumed_step = 0
        self._prepare_run_dir(resume)
        self._writer = None
        self._history: list[float] = []

    # -- set-up ---------------------------------------------------------------------------------------
    def _prepare_run_dir(self, resume: str | os.PathLike | None) -> None:
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            removed = ckpt.remove_partial(self.ckpt_dir)
            if removed:
                self._log(f"removed {removed} incomplete checkpoint folder(s) from an interrupted save")
        distributed.barrier()
        source = ckpt.find_resume(self.run_dir, resume) if resume is not None else None
        if source is None:
            if resume is None and ckpt.step_folders(self.ckpt_dir):
                raise UsageError(
                    f"{self.run_dir} already holds checkpoints",
                    "pass --resume auto to continue that run, or choose another --output",
                )
            if resume is not None:
                self._log("no checkpoint to resume from: starting a new run")
            return
        self._resume_from(source)

    def _resume_from(self, path: Path) -> None:
        data = ckpt.load_checkpoint(path, self.device)
        saved = config_from_diffusers(data["model_config"]).model_dump()
        if saved != self.settings.model.model_dump():
            raise CheckpointError(
                f"checkpoint {path} was trained with a different model configuration",
                "resume with the same profile / config, or start a new run in another --output",
            )
        load_state_dict_strict(self.engine.vae, data["model"], str(path / "model"))
        state = data["state"]
        self.engine.ema.load_state_dict(data["ema"], int(state["ema_updates"]))
        if self.engine.disc is not None and "discriminator" in data:
            self.engine.disc.load_state_dict(data["discriminator"])
        self.engine.load_state(state)
        ckpt.set_rng_state(state["rng"])
        pos = state["position"]
        self.step, self.epoch, self.batch_in_epoch = (int(pos[k]) for k in ("step", "epoch", "batch_in_epoch"))
        self.resumed_from = path
        self.resumed_step = self.step
        if int(pos.get("world_size", 1)) != self.dist.world_size:
            self._log(
                f"the checkpoint was written by {pos['world_size']} process(es), this run has {self.dist.world_size}: "
                "training continues from its weights and optimizer state, but the data order differs from an "
                "uninterrupted run"
            )
        self._log(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")
        if self.dist.is_main:
            self._truncate_metrics(self.step)

    # -- logging --------------------------------------------------------------------------------------
    def _log(self, message: str) -> None:
        if not self.quiet:
            info(message)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines a killed run wrote after the checkpoint we resume from."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a kill
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))

    def _tensorboard(self):
        if self._writer is None and self.dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but keep training if it is broken
                self._writer = False
                self._log("tensorboard is not importable: metrics go to metrics.jsonl only")
            else:
                # On resume, drop events a killed run logged after the checkpoint.
                purge = self.resumed_step + 1 if self.resumed_from is not None else None
                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)
        return self._writer or None

    def _record(self, result: StepResult, images_per_s: float) -> dict[str, Any]:
        row: dict[str, Any] = {
            "step": self.step,
            "epoch": round(self.epoch + self.batch_in_epoch / self.steps_per_epoch, 4),
        }
        row.update({k: round(v, 6) for k, v in result.terms.items()})
        row.update(lr=result.lr, grad_norm=round(result.grad_norm, 4), images_per_s=round(images_per_s, 2))
        if result.skipped:
            row["skipped"] = True
        if self.device.type == "cuda":
            row["memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for key, value in row.items():
                if key not in ("step", "skipped") and isinstance(value, (int, float)):
                    writer.add_scalar(f"train/{key}", value, self.step)
        return row

    # -- samples and checkpoints ----------------------------------------------------------------------
    @torch.no_grad()
    def write_samples(self) -> Path | None:
        """PNG grid of the EMA model's reconstructions: each row a held-out photo | its reconstruction,
        then (where the training set has photos to spare) a training photo | its reconstruction."""
        if self.val_batch is None or not self.dist.is_main:
            return None
        model = self.engine.ema.model
        columns = []
        for batch in (self.val_batch, self.train_batch):
            if batch is None:
                continue
            x = batch.to(self.device)
            recon = model(x).clamp(-1, 1)
            columns.append(torch.cat([x, recon.to(x.dtype)], dim=3))  # original | reconstruction
        rows = min(len(c) for c in columns)
        pairs = torch.cat([c[:rows] for c in columns], dim=3)
        grid = torch.cat(list(pairs), dim=1)  # stacked rows
        array = tensor_to_uint8(grid)
        path = self.run_dir / "samples" / f"step-{self.step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".png") as tmp:
            Image.fromarray(array).save(tmp, format="PNG")
        writer = self._tensorboard()
        if writer is not None:
            writer.add_image("samples/original|reconstruction", array, self.step, dataformats="HWC")
        return path

    def save(self) -> Path | None:
        if self.dist.is_main:
            path = ckpt.save_checkpoint(
                self.ckpt_dir,
                self.step,
                vae=self.engine.vae,
                ema_vae=self.engine.ema.model,
                discriminator=self.engine.disc,
                engine_state=self.engine.state(),
                position={
                    "step": self.step,
                    "epoch": self.epoch,
                    "batch_in_epoch": self.batch_in_epoch,
                    "total_steps": self.total_steps,
                    "world_size": self.dist.world_size,
                    "images_seen": self.step * self.settings.train.batch_size,
                },
                settings_json=self.settings.model_dump(mode="json"),
                keep_last=self.settings.train.keep_last,
            )
        else:
            path = None
        distributed.barrier()
        return path

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        tcfg = self.settings.train
        start_step, t0 = self.step, time.perf_counter()
        if self.step == 0:
            self.engine.fit_micro_batch(self.settings.data.image_size)
        self._log(
            f"training {self.total_steps} steps ({self.steps_per_epoch} per epoch) on {self.device} "
            f"({self.engine.precision}), {len(self.split.train)} images"
            f"{' (JPEGs decoded on the GPU)' if self.device_decode else ''}, batch {tcfg.batch_size} "
            f"= {self.dist.world_size} process(es) x micro-batch {self.engine.micro_batch} x accumulation, "
            f"run folder {self.run_dir}"
        )
        saved: list[str] = []
        last_result: StepResult | None = None
        first_loss = None
        from rich.progress import TextColumn

        bar = progress(self.quiet, TextColumn("{task.fields[status]}"))
        plain_logs = not self.quiet and bar.disable
        try:
            with bar:
                task = bar.add_task("train", total=self.total_steps, completed=self.step, status="")
                window_t, window_steps = time.perf_counter(), 0
                while self.step < self.total_steps:
                    self.sampler.set_epoch(self.epoch)
                    self.sampler.skip(self.batch_in_epoch * self.per_rank_batch)
                    for batch in self.loader:
                        result = self.engine.step(batch, self.step)
                        self.step += 1
                        self.batch_in_epoch += 1
                        if self.batch_in_epoch >= self.steps_per_epoch:
                            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                        window_steps += 1
                        last_result = result
                        if first_loss is None and not result.skipped:
                            first_loss = result.terms.get("loss")
                        if self.on_step is not None:
                            self.on_step(self.step, result)
                        done = self.step >= self.total_steps
                        if self.step % tcfg.log_every == 0 or done or self.step == start_step + 1:
                            now = time.perf_counter()
                            ips = window_steps * tcfg.batch_size / max(now - window_t, 1e-9)
                            window_t, window_steps = now, 0
                            terms = distributed.mean_across(result.terms, self.device)
                            result.terms = terms
                            if self.dist.is_main:
                                row = self._record(result, ips)
                                eta = (self.total_steps - self.step) * tcfg.batch_size / max(ips, 1e-9)
                                status = f"{_status(row, self.device)}  ETA {_duration(eta)}"
                                bar.update(task, completed=self.step, status=status)
                                if plain_logs:
                                    self._log(f"step {self.step}/{self.total_steps} {status}")
                        else:
                            bar.update(task, completed=self.step)
                        if self.step % tcfg.sample_every == 0 or done:
                            self.write_samples()
                        if self.step % tcfg.checkpoint_every == 0 or done:
                            path = self.save()
                            if path is not None:
                                saved.append(str(path))
                        if done:
                            break
            final_dir = None
            if self.dist.is_main:
                final_dir = self.engine.ema.model.save_pretrained(self.run_dir / "final")
            distributed.barrier()
        finally:
            if self._writer:
                self._writer.close()
        wall = time.perf_counter() - t0
        steps_run = self.step - start_step
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        return TrainResult(
            run_dir=str(self.run_dir),
            final_dir=str(final_dir) if final_dir else None,
            steps=self.step,
            start_step=start_step,
            epochs_completed=round(self.epoch + self.batch_in_epoch / self.steps_per_epoch, 3),
            images_seen=self.step * tcfg.batch_size,
            wall_s=round(wall, 2),
            images_per_s=round(steps_run * tcfg.batch_size / max(wall, 1e-9), 2),
            first_loss=first_loss,
            last_loss=last_result.terms.get("loss") if last_result else None,
            last_terms=last_result.terms if last_result else {},
            skipped_steps=self.engine.skipped_steps,
            micro_batch=self.engine.micro_batch,
            precision=self.engine.precision,
            device=str(self.device),
            world_size=self.dist.world_size,
            resumed_from=str(self.resumed_from) if self.resumed_from else None,
            checkpoints=saved,
            peak_memory_gib=round(peak, 3) if peak is not None else None,
        )


def _status(row: dict[str, Any], device: torch.device) -> str:
    parts = [f"loss {row.get('loss', float('nan')):.4f}"]
    for key in ("rec", "lpips", "kl", "g", "d"):
        if key in row:
            parts.append(f"{key} {row[key]:.4g}")
    parts.append(f"lr {row['lr']:.2e}")
    parts.append(f"{row['images_per_s']:.1f} img/s")
    if "memory_gib" in row:
        parts.append(f"{row['memory_gib']:.1f} GiB")
        with contextlib.suppress(Exception):  # needs NVML; utilisation is optional information
            parts.append(f"util {torch.cuda.utilization(device)}%")
    if row.get("skipped"):
        parts.append("[skipped: non-finite]")
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train(settings: Settings, **kwargs: Any) -> TrainResult:
    """Build a Trainer and run it to the end; kwargs as for ``Trainer``."""
    trainer = Trainer(settings, **kwargs)
    try:
        return trainer.fit()
    finally:
        distributed.teardown()
