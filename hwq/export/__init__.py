"""Export of an integer program to other tools' formats (QONNX, for FINN and qonnx).

The exporter (`qonnx_export.py`) writes the program as a graph that computes the same
integers, and `check.py` proves it on real images by running the file with the other
side's own executor. Both import onnx and qonnx (the optional extra `hwq[export]`), so
nothing here is imported by `hwq --help`.
"""

from __future__ import annotations

FORMATS = ("qonnx",)
INSTALL_HINT = "pip install 'hwq[export]'"
