"""amisbench: a benchmark suite for ambiguous medical image segmentation."""

__version__ = "0.1.0"
