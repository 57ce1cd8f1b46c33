"""ATFM (Li et al., AAAI 2026): GTR truncation distribution + Segmentation Flow Matching, registered as "atfm".

Modules: :mod:`.gtr` (Gaussian Truncation Representation), :mod:`.sfm` (flow-matching maths, L_SF and the
ODE solvers), :mod:`.st_net` (the time-conditioned ST-Net), :mod:`.model` (the method plugin; its docstring
lists the paper/release switches and deviations).
"""

from .model import ATFM, ATFMConfig

__all__ = ["ATFM", "ATFMConfig"]
