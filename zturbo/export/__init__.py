"""Export writers: ONNX graphs, TensorRT engines and the diffusers folder format.

    >>> from zturbo.backends.verify import export_checkpoint
    >>> meta = export_checkpoint("runs/demo", "out/onnx", ExportConfig(precision="fp16", verify=True))
    >>> backend = open_backend("out/onnx")

This package writes files from a model folder (``export_model``); verifying an
ONNX or TensorRT export runs it on a backend, so that step lives above, in
``zturbo.backends.verify``. See ``zturbo.export.layout`` for the folder an export writes.
"""

from zturbo.export.diffusers_format import export_diffusers, import_diffusers
from zturbo.export.layout import META_NAME, is_export_dir, read_export_meta
from zturbo.export.pipeline import export_model

__all__ = [
    "META_NAME",
    "export_diffusers",
    "export_model",
    "import_diffusers",
    "is_export_dir",
    "read_export_meta",
]
