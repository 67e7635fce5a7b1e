"""Dataset preparation: any folder of images -> ``size`` x ``size`` 8-bit sRGB train/val folders.

Usable from Python without the CLI::

    >>> from zturbo.config import PrepareConfig
    >>> from zturbo.data.prepare import prepare_dataset
    >>> report = prepare_dataset("raw/", "data/", PrepareConfig(size=512))
    >>> train_files = prepared_images("data/", "train")

Layout of OUTPUT::

    train/<source folders>/<stem>_<ext>.<format>   val/...   (split by content hash)
    manifest.jsonl        one line per output, sorted by source path
    prepare-report.json   counts, every skipped file with its reason, duplicates
    .prepare/             journal and lock that make re-runs incremental and kills resumable

OUTPUT mirrors INPUT: a re-run redoes only new or changed sources (or everything after
a change of size, format, quality, resize or limits), moves outputs whose split changed,
and removes outputs of sources that are gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zturbo.config import PrepareConfig
from zturbo.data import demo_dir
from zturbo.data.prepare_image import RenderOptions, output_name, split_for
from zturbo.data.prepare_pool import run_tasks
from zturbo.data.prepare_scan import Candidate, ScanResult, image_extensions, is_inside, scan
from zturbo.data.prepare_state import (
    SPLITS,
    Journal,
    OutputLock,
    remove_stale_outputs,
    remove_temp_files,
    write_json,
    write_jsonl,
)
from zturbo.errors import InputError, UsageError
from zturbo.paths import ensure_output_folder
from zturbo.utils import atomic_write_bytes, usable_cores

PIPELINE_VERSION = 2  # bump when the same settings would render different pixels
MANIFEST_NAME = "manifest.jsonl"
REPORT_NAME = "prepare-report.json"
# Skips that depend only on the file's bytes and the settings, so a re-run can trust them.
_CACHEABLE_SKIPS = {"corrupt", "not-an-image", "too-large", "too-small", "unsupported-mode", "empty"}


@dataclass
class PrepareProgress:
    """Counts passed to ``on_progress`` after each source is finished."""

    total: int
    done: int = 0
    written: int = 0
    up_to_date: int = 0
    skipped: int = 0


@dataclass
class PrepareReport:
    input: str
    output: str
    size: int
    format: str
    resize: str
    val_fraction: float
    dedupe: bool
    workers: int
    seen: int = 0
    written: int = 0
    up_to_date: int = 0
    outputs: int = 0
    train: int = 0
    val: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    duplicates: int = 0
    duplicate_files: list[dict[str, str]] = field(default_factory=list)
    removed: int = 0
    ignored: int = 0
    elapsed_s: float = 0.0
    images_per_s: float = 0.0

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_workers(workers: int | None) -> int:
    if workers is not None:
        return workers
    return usable_cores()


def render_options(config: PrepareConfig) -> RenderOptions:
    if config.size is None:
        raise UsageError("prepare.size is not set", "pass --size, or set data.image_size in the profile")
    from PIL import features

    if config.format == "webp" and not features.check("webp"):
        raise UsageError(
            "this Pillow build cannot write WebP", "use --format png or jpeg, or a Pillow with libwebp"
        )
    return RenderOptions(
        size=config.size,
        resize=config.resize,
        min_size=config.min_size if config.min_size is not None else max(1, config.size // 2),
        max_pixels=config.max_pixels,
        format=config.format,
        quality=config.quality,
        png_compress_level=config.png_compress_level,
        val_fraction=config.val_fraction,
    )


def fingerprint(opts: RenderOptions) -> str:
    """Identifies everything that decides an output's pixels and skip decisions (not its split)."""
    keys = {
        "v": PIPELINE_VERSION,
        "size": opts.size,
        "resize": opts.resize,
        "format": opts.format,
        "quality": opts.quality if opts.format != "png" else None,
        "png_level": opts.png_compress_level if opts.format == "png" else None,
        "min_size": opts.min_size,
        "max_pixels": opts.max_pixels,
    }
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def prepare_dataset(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: PrepareConfig,
    *,
    on_progress: Callable[[PrepareProgress], None] | None = None,
) -> PrepareReport:
    """Prepare every image under ``input_dir`` into ``output_dir``; see the module docstring.

    Bad files are skipped and reported, never fatal. Raises InputError when INPUT is
    missing, OUTPUT is not writable or nothing usable was found; UsageError when
    OUTPUT is inside INPUT or another run holds OUTPUT.
    """
    started = time.perf_counter()
    opts = render_options(config)
    input_root, output_root = _open_folders(Path(input_dir), Path(output_dir))
    report = PrepareReport(
        input=str(input_root.resolve()),
        output=str(output_root.resolve()),
        size=opts.size,
        format=opts.format,
        resize=opts.resize,
        val_fraction=opts.val_fraction,
        dedupe=config.dedupe,
        workers=resolve_workers(config.workers),
    )
    with OutputLock(output_root):
        remove_temp_files(output_root)
        found = scan(input_root, exclude=output_root)
        records = _bring_outputs_up_to_date(found, opts, config.dedupe, output_root, on_progress, report)
        _count(report, found, records, started)
        write_json(output_root / REPORT_NAME, report.to_dict())
    _check_usable(report, input_root, output_root)
    return report


def _open_folders(input_root: Path, output_root: Path) -> tuple[Path, Path]:
    """Check INPUT is a folder and OUTPUT a folder outside it, and create OUTPUT."""
    if not input_root.is_dir():
        what = "is not a folder" if input_root.exists() else "does not exist"
        raise InputError(f"input folder {input_root} {what}", "pass the folder that holds your images")
    if is_inside(output_root, input_root):
        raise UsageError(
            f"output folder {output_root} is inside the input folder {input_root}",
            "choose an OUTPUT outside INPUT, otherwise prepared images would be read back as sources",
        )
    return input_root, ensure_output_folder(output_root, "output folder")


def _bring_outputs_up_to_date(
    found: ScanResult,
    opts: RenderOptions,
    dedupe: bool,
    output_root: Path,
    on_progress: Callable[[PrepareProgress], None] | None,
    report: PrepareReport,
) -> dict[str, dict[str, Any]]:
    """Render what is new or changed, settle splits and duplicates, remove stale outputs, and write the
    manifest and the compacted journal; returns the record of every current source."""
    journal = Journal(output_root)
    state, known_outputs = journal.load()
    fp = fingerprint(opts)
    try:
        records = _process(found.candidates, state, fp, opts, output_root, report.workers, journal, on_progress, report)
        records = _settle_splits_and_duplicates(
            records, found.candidates, fp, opts, dedupe, output_root, report.workers, journal, report
        )
        report.removed = remove_stale_outputs(known_outputs, records, output_root)
        write_jsonl(output_root / MANIFEST_NAME, (_manifest_line(r) for r in _written(records)))
        journal.rewrite(records[c.rel] for c in found.candidates if c.rel in records)
    finally:
        journal.close()
    return records


def _written(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((r for r in records.values() if r["status"] == "written"), key=lambda r: r["source"])


def _count(report: PrepareReport, found: ScanResult, records: dict[str, dict[str, Any]], started: float) -> None:
    """Fill in the report's counts, skipped files and speed."""
    written = _written(records)
    skipped = found.skipped + [
        {"source": r["source"], "reason": r["reason"], "detail": r.get("detail", "")}
        for r in records.values()
        if r["status"] == "skipped"
    ]
    skipped.sort(key=lambda s: s["source"])
    report.seen = len(found.candidates) + len(found.skipped)
    report.ignored = found.ignored
    report.outputs = len(written)
    report.train = sum(r["split"] == "train" for r in written)
    report.val = report.outputs - report.train
    report.skipped = dict(sorted(Counter(s["reason"] for s in skipped).items()))
    report.skipped_files = skipped
    report.elapsed_s = round(time.perf_counter() - started, 3)
    report.images_per_s = round(report.written / report.elapsed_s, 2) if report.elapsed_s > 0 else 0.0


def _check_usable(report: PrepareReport, input_root: Path, output_root: Path) -> None:
    """Fail when nothing usable came out: no image files at all, or every one skipped."""
    if report.outputs:
        return
    if report.seen == 0:
        raise InputError(
            f"no image files found under {input_root}",
            f"prepare reads {', '.join(sorted(_short_exts()))} files, in sub-folders too",
        )
    raise InputError(
        f"no usable images under {input_root}: all {report.seen} skipped "
        f"({', '.join(f'{n} {r}' for r, n in report.skipped.items())})",
        f"see {output_root / REPORT_NAME} for each file and why",
    )


def prepare_demo(
    output_dir: str | os.PathLike,
    config: PrepareConfig,
    *,
    on_progress: Callable[[PrepareProgress], None] | None = None,
) -> PrepareReport:
    """Prepare the bundled sample photos (and copy their attribution next to them)."""
    report = prepare_dataset(demo_dir(), output_dir, config, on_progress=on_progress)
    sources = demo_dir() / "SOURCES.md"
    if sources.is_file():
        atomic_write_bytes(Path(output_dir) / "SOURCES.md", sources.read_bytes())
    return report


def prepared_images(output_dir: str | os.PathLike, split: str = "train") -> list[Path]:
    """The prepared images of one split, in manifest order (sorted by source path)."""
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, got '{split}'")
    root = Path(output_dir)
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise InputError(f"{root} has no {MANIFEST_NAME}", f"run: zturbo prepare INPUT {root}")
    lines = (json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip())
    return [root / rec["output"] for rec in lines if rec["split"] == split]


# ---------------------------------------------------------------------------------------------------------
# Internals


def _short_exts() -> set[str]:
    return {e.lstrip(".") for e in image_extensions()}


def _manifest_line(rec: dict[str, Any]) -> dict[str, Any]:
    return {
        "source": rec["source"],
        "output": rec["output"],
        "split": rec["split"],
        "source_size": rec["source_size"],
        "sha256": rec["sha256"],
    }


def _is_fresh(rec: dict[str, Any] | None, cand: Candidate, fp: str, output_root: Path) -> bool:
    """Whether an earlier record still describes this source under these settings."""
    if rec is None or rec.get("fp") != fp or rec.get("stat") != [cand.size, cand.mtime_ns]:
        return False
    if rec["status"] == "skipped":
        return rec.get("reason") in _CACHEABLE_SKIPS
    if rec["status"] == "duplicate":
        return True
    try:  # the size check also catches an output truncated by a power cut
        return (output_root / rec["output"]).stat().st_size == rec["output_bytes"]
    except (OSError, KeyError):
        return False


def _process(
    candidates: list[Candidate],
    state: dict[str, dict[str, Any]],
    fp: str,
    opts: RenderOptions,
    output_root: Path,
    workers: int,
    journal: Journal,
    on_progress: Callable[[PrepareProgress], None] | None,
    report: PrepareReport,
) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    todo: list[Candidate] = []
    for cand in candidates:
        rec = state.get(cand.rel)
        if _is_fresh(rec, cand, fp, output_root):
            records[cand.rel] = rec
        else:
            todo.append(cand)
    progress = PrepareProgress(total=len(candidates), done=len(records), up_to_date=len(records))
    progress.skipped = sum(r["status"] == "skipped" for r in records.values())
    report.up_to_date = progress.up_to_date

    def finished(rec: dict[str, Any]) -> None:
        rec["fp"] = fp
        journal.append(rec)
        records[rec["source"]] = rec
        progress.done += 1
        if rec["status"] == "written":
            progress.written += 1
        else:
            progress.skipped += 1
        if on_progress is not None:
            on_progress(progress)

    if on_progress is not None and not todo:
        on_progress(progress)
    tasks = [(c.path, c.rel, str(output_root), opts) for c in todo]
    run_tasks(
        tasks, workers, opts.max_pixels, finished, started=lambda: on_progress and on_progress(progress)
    )
    report.written += progress.written
    return records


def _settle_splits_and_duplicates(
    records: dict[str, dict[str, Any]],
    candidates: list[Candidate],
    fp: str,
    opts: RenderOptions,
    dedupe: bool,
    output_root: Path,
    workers: int,
    journal: Journal,
    report: PrepareReport,
) -> dict[str, dict[str, Any]]:
    """Move outputs whose split changed (new val fraction), then resolve exact duplicates.

    The first source in path order owns a content hash; with ``dedupe`` the others are
    dropped (outputs deleted), without it they are kept and only counted.
    """
    for rec in records.values():
        if rec["status"] != "written":
            continue
        want = split_for(rec["sha256"], opts.val_fraction)
        if rec["split"] != want:
            new_rel = f"{want}/{output_name(rec['source'], opts.format)}"
            (output_root / new_rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(output_root / rec["output"], output_root / new_rel)
            rec.update(split=want, output=new_rel)
            journal.append(rec)

    owners: dict[str, str] = {}
    for cand in candidates:  # sorted by path: the first one owns the hash
        rec = records.get(cand.rel)
        if rec is None or rec["status"] not in ("written", "duplicate"):
            continue
        owner = owners.setdefault(rec["sha256"], cand.rel)
        if owner != cand.rel:
            report.duplicate_files.append({"source": cand.rel, "of": owner})
    report.duplicates = len(report.duplicate_files)
    duplicate_of = {d["source"]: d["of"] for d in report.duplicate_files}

    redo: list[Candidate] = []
    for cand in candidates:
        rec = records.get(cand.rel)
        if rec is None or rec["status"] not in ("written", "duplicate"):
            continue
        drop = dedupe and cand.rel in duplicate_of
        if drop and rec["status"] == "written":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(output_root / rec["output"])
            rec = {k: v for k, v in rec.items() if k not in ("output", "output_bytes", "split")}
            rec.update(status="duplicate", of=duplicate_of[cand.rel])
            records[cand.rel] = rec
            journal.append(rec)
        elif not drop and rec["status"] == "duplicate":
            redo.append(cand)  # its owner is gone, or dedupe was turned off: render it now

    if redo:

        def finished(rec: dict[str, Any]) -> None:
            rec["fp"] = fp
            journal.append(rec)
            records[rec["source"]] = rec
            report.written += rec["status"] == "written"

        report.up_to_date -= len(redo)
        run_tasks(
            [(c.path, c.rel, str(output_root), opts) for c in redo], workers, opts.max_pixels, finished
        )
    return records
