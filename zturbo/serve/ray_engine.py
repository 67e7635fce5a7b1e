"""``serve-batch encode --engine ray``: the encode job as a Ray Data pipeline, on one machine or a cluster.

    >>> from zturbo.serve.ray_engine import encode_with_ray
    >>> report = encode_with_ray("runs/demo", "shards/{000000..000099}.tar", "latents/", cfg, address="auto")

The pipeline, planned by the driver exactly as the native engine plans (``plan_encode``):

* read: ``ray.data.from_items`` of the planned batches, then ``map`` tasks that read and
  decode each batch's images (any input: files, WebDataset or Parquet shards);
* encode: ``map_batches`` with a stateful encoder actor class, one actor per GPU (or per
  CPU slot), each loading the model once; every planned batch is encoded as one batch, so
  the latents are the bits the native engine computes;
* write: the driver gathers each output shard's latents as they stream in and writes the
  shard whole (temp name, then published) as soon as its last batch arrives: a WebDataset
  tar per input shard, or a zturbo safetensors shard plus ``index.json`` at the end.

Exactly once at output-shard granularity, as the native engine: a rerun after the driver
was killed skips every shard on disk. The output folder must be reachable from the driver
(the inputs from every node). Progress is Ray Data's own.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zturbo.config import ServeConfig
from zturbo.errors import InputError, require
from zturbo.paths import check_output_folder
from zturbo.serve import store, tar_output
from zturbo.serve.encode import latent_settings, plan_encode
from zturbo.serve.inputs import Failure, Partition, bucket_sizes, discover_inputs
from zturbo.serve.readers import ImageSource, collate
from zturbo.serve.run import RunReport
from zturbo.serve.step import DeviceStep, load_backend, model_sample_size
from zturbo.utils import atomic_write_json

PART = Partition().name  # the Ray engine writes as the native engine's whole-job part: reruns may mix engines
DEFAULT_BATCH = 8  # batch size for "auto" on CPU actors (the native engine's CPU choice)


def start_ray(address: str | None, num_cpus: int | None = None, quiet: bool = False):
    """Connect to the cluster at ``address``, or start a local Ray instance on loopback, without the dashboard."""
    if address is None:
        # Set before ray is imported (it reads them then): a local instance listens on 127.0.0.1 only, and sends
        # no usage statistics. A user's own setting wins.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = require("ray", "serve-batch encode --engine ray", "ray")
    require("ray.data", "serve-batch encode --engine ray", "ray")
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": not quiet}
        if address is None:
            kwargs.update(num_cpus=num_cpus, include_dashboard=False)
        else:
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise InputError(f"cannot reach the Ray cluster at {address}: {exc}",
                             "start it with `ray start --head` (then `ray start --address HEAD:6379` on each node), "
                             "or leave out --ray-address for a local instance") from exc
    return ray


class _ReadBatch:
    """Read task: one planned batch's images, decoded and resized to their bucket, stacked."""

    def __init__(self, items: list, max_pixels: int):
        self.source = ImageSource(items, max_pixels)

    def __call__(self, row: dict) -> dict:
        batch = collate([self.source.read(i) for i in json.loads(row["items"])], pin=False)
        pixels = batch.data.numpy() if batch.data is not None else np.zeros((0, 1, 1, 3), np.uint8)
        return {"batch": row["batch"], "indices": json.dumps(batch.indices), "sizes": json.dumps(batch.sizes),
                "failures": json.dumps([f.to_dict() for f in batch.failures]), "pixels": pixels.tobytes(),
                "shape": json.dumps(list(pixels.shape))}


class _Encoder:
    """The stateful encoder actor: loads the model once, then encodes each planned batch it is handed."""

    def __init__(self, model: Any, cfg: ServeConfig, device: str, threads: int | None, keys: list[str]):
        if threads is not None:
            torch.set_num_threads(threads)
        self.step = DeviceStep(load_backend(model, cfg, device), "encode", cfg.latent_mode, cfg.seed)
        self.keys = keys

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"batch": [], "latents": [], "latent_shape": [], "finite": [], "indices": [],
                                "sizes": [], "failures": []}
        for k in range(len(rows["batch"])):
            indices = json.loads(rows["indices"][k])
            latents, shape, finite = b"", [0], []
            if indices:
                pixels = np.frombuffer(rows["pixels"][k], np.uint8).reshape(json.loads(rows["shape"][k]))
                result = self.step.run(torch.from_numpy(pixels.copy()), [self.keys[i] for i in indices])
                result.wait()
                host = result.host.float().contiguous()
                latents, shape, finite = host.numpy().tobytes(), list(host.shape), result.finite.tolist()
            for name, value in (("batch", rows["batch"][k]), ("latents", latents), ("latent_shape", json.dumps(shape)),
                                ("finite", json.dumps(finite)), ("indices", rows["indices"][k]),
                                ("sizes", rows["sizes"][k]), ("failures", rows["failures"][k])):
                out[name].append(value)
        return out


def encode_with_ray(model: Any, input_path: str | os.PathLike, output_dir: str | os.PathLike,
                    cfg: ServeConfig | None = None, *, address: str | None = None, num_cpus: int | None = None,
                    quiet: bool = False) -> RunReport:
    """Encode every image ``input_path`` names into ``output_dir`` on Ray (see the module docstring); the same
    outputs, report and exactly-once guarantee as :func:`zturbo.serve.encode_collection`."""
    cfg = cfg or ServeConfig()
    out_dir = check_output_folder(output_dir)
    ray = start_ray(address, num_cpus, quiet)
    t_start = time.perf_counter()
    inputs = discover_inputs(input_path, cfg.image_column)
    if not inputs.sources:
        raise InputError(f"no images found in {input_path}", "supported: .png .jpg .jpeg .webp .bmp .tif .tiff .gif")
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    use_gpu = gpus > 0 and cfg.device in ("auto", "cuda") or cfg.device.startswith("cuda")
    backend = load_backend(model, cfg, "cpu")  # the driver's copy: settings and fingerprint only
    size = cfg.size or model_sample_size(backend)
    settings = latent_settings(model, backend, cfg, size)
    store.check_settings(out_dir, settings)
    batch = DEFAULT_BATCH if cfg.batch_size == "auto" else int(cfg.batch_size)
    plan = plan_encode(out_dir, inputs, inputs.sources, cfg, Partition(),
                       bucket_sizes(size, backend.downsample_factor, cfg.resize), lambda n, _: max(1, min(batch, n)))
    report = RunReport("encode", str(out_dir), total=len(inputs.sources), already_done=len(plan.done),
                       backend={"engine": "ray", **backend.describe()}, partition=PART, damaged=inputs.damaged,
                       output_format=cfg.output_format, batch_size=plan.batch_size, engine="ray",
                       failed=len(plan.header_failures), failures=[f.to_dict() for f in plan.header_failures])
    actors = max(1, gpus if use_gpu else cpus)
    report.reading, report.reader_threads = "ray", actors
    sink = _Sink(out_dir, plan, settings, cfg, report)
    if plan.batches:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = not quiet
        ds = ray.data.from_items([{"batch": b, "items": json.dumps(items)} for b, items in enumerate(plan.batches)],
                                 override_num_blocks=len(plan.batches))
        # Reading takes a quarter CPU per task and each CPU actor three quarters, so an actor per CPU still
        # leaves room for the reads on a CPU-only machine (a whole CPU each would leave none).
        ds = ds.map(_ReadBatch, fn_constructor_args=(plan.items, cfg.max_pixels), num_cpus=0.25,
                    concurrency=max(1, actors))
        keys = [p.source.key for p in plan.items]
        device = "cuda" if use_gpu else "cpu"
        resources_per_actor = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": 0.75}
        ds = ds.map_batches(_Encoder, fn_constructor_args=(model, cfg, device, None if use_gpu else
                                                           max(1, cpus // actors), keys),
                            batch_size=1, concurrency=actors, **resources_per_actor)
        for rows in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for k in range(len(rows["batch"])):
                sink.add({name: rows[name][k] for name in rows})
    sink.finish()
    if cfg.output_format == "zturbo":
        index = store.build_index([out_dir])
        report.index, report.index_count = str(out_dir / store.INDEX_NAME), index["count"]
    report.wall_seconds = time.perf_counter() - t_start
    atomic_write_json(out_dir / store.REPORT_NAME, report.to_dict())
    return report


class _Sink:
    """The driver's side of the write: latents by output shard, each shard written once its last batch is in."""

    def __init__(self, out_dir: Path, plan, settings: dict, cfg: ServeConfig, report: RunReport):
        self.out_dir, self.plan, self.settings, self.cfg, self.report = out_dir, plan, settings, cfg, report
        if plan.groups is None:  # zturbo format: groups of whole batches, about shard_size latents each
            plan.groups, group = [], []
            for items in plan.batches:
                group += items
                if len(group) >= cfg.shard_size:
                    plan.groups.append(tar_output.Group("", group))
                    group = []
            if group:
                plan.groups.append(tar_output.Group("", group))
            self.seq = store.next_sequence(out_dir, PART)
        self.tally = tar_output.GroupTally(plan.groups)
        self.keys = {p.source.key: i for i, p in enumerate(plan.items)}

    def add(self, row: dict) -> None:
        handled = []
        for f in json.loads(row["failures"]):
            self.plan.failures[f["source"]] = f
            self.report.failed += 1
            self.report.failures.append(f)
            handled.append(self.keys[f["source"]])
        indices = json.loads(row["indices"])
        if indices:
            shape = json.loads(row["latent_shape"])
            latents = torch.from_numpy(np.frombuffer(row["latents"], np.float32).reshape(shape).copy())
            latents = latents.to(torch.bfloat16 if self.cfg.precision == "bf16" else
                                 torch.float16 if self.cfg.precision == "fp16" else torch.float32)
            for latent, index, size, finite in zip(latents, indices, json.loads(row["sizes"]),
                                                   json.loads(row["finite"])):
                item = self.plan.items[index]
                if not finite:
                    failure = Failure(item.source.key, "non-finite", "the encoder's output holds NaN or infinite values")
                    self.plan.failures[item.source.key] = failure.to_dict()
                    self.report.failed += 1
                    self.report.failures.append(failure.to_dict())
                else:
                    self.tally.add(index, (item.source.key, tuple(size), item.bucket, latent))
                    self.report.processed += 1
                handled.append(index)
        for g in self.tally.complete(handled):
            self._write(g)

    def _write(self, g: int) -> None:
        rows, group = self.tally.take(g), self.plan.groups[g]
        if self.cfg.output_format == "webdataset":
            tar_output.write_latent_tar(self.out_dir / store.SHARD_DIR / group.name,
                                        tar_output.tar_samples(rows, self.settings, self.cfg.latent_file, group.prefix))
        elif rows:
            tensors = {f"{n:06d}": latent for n, (_, _, _, latent) in enumerate(rows)}
            entries = [{"tensor": f"{n:06d}", "source": source, "shape": list(latent.shape), "width": size[0],
                        "height": size[1], "bucket": list(bucket)} for n, (source, size, bucket, latent) in enumerate(rows)]
            store.write_shard(store.shard_path(self.out_dir, PART, self.seq), tensors, entries)
            self.seq += 1
        for source, *_ in rows:
            self.plan.failures.pop(source, None)
        if self.plan.failures or store.failure_path(self.out_dir, PART).exists():
            store.write_failures(self.out_dir, PART, self.plan.failures)

    def finish(self) -> None:
        for g, left in enumerate(self.tally.left):
            if left == 0 and self.plan.groups[g].name and not (self.out_dir / store.SHARD_DIR /
                                                                self.plan.groups[g].name).exists():
                self._write(g)  # an input shard with no readable image: an empty tar marks it done
