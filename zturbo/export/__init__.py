"""Export writers: ONNX graphs, TensorRT engines, the diffusers folder format and one .safetensors file.

    >>> from zturbo.backends.verify import export_checkpoint
    >>> meta = export_checkpoint("runs/demo", "out/onnx", ExportConfig(precision="fp16", verify=True))
    >>> backend = open_backend("out/onnx")

This package writes files from a model folder (``export_model``); verifying an
ONNX or TensorRT export runs it on a backend, so that step lives above, in
``zturbo.backends.verify``. See ``zturbo.export.layout`` for the folder an export writes.
"""

from zturbo.export.diffusers_format import export_diffusers, import_diffusers, import_model
from zturbo.export.layout import META_NAME, is_export_dir, read_export_meta
from zturbo.export.pipeline import export_model
from zturbo.export.single_file import export_single_file, loader_limits

__all__ = [
    "META_NAME",
    "export_diffusers",
    "export_model",
    "export_single_file",
    "import_diffusers",
    "import_model",
    "is_export_dir",
    "loader_limits",
    "read_export_meta",
]
