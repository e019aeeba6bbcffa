"""xctrt: defect segmentation for industrial X-ray CT volumes."""
__version__ = "0.1.0"

from .errors import XctrtError  # noqa: E402
from .io import open_volume  # noqa: E402
from .model import load_package  # noqa: E402


def __getattr__(name):  # Segmenter pulls in the C++ module and onnxruntime: load on first use
    if name in ("Segmenter", "SegmentResult"):
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = ["Segmenter", "SegmentResult", "XctrtError", "open_volume", "load_package", "__version__"]
