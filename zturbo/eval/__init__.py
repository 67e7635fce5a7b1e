"""Reconstruction quality: PSNR, SSIM / MS-SSIM, LPIPS and rFID, for one model or two side by side."""

from zturbo.eval.metrics import MetricSuite, ms_ssim_uint8, psnr_uint8, ssim_uint8
from zturbo.eval.report import per_image_csv, render_tables, report_json, write_report
from zturbo.eval.runner import EvalReport, evaluate

__all__ = [
    "EvalReport",
    "MetricSuite",
    "evaluate",
    "ms_ssim_uint8",
    "per_image_csv",
    "psnr_uint8",
    "render_tables",
    "report_json",
    "ssim_uint8",
    "write_report",
]
