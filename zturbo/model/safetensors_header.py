"""What a weights file is, from its first bytes: a safetensors header read without the tensors, or a pickle.

    header = read_header("ae.safetensors")     # names, dtypes, shapes, metadata; nothing loaded
    sniff("vae.ckpt")                          # "pickle": refused, never unpickled

A safetensors file is 8 bytes of header length, a JSON header (each tensor's dtype,
shape and byte range) and the tensor bytes. Reading the header alone tells the
architecture (the shapes) and whether the file is whole: the largest byte range it
promises must lie inside the file, else the file is named as truncated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from zturbo.model.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip container


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)


def sniff(path: Path) -> str | None:
    """'safetensors', 'pickle' or None (neither), by suffix and first bytes; never unpickles anything."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return None
    if _opens_as_safetensors(head):
        return "safetensors"
    return "pickle" if _is_pickle(head) else None


def pickle_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a PyTorch pickle ({path.suffix or 'no extension'}), which zturbo never unpickles "
        "(loading one runs code it holds)",
        "use the .safetensors release of these weights, or convert it where you trust the file: "
        "safetensors.torch.save_file(torch.load(PATH, weights_only=True), 'vae.safetensors')",
    )


def read_header(path: str | Path) -> Header:
    """The header of a safetensors file; CheckpointError (one line) for a truncated, corrupt or pickle file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(9)  # the header length and the header's first byte
            length = int.from_bytes(head[:8], "little")
            whole = _opens_as_safetensors(head) and 8 + length <= size
            raw = head[8:] + fh.read(length - 1) if whole else b""
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not _opens_as_safetensors(head):
        if _is_pickle(head):
            raise pickle_refusal(path)
        if len(head) < 9:
            raise CheckpointError(f"{path} is truncated: {size} bytes, less than a safetensors header")
        raise CheckpointError(f"{path} is not a safetensors file: it does not open with a header length and JSON")
    if not whole:
        raise CheckpointError(f"{path} is truncated: its header alone needs {8 + length} bytes, the file has {size}")
    try:
        header = json.loads(raw)
        metadata = header.pop("__metadata__", None) or {}
        tensors = {name: TensorInfo(str(info["dtype"]), tuple(int(d) for d in info["shape"]))
                   for name, info in header.items()}
        end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{path} is corrupt: its safetensors header does not parse ({exc})") from exc
    if 8 + length + end > size:
        raise CheckpointError(
            f"{path} is truncated: its {len(tensors)} tensors need {8 + length + end} bytes, the file has {size} "
            "(an interrupted download or copy?)"
        )
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path} is corrupt: its safetensors metadata is not a mapping")
    return Header(tensors, {str(k): str(v) for k, v in metadata.items()})


def _opens_as_safetensors(head: bytes) -> bool:
    """8 bytes of a plausible header length, then the JSON header's opening brace."""
    return len(head) == 9 and 2 <= int.from_bytes(head[:8], "little") <= _MAX_HEADER and head[8:9] == b"{"


def _is_pickle(head: bytes) -> bool:
    """torch.save's zip container, or a bare pickle (protocol 2 to 5 opens with 0x80 and the protocol)."""
    return head.startswith(_ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
