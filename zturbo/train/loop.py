"""The training loop: data, steps, logging, samples and checkpoints, top to bottom.

    >>> from zturbo.config import load_settings
    >>> from zturbo.train import Trainer

    >>> settings = load_settings("demo")
    >>> result = Trainer(settings).fit()          # RUN_DIR/final/ holds the EMA model

Under torchrun pass ``dist_ctx=DistContext.from_env(os.environ)``; every rank
runs the same loop, rank 0 alone logs, samples and writes checkpoints. Settings with
a teacher (``settings.distill.teacher``) train its student (``zturbo.distill``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.progress import Progress, TaskID, TextColumn

from zturbo.config import Settings
from zturbo.console import info, progress
from zturbo.data.datasets import (
    DataSplit,
    ImageFolderDataset,
    ResumableSampler,
    load_batch,
    make_loader,
    shard_blocks,
    split_data,
    steps_per_epoch,
)
from zturbo.data.images import tensor_to_uint8
from zturbo.data.jpeg_device import decode_on_device
from zturbo.distill import load_student, student_settings
from zturbo.errors import CheckpointError, InputError, UsageError
from zturbo.model import TinyConfig, load_state_dict_strict
from zturbo.model.diffusers import config_from_diffusers
from zturbo.train import checkpoint as ckpt
from zturbo.train import distributed
from zturbo.train.distributed import DistContext
from zturbo.train.engine import StepResult, TrainEngine
from zturbo.train.run_log import RunLog, duration, status_line
from zturbo.utils import atomic_path, resolve_device


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


def check_tiny_has_teacher(settings: Settings) -> None:
    """A tiny model has no latent space of its own: it is only ever trained as a teacher's student."""
    if settings.distill.teacher is None and isinstance(settings.model, TinyConfig):
        raise UsageError("a tiny model learns a teacher's latent space", "pass --teacher MODEL (the VAE it distils)")


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
        """Set up a run of ``settings``: device, data, model (a distillation's student), engine, run folder.

        Settings with a teacher are those of its student (``zturbo.distill.student_settings``,
        which ``zturbo train`` applies; settings it made come back equal), resolved before
        anything reads them.
        """
        check_tiny_has_teacher(settings)
        self.settings = student_settings(settings) if settings.distill.teacher is not None else settings
        self.dist = dist_ctx or DistContext()
        self.quiet = quiet or not self.dist.is_main
        self.on_step = on_step
        self.run_dir = Path(self.settings.train.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = self._start_device()
        self.split = self._split_data()
        self.per_rank_batch = self._per_rank_batch()
        self.student = (load_student(self.settings, self.device, self.split.train, self._log)
                        if self.settings.distill.teacher is not None else None)
        self._make_loader()
        self._make_schedule()
        self.val_batch, self.train_batch = self._sample_batches()
        self.engine = TrainEngine(
            self.settings,
            self.device,
            dist_ctx=self.dist,
            model=self.student.model if self.student else None,
            forward_module=self.student.forward if self.student else None,
            lpips_random_backbone=lpips_random_backbone,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            per_rank_batch=self.per_rank_batch,
            log=self._log,
        )
        self.step = self.epoch = self.batch_in_epoch = 0
        self.resumed_from: Path | None = None
        self.resumed_step = 0
        self.run_log = RunLog(self.run_dir, self.dist.is_main, self._log)
        self._prepare_run_dir(resume)

    # -- set-up ---------------------------------------------------------------------------------------
    def _start_device(self) -> torch.device:
        """``train.device``, this rank's GPU under torchrun, with the process group started on it."""
        device = resolve_device(self.settings.train.device)
        if device.type == "cuda" and self.dist.enabled:
            device = torch.device("cuda", self.dist.local_rank)
        distributed.setup(self.dist, device)
        return device

    def _split_data(self) -> DataSplit:
        dcfg = self.settings.data
        if dcfg.data_dir is None:
            raise UsageError(
                "no training data given", "pass --data DIR (a folder of images or `zturbo prepare` output)"
            )
        return split_data(dcfg.data_dir, dcfg.val_images, dcfg.image_column)

    def _per_rank_batch(self) -> int:
        batch_size = self.settings.train.batch_size
        if batch_size % self.dist.world_size:
            raise UsageError(
                f"batch size {batch_size} is not divisible by the {self.dist.world_size} processes",
                "the batch size is the effective batch over all processes; pick a multiple of the process count",
            )
        return batch_size // self.dist.world_size

    def _make_loader(self) -> None:
        """This rank's sampler and loader over the training images (or a distillation's stored-latent pairs)."""
        dcfg, train = self.settings.data, self.split.train
        # data.decode: JPEGs stay encoded for the device to decode (image folders; --latents pairs are read as pixels).
        self.device_decode = decode_on_device(dcfg.decode, self.device, train, dcfg.image_size)
        dataset = self.student.dataset(train, dcfg.data_dir, dcfg.image_size) if self.student else None
        if dataset is None:
            # uint8 crops: a quarter of the bytes through the workers and to the device (the engine scales them).
            dataset = ImageFolderDataset(train, dcfg.image_size, dcfg.random_crop, dcfg.random_flip,
                                         device_decode=self.device_decode, as_uint8=True)
        else:
            self.device_decode = False
        self.steps_per_epoch = steps_per_epoch(len(dataset), self.dist.world_size, self.per_rank_batch)
        if self.steps_per_epoch == 0:
            raise InputError(
                f"{len(dataset)} training images are fewer than the per-process batch of {self.per_rank_batch}",
                "add images or lower --batch-size",
            )
        # From shards: read a few shards at a time (the images of a distillation's latent pairs are not in file order).
        blocks = shard_blocks(train) if self.split.layout == "shards" and self.student is None else None
        self.sampler = ResumableSampler(dataset, self.dist.world_size, self.dist.rank, seed=self.settings.train.seed,
                                        blocks=blocks)
        self.loader = make_loader(
            dataset, self.sampler, self.per_rank_batch, dcfg.num_workers, pin_memory=self.device.type == "cuda"
        )

    def _make_schedule(self) -> None:
        tcfg = self.settings.train
        self.total_steps = tcfg.max_steps or tcfg.epochs * self.steps_per_epoch
        warmup = tcfg.warmup_steps if tcfg.warmup_steps is not None else round(tcfg.warmup_epochs * self.steps_per_epoch)
        self.warmup_steps = min(warmup, self.total_steps)

    def _sample_batches(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The sample grid's held-out photos and, beside them, as many training photos, evenly spaced: what the
        model has learned next to how it generalises (rank 0 only)."""
        split, size = self.split, self.settings.data.image_size
        if not split.val or not self.dist.is_main:
            return None, None
        shown = split.train[:: max(1, len(split.train) // len(split.val))][: len(split.val)]
        train = load_batch(shown, size) if shown and not set(split.val).intersection(shown) else None
        return load_batch(split.val, size), train

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
        self.run_log.resume_at(self.step)

    # -- logging --------------------------------------------------------------------------------------
    def _log(self, message: str) -> None:
        if not self.quiet:
            info(message)

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
        self.run_log.record(row, self.step)
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
        self.run_log.image("samples/original|reconstruction", array, self.step)
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
        """Train to ``total_steps`` (from where a resumed run stopped); the EMA model goes to RUN_DIR/final/."""
        run = _FitProgress(start_step=self.step)
        if self.step == 0:
            self.engine.fit_micro_batch(self.settings.data.image_size)
        self._log(self._plan_line())
        bar = progress(self.quiet, TextColumn("{task.fields[status]}"))
        try:
            with bar:
                task = bar.add_task("train", total=self.total_steps, completed=self.step, status="")
                run.window_t = time.perf_counter()
                while self.step < self.total_steps:
                    self._train_epoch(run, bar, task)
            final_dir = self.engine.ema.model.save_pretrained(self.run_dir / "final") if self.dist.is_main else None
            distributed.barrier()
        finally:
            self.run_log.close()
        return self._result(run, final_dir)

    def _plan_line(self) -> str:
        tcfg = self.settings.train
        return (
            f"training {self.total_steps} steps ({self.steps_per_epoch} per epoch) on {self.device} "
            f"({self.engine.precision}), {len(self.split.train)} images"
            f"{' (JPEGs decoded on the GPU)' if self.device_decode else ''}, batch {tcfg.batch_size} "
            f"= {self.dist.world_size} process(es) x micro-batch {self.engine.micro_batch} x accumulation, "
            f"run folder {self.run_dir}"
        )

    def _train_epoch(self, run: _FitProgress, bar: Progress, task: TaskID) -> None:
        """The rest of the current epoch (from ``batch_in_epoch``), or up to the last step."""
        self.sampler.set_epoch(self.epoch)
        self.sampler.skip(self.batch_in_epoch * self.per_rank_batch)
        for batch in self.loader:
            result = self.engine.step(batch, self.step)
            self._advance(run, result)
            self._report(run, result, bar, task)
            self._write_on_schedule(run)
            if self.step >= self.total_steps:
                return

    def _advance(self, run: _FitProgress, result: StepResult) -> None:
        self.step += 1
        self.batch_in_epoch += 1
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        run.window_steps += 1
        run.last = result
        if run.first_loss is None and not result.skipped:
            run.first_loss = result.terms.get("loss")
        if self.on_step is not None:
            self.on_step(self.step, result)

    def _report(self, run: _FitProgress, result: StepResult, bar: Progress, task: TaskID) -> None:
        """Every ``log_every`` steps (and the first and last): terms averaged over ranks, recorded and shown."""
        tcfg = self.settings.train
        if not (self.step % tcfg.log_every == 0 or self.step >= self.total_steps or self.step == run.start_step + 1):
            bar.update(task, completed=self.step)
            return
        now = time.perf_counter()
        ips = run.window_steps * tcfg.batch_size / max(now - run.window_t, 1e-9)
        run.window_t, run.window_steps = now, 0
        result.terms = distributed.mean_across(result.terms, self.device)
        if not self.dist.is_main:
            return
        row = self._record(result, ips)
        eta = (self.total_steps - self.step) * tcfg.batch_size / max(ips, 1e-9)
        status = f"{status_line(row, self.device)}  ETA {duration(eta)}"
        bar.update(task, completed=self.step, status=status)
        if not self.quiet and bar.disable:  # no live bar (not a terminal): plain log lines instead
            self._log(f"step {self.step}/{self.total_steps} {status}")

    def _write_on_schedule(self, run: _FitProgress) -> None:
        tcfg, done = self.settings.train, self.step >= self.total_steps
        if self.step % tcfg.sample_every == 0 or done:
            self.write_samples()
        if self.step % tcfg.checkpoint_every == 0 or done:
            path = self.save()
            if path is not None:
                run.saved.append(str(path))

    def _result(self, run: _FitProgress, final_dir: Path | None) -> TrainResult:
        tcfg = self.settings.train
        wall = time.perf_counter() - run.t0
        steps_run = self.step - run.start_step
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        return TrainResult(
            run_dir=str(self.run_dir),
            final_dir=str(final_dir) if final_dir else None,
            steps=self.step,
            start_step=run.start_step,
            epochs_completed=round(self.epoch + self.batch_in_epoch / self.steps_per_epoch, 3),
            images_seen=self.step * tcfg.batch_size,
            wall_s=round(wall, 2),
            images_per_s=round(steps_run * tcfg.batch_size / max(wall, 1e-9), 2),
            first_loss=run.first_loss,
            last_loss=run.last.terms.get("loss") if run.last else None,
            last_terms=run.last.terms if run.last else {},
            skipped_steps=self.engine.skipped_steps,
            micro_batch=self.engine.micro_batch,
            precision=self.engine.precision,
            device=str(self.device),
            world_size=self.dist.world_size,
            resumed_from=str(self.resumed_from) if self.resumed_from else None,
            checkpoints=run.saved,
            peak_memory_gib=round(peak, 3) if peak is not None else None,
        )


@dataclass
class _FitProgress:
    """What ``fit`` keeps across steps: where it started, the throughput window, losses, checkpoints."""

    start_step: int
    t0: float = field(default_factory=time.perf_counter)
    window_t: float = 0.0
    window_steps: int = 0
    first_loss: float | None = None
    last: StepResult | None = None
    saved: list[str] = field(default_factory=list)


def train(settings: Settings, **kwargs: Any) -> TrainResult:
    """Build a Trainer and run it to the end; kwargs as for ``Trainer``."""
    trainer = Trainer(settings, **kwargs)
    try:
        return trainer.fit()
    finally:
        distributed.teardown()
