"""``--output-format webdataset``: latents written as one tar per input shard (or per ``--shard-size`` images
of a folder), each whole or not at all; the layout is :mod:`zturbo.data.latent_webdataset`'s.

Exactly once, by tar: a shard input's output tar is named after the input shard, so a rerun
skips every input shard whose tar exists and redoes the others from the start; a folder's
images are skipped one by one, by the source keys the finished tars hold. A killed run leaves
only temp files (``.NAME.tar.*.tmp``), removed by the next run of the same part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zturbo.data.images import bucket_crop_box
from zturbo.data.latent_webdataset import (
    FORMAT,
    LATENT_EXTS,
    VERSION,
    latent_bytes,
    latent_tars,
    read_latent_tar,
    tar_key,
    write_latent_tar,
)
from zturbo.paths import safe_name, unique_names
from zturbo.serve import store
from zturbo.serve.inputs import Failure, Inputs, Probed, Source
from zturbo.serve.plan import plan_batches
from zturbo.serve.readers import Computed
from zturbo.serve.writers import Writer


@dataclass
class Group:
    """The items one output tar holds: ``name`` relative to ``OUT/shards``."""

    name: str
    items: list[int]  # indices into the run's item list
    prefix: str = ""  # what the source keys start with and the tar's keys leave out: "<input shard>/"


class GroupTally:
    """Rows by output group, and which groups are complete: a group is written once, when the
    last of its items has been computed or has failed (batches arrive in any order)."""

    def __init__(self, groups: list[Group]):
        self.group_of = {i: g for g, group in enumerate(groups) for i in group.items}
        self.left = [len(group.items) for group in groups]
        self.rows: list[list] = [[] for _ in groups]

    def add(self, index: int, row: tuple) -> None:
        """Keep ``row`` (source key first) for item ``index``'s group."""
        self.rows[self.group_of[index]].append(row)

    def complete(self, handled: list[int]) -> list[int]:
        """Count the items ``handled``; the groups they completed."""
        done = []
        for index in handled:
            g = self.group_of[index]
            self.left[g] -= 1
            if self.left[g] == 0:
                done.append(g)
        return done

    def take(self, g: int) -> list:
        """Group ``g``'s rows in source-key order (whatever order the batches came in), released."""
        rows, self.rows[g] = sorted(self.rows[g], key=lambda r: r[0]), []
        return rows


def unit_tar_name(unit: str) -> str:
    return f"{safe_name(unit)}.tar"


def done_sources(out_dir: Path, inputs: Inputs, mine: list[Source]) -> set[str]:
    """The source keys of ``mine`` that finished tars hold: every image of an input shard whose tar exists,
    or the images of a folder that a tar lists."""
    tars = latent_tars(out_dir)
    if inputs.units is not None:
        written = {p.relative_to(out_dir / store.SHARD_DIR).as_posix() for p in tars}
        return {s.key for s in mine if unit_tar_name(s.unit) in written}
    held = {latent.meta.get("source") for tar in tars for latent in read_latent_tar(tar)}
    return {s.key for s in mine} & held


def plan_groups(out_dir: Path, inputs: Inputs, sources: list[Source], items: list[Probed], done: set[str], part: str,
                shard_size: int) -> list[Group]:
    """One group per pending input shard (``sources`` are theirs; a group is written even when none of its
    images could be read: its tar then says so), or the folder's items (all of the part's, so the groups are
    those of an uninterrupted run) in tars of ``shard_size``, less those done, numbered on from the part's
    last tar."""
    if inputs.units is not None:
        position = {p.source.key: i for i, p in enumerate(items)}
        groups: dict[str, Group] = {}
        for s in sources:
            group = groups.setdefault(s.unit, Group(unit_tar_name(s.unit), [], f"{s.unit}/"))
            if s.key in position:
                group.items.append(position[s.key])
        return list(groups.values())
    seq = next_tar_sequence(out_dir, part)
    chunks = [[k for k in range(i, min(i + shard_size, len(items))) if items[k].source.key not in done]
              for i in range(0, len(items), shard_size)]
    return [Group(f"{part}-{seq + n:06d}.tar", chunk) for n, chunk in enumerate(c for c in chunks if c)]


def next_tar_sequence(out_dir: Path, part: str) -> int:
    seqs = [int(p.stem.rsplit("-", 1)[1]) for p in latent_tars(out_dir)
            if p.stem.startswith(f"{part}-") and p.stem.rsplit("-", 1)[1].isdigit()]
    return max(seqs, default=-1) + 1


def group_plans(groups: list[Group], items: list[Probed], batch_size: int) -> list[list[int]]:
    """Batches group by group (each of one size bucket), so a group's tar is written as soon as it is done."""
    plans = []
    for group in groups:
        plans += [[group.items[i] for i in plan] for plan in plan_batches([items[i].bucket for i in group.items],
                                                                             batch_size)]
    return plans


def remove_temp_tars(out_dir: Path, groups: list[Group]) -> None:
    """The temp files a killed run left for these groups' tars (never linked into place)."""
    folder = out_dir / store.SHARD_DIR
    for group in groups:
        target = folder / group.name
        if target.parent.is_dir():
            for tmp in target.parent.glob(f".{target.name}.*.tmp"):
                tmp.unlink(missing_ok=True)


def sample_meta(settings: dict, source: str, size: tuple[int, int], bucket: tuple[int, int], latent) -> dict:
    """What ``KEY.json`` says of one latent (see :mod:`zturbo.data.latent_webdataset`)."""
    left, top, right, bottom = bucket_crop_box(*size, bucket) if all(size) else (0, 0, 0, 0)
    return {
        "format": FORMAT, "version": VERSION, "source": source, "width": size[0], "height": size[1],
        "bucket": list(bucket), "crop": [round(v, 3) for v in (left, top, right, bottom)],
        "shape": list(latent.shape), "dtype": str(latent.dtype).removeprefix("torch."),
        **{k: settings.get(k) for k in ("model", "encoder_fingerprint", "scaling_factor", "shift_factor",
                                        "latent_channels", "downsample_factor", "latent_mode", "precision")},
    }


def tar_samples(rows: list[tuple[str, tuple[int, int], tuple[int, int], object]], settings: dict,
                latent_file: str, prefix: str = "") -> list[tuple[str, str, bytes, dict]]:
    """(key, latent extension, bytes, metadata) for one tar, from (source key, size, bucket, latent) rows: the
    key is the source key less ``prefix`` (an input shard's sample keys stay as they were), made distinct."""
    keys = unique_names(tar_key(source.removeprefix(prefix)) for source, _, _, _ in rows)
    return [(key, LATENT_EXTS[latent_file], latent_bytes(latent, latent_file),
             sample_meta(settings, source, size, bucket, latent))
            for key, (source, size, bucket, latent) in zip(keys, rows)]


class TarShardWriter(Writer):
    """Writes each group's tar when its last item has been computed or has failed; keeps the failure list."""

    def __init__(self, out_dir: Path, part: str, groups: list[Group], items: list[Probed], failures: dict[str, dict],
                 settings: dict, latent_file: str):
        super().__init__()
        self.out_dir, self.part, self.groups, self.items = out_dir, part, groups, items
        self.failures, self.settings, self.latent_file = failures, settings, latent_file
        self.index_of = {p.source.key: i for i, p in enumerate(items)}
        self.tally = GroupTally(groups)
        self.done = [False] * len(groups)
        self.written = 0

    def handle(self, computed: Computed) -> None:
        batch = computed.batch
        handled = []
        for f in batch.failures:
            self.failures[f.key] = f.to_dict()
            handled.append(self.index_of[f.key])
        if computed.result is not None:
            host, finite = computed.result.host, computed.result.finite
            for row, (index, size) in enumerate(zip(batch.indices, batch.sizes)):
                item = self.items[index]
                if finite is not None and not bool(finite[row]):
                    failure = Failure(item.source.key, "non-finite", "the encoder's output holds NaN or infinite values")
                    self.failures[item.source.key] = failure.to_dict()
                    self.failed.append(failure.to_dict())
                else:
                    self.tally.add(index, (item.source.key, size, item.bucket, host[row].clone()))
                handled.append(index)
        for g in self.tally.complete(handled):
            self._write(g)

    def _write(self, g: int) -> None:
        rows = self.tally.take(g)
        write_latent_tar(self.out_dir / store.SHARD_DIR / self.groups[g].name,
                         tar_samples(rows, self.settings, self.latent_file, self.groups[g].prefix))
        self.written += len(rows)
        self.done[g] = True
        for source, *_ in rows:
            self.failures.pop(source, None)
        path = store.failure_path(self.out_dir, self.part)
        if self.failures or path.exists():
            store.write_failures(self.out_dir, self.part, self.failures)

    def close(self) -> None:
        for g, done in enumerate(self.done):
            if not done and self.tally.left[g] == 0:  # groups with no readable image: an empty tar marks them done
                self._write(g)
