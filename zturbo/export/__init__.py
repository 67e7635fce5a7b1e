"""Export: ONNX graphs, TensorRT engines and the diffusers folder format, each verifiable.

    from zturbo.export import export_model, import_diffusers
    meta = export_model("runs/demo", "out/onnx", ExportConfig(precision="fp16", verify=True))
    backend = create_backend("onnx", "out/onnx")

See ``zturbo.export.layout`` for the folder an export writes.
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
