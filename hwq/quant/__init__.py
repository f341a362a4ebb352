"""The front of the pipeline: the Brevitas model, its calibration, and its lowering to the IR.

Constants the command line needs live here, so that parsing flags imports no torch.
"""

DEFAULT_BATCH = 50
DEFAULT_CALIBRATION_IMAGES = 512
DEFAULT_MULT_BITS = 16
# Brevitas' narrow_range: symmetric weights (its default quantizers'), or every level.
WEIGHT_RANGES = ("narrow", "full")
