"""Paths that come from data, and the folders a job writes to.

One rule for every path read from a file (an index's shard, a latent's source name, a
manifest line, prepare's journal): it is resolved, symlinks included, and must stay
inside the folder it belongs to (:func:`inside`, :func:`resolve_inside`). Names of
files a job writes are derived from keys by :func:`safe_name`, which re-roots ``..``,
absolute and drive parts the way ``zipfile`` extraction does, so a name joined to an
output folder cannot leave it; :func:`unique_names` makes colliding names distinct.
:func:`write_new` and :func:`publish_new` put a finished temp file in place without
ever replacing a file that exists, and :func:`ensure_output_folder` refuses, in one line, an output path that
is a file or a dangling symlink.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from zturbo.errors import InputError

# A written name's longest component, in UTF-8 bytes: file systems allow 255, and a
# temp name adds a dot, a random part and a suffix, and a collision adds a counter.
MAX_COMPONENT_BYTES = 200
# A written name's longest relative path, in bytes (PATH_MAX is 4096 with the output folder's own path).
MAX_NAME_BYTES = 1024
_SEPARATOR = re.compile(r"[\\/]")
_DRIVE = re.compile(r"^[A-Za-z]:$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """True when ``path`` is ``root`` or below it, both resolved (symlinks followed)."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return path == root or root in path.parents


def resolve_inside(root: str | os.PathLike, rel: str, what: str) -> Path:
    """``root / rel`` resolved; an InputError naming ``what`` when ``rel`` is absolute or the path leaves ``root``."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or "\x00" in rel:
        raise InputError(f"{what}: {rel!r} is not a relative path inside {root}")
    path = Path(root) / rel
    if not inside(path, root):
        raise InputError(f"{what}: {rel!r} points outside {root}", "paths in this file must stay inside its folder")
    return path.resolve()


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()


def _clip(part: str, limit: int) -> str:
    raw = part.encode("utf-8")
    if len(raw) <= limit:
        return part
    return raw[: limit - 9].decode("utf-8", "ignore") + "~" + _digest(part)


def safe_name(key: str) -> str:
    """A relative POSIX name for ``key`` that stays inside any folder it is joined to.

    Separators are ``/`` and ``\\``; empty, ``.`` and ``..`` parts and a leading drive
    are dropped (so ``../src/a.png`` -> ``src/a.png``, ``/abs/b.png`` -> ``abs/b.png``),
    control characters become ``_``, text that is not valid UTF-8 is replaced, and over-long
    parts or names are shortened with a digest of the key so they stay distinct.
    """
    parts = [p for p in _SEPARATOR.split(key) if p not in ("", ".", "..")]
    if parts and _DRIVE.match(parts[0]):
        parts = parts[1:]
    parts = [_CONTROL.sub("_", p.encode("utf-8", "replace").decode("utf-8")) for p in parts]
    parts = [_clip(p, MAX_COMPONENT_BYTES) for p in parts]
    if not parts:
        return f"unnamed~{_digest(key)}"
    name = "/".join(parts)
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        name = f"{_digest(key)}~{parts[-1]}"
    return name


def unique_names(names: Iterable[str]) -> list[str]:
    """``names`` with repeats made distinct: the first keeps its name, the next ones get ``~2``, ``~3``, ...

    Compared case-insensitively, so the result is also distinct on case-insensitive file systems.
    """
    names = list(names)
    taken = {n.casefold() for n in names}
    seen: set[str] = set()
    out = []
    for name in names:
        key = name.casefold()
        if key in seen:
            n = 2
            while f"{name}~{n}".casefold() in taken:
                n += 1
            name = f"{name}~{n}"
            key = name.casefold()
            taken.add(key)
        seen.add(key)
        out.append(name)
    return out


class EscapeError(InputError):
    """A path derived from data would leave the folder it belongs to (through a symlink, say)."""


def prepare_parent(root: Path, rel: str) -> Path:
    """``root / rel`` with its parent folders created, refusing (EscapeError) a parent that resolves outside ``root``.

    ``rel`` is a name from :func:`safe_name`; what can still lead outside is a symlinked
    folder inside ``root``, so the parent is resolved before anything is created.
    """
    path = root / rel
    if not inside(path.parent, root):
        raise EscapeError(f"{rel}: a folder on its path leads outside {root} (a symlink)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not inside(path.parent, root):  # replaced by a symlink between the check and the mkdir
        raise EscapeError(f"{rel}: a folder on its path leads outside {root} (a symlink)")
    return path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: setting and restoring the umask while writer threads create files would race.
_UMASK = _read_umask()


def write_new(path: Path, write: Callable[[Path], None]) -> bool:
    """Write a file at ``path`` through ``write(tmp)`` on a temp file beside it, then :func:`publish_new` it.

    Returns False, writing nothing there, when ``path`` exists. The file gets the mode a plain
    ``open()`` would give it (the temp file is created 0600).
    """
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return publish_new(tmp, path)


def publish_new(tmp: Path, path: Path) -> bool:
    """Move the finished ``tmp`` to ``path`` unless something exists there (a file, folder or link).

    A hard link is atomic and fails when ``path`` exists, so a file appearing meanwhile is
    never replaced; where the file system has no hard links the existence check and the
    rename are two steps. Returns False, leaving ``path`` alone, when it existed. ``tmp``
    is gone either way.
    """
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        if os.path.lexists(path):
            return False
        os.replace(tmp, path)
        return True
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def check_output_folder(path: str | os.PathLike, flag: str = "--output") -> Path:
    """``path`` when it can be an output folder; an InputError in one line when it is a file or a dangling link."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise InputError(
            f"{flag} {path} is a symlink to {os.readlink(path)}, which does not exist",
            "point the link at a folder, or give another path",
        )
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file, not a folder", "give a folder (it is created when missing)")
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise InputError(f"{flag} {path}: {parent} is not a folder", "give a path under a folder")
            break
    return path


def ensure_output_folder(path: str | os.PathLike, flag: str = "--output") -> Path:
    """Check ``path`` (:func:`check_output_folder`) and create it; an InputError when that fails."""
    path = check_output_folder(path, flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {flag} {path}: {exc.strerror or exc}", "choose a folder you can write to") from exc
    return path
