"""Baselines a user would pick instead of CC-EDA, each Brevitas' own implementation, run on
the same model, data and bit widths and lowered with the same lowering, so that their
accuracy is measured on the same integer datapath (accel_sim) as CC-EDA's.

Constants the command line needs live here, so that parsing flags imports no torch.
"""

from __future__ import annotations

# Post-training: round-to-nearest, Brevitas' GPTQ, GPFQ and learned rounding (AdaRound).
PTQ_METHODS = ("rtn", "gptq", "gpfq", "learned-round")
# Quantization-aware training with straight-through estimators: plain, A2Q and A2Q+.
QAT_METHODS = ("qat", "a2q", "a2q-plus")
A2Q_METHODS = ("a2q", "a2q-plus")  # Brevitas' accumulator-aware (narrow-range) weight quantizers
METHODS = PTQ_METHODS + QAT_METHODS
# What `hwq sweep --methods` runs besides the baselines: CC-EDA from round-to-nearest, and
# CC-EDA from the most accurate baseline of the same point (hwq train --init-ir).
CCEDA_METHODS = ("cc-eda", "cc-eda-best")
SWEEP_METHODS = METHODS + CCEDA_METHODS

DEFAULT_LEARNED_ROUND_ITERS = 1000  # per layer, Brevitas' ptq_evaluate default
# Where `--method qat` starts: the post-training program it fine-tunes.
QAT_STARTS = ("rtn", "gptq", "gpfq")
OPTIMIZERS = ("sgd", "adam")
