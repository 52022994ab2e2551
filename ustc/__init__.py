"""ustc: Unified Spatiotemporal Token Compression for Video-LLMs at Ultra-Low Retention."""

from ustc.compressor import CompressionResult, Compressor, MergeResult
from ustc.config import CompressionConfig, merge_keep, visual_budget
from ustc.models import attach
from ustc.registry import MERGERS, METHODS, POOLS, RECYCLERS, SCORERS
from ustc.session import VideoSession, prepare

__all__ = [
    "MERGERS",
    "METHODS",
    "POOLS",
    "RECYCLERS",
    "SCORERS",
    "CompressionConfig",
    "CompressionResult",
    "Compressor",
    "MergeResult",
    "VideoSession",
    "attach",
    "merge_keep",
    "prepare",
    "visual_budget",
]
__version__ = "0.1.0"
