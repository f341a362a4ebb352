"""The search: CC-EDA (the algorithm), fitness evaluators (the problem), resumable runs.

Constants the command line needs live here, so that parsing flags imports no torch.
"""

FITNESS_MODES = ("accuracy", "margin", "distill")
