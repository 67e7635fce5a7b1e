"""Prepare's crash-safe bookkeeping: an append-only journal, an output lock, temp-file cleanup.

The journal (``OUTPUT/.prepare/state.jsonl``) gets one line per finished source, flushed
as soon as the output is in place, so a run killed at any moment resumes where it
stopped. A half-written last line (power loss) is ignored on load. At the end of a
run the journal is compacted atomically to one line per current source.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from zturbo.data.prepare_image import OUTPUT_EXT, TMP_SUFFIX
from zturbo.errors import InputError, UsageError
from zturbo.paths import inside
from zturbo.utils import atomic_path

STATE_DIR = ".prepare"
SPLITS = ("train", "val")


class Journal:
    def __init__(self, output_root: Path):
        self.path = output_root / STATE_DIR / "state.jsonl"
        self._fh = None

    def load(self) -> tuple[dict[str, dict[str, Any]], set[str]]:
        """Latest record per source, and every output path any record ever named.

        A line that is not a well-formed record (a torn last line after a power cut, or an
        edited one) is ignored, so its source is redone; in particular a record whose output
        is not one prepare writes (``is_prepared_output``) never reaches the code that moves
        or deletes outputs.
        """
        records: dict[str, dict[str, Any]] = {}
        outputs: set[str] = set()
        if not self.path.exists():
            return records, outputs
        root = self.path.parent.parent
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not _well_formed(rec, root):
                    continue
                records[rec["source"]] = rec
                if rec.get("output"):
                    outputs.add(rec["output"])
        return records, outputs

    def append(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        # One write() per complete line: a killed process never leaves half a line behind.
        self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._fh.flush()

    def rewrite(self, records: Iterable[dict[str, Any]]) -> None:
        self.close()
        write_jsonl(self.path, records)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def is_prepared_output(rel: object, root: Path) -> bool:
    """``rel`` names a file prepare writes: ``train/...`` or ``val/...`` with an output format's
    extension, relative, without ``.`` or ``..`` parts, and inside ``root`` once symlinks are resolved."""
    if not isinstance(rel, str) or "\\" in rel or "\x00" in rel:
        return False
    parts = rel.split("/")
    if len(parts) < 2 or parts[0] not in SPLITS or any(p in ("", ".", "..") for p in parts):
        return False
    if os.path.splitext(parts[-1])[1] not in OUTPUT_EXT.values():
        return False
    return inside(root / rel, root / parts[0])


def _well_formed(rec: object, root: Path) -> bool:
    if not isinstance(rec, dict) or not isinstance(rec.get("source"), str):
        return False
    status = rec.get("status")
    if status == "written":
        return (is_prepared_output(rec.get("output"), root) and rec.get("split") in SPLITS
                and isinstance(rec.get("sha256"), str) and isinstance(rec.get("output_bytes"), int))
    if status == "duplicate":
        return isinstance(rec.get("sha256"), str) and "output" not in rec
    return status == "skipped" and "output" not in rec


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with atomic_path(path, suffix=TMP_SUFFIX) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(rec, separators=(",", ":")) + "\n" for rec in records)
        fh.flush()
        os.fsync(fh.fileno())


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path, suffix=TMP_SUFFIX) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class OutputLock:
    """An exclusive POSIX lock on ``OUTPUT/.prepare/lock``, released by the kernel if the process dies.

    ``lockf`` locks belong to the process and are not inherited by forked workers, so a
    killed run never leaves the folder locked behind it.
    """

    def __init__(self, output_root: Path):
        self.path = output_root / STATE_DIR / "lock"
        self._fd: int | None = None

    def __enter__(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(
                f"output folder {self.path.parent.parent} is not writable: {exc.strerror or exc}",
                "choose an OUTPUT folder you can write to, or fix its permissions",
            ) from exc
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no cross-process guard
            return
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            self._fd = None
            raise UsageError(
                f"another zturbo prepare is writing to {self.path.parent.parent}",
                "wait for it to finish, or use a different OUTPUT folder",
            ) from exc

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None


def remove_temp_files(output_root: Path) -> int:
    """Delete temp files a killed run left behind (only ours: the ``.zturbo-tmp`` suffix)."""
    removed = 0
    for dirpath, _dirnames, filenames in os.walk(output_root):
        for name in filenames:
            if name.endswith(TMP_SUFFIX):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def remove_empty_dirs(root: Path) -> None:
    """Remove folders left empty under ``root`` (not ``root`` itself), deepest first."""
    if not root.is_dir():
        return
    for dirpath, _dirnames, _filenames in os.walk(root, topdown=False):
        if Path(dirpath) != root:
            try:
                os.rmdir(dirpath)  # fails, harmlessly, unless empty
            except OSError:
                pass


def remove_stale_outputs(
    known_outputs: set[str], records: dict[str, dict[str, Any]], output_root: Path
) -> int:
    """Delete outputs earlier runs wrote that no current source owns (source removed, format changed)."""
    current = {r["output"] for r in records.values() if r["status"] == "written"}
    removed = 0
    for rel in sorted(known_outputs - current):
        # Journal.load keeps only outputs prepare writes (train/ or val/, inside OUTPUT); checked
        # again here, right before deleting.
        path = output_root / rel
        if not is_prepared_output(rel, output_root) or path.is_dir():
            continue
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
    for split in SPLITS:
        remove_empty_dirs(output_root / split)
    return removed
