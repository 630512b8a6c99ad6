"""kmeansinit: gated convolutions and joint k-means weight initialization (Zhou, UT Austin), in PyTorch."""
from .init import (
    METHODS, PRESETS, InitReport, KMeansOptions, LayerReport, he_, initialize_, joint_objective, kmeans_init_, lsuv_, normal_,
    whitening_, xavier_,
)
from .compare import Comparison, compare_inits
from .layers import GatedConv2d
from .models import PaperNet, convert_to_gated, count_parameters, create_model, matching_width
from .objectives import cosine_penalty, kmeans_objective

__version__ = "0.1.0"

__all__ = [
    "GatedConv2d", "cosine_penalty", "kmeans_objective", "kmeans_init_", "initialize_", "joint_objective",
    "InitReport", "LayerReport", "METHODS", "PRESETS", "normal_", "xavier_", "he_", "lsuv_", "whitening_",
    "KMeansOptions", "PaperNet", "create_model", "convert_to_gated", "count_parameters", "matching_width",
    "compare_inits", "Comparison",
]
