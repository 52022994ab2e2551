"""Training-free baselines as strategies of the same registries, so that any comparison is one flag.

=============  ==========================  =============================================  =========
name           registry                    what it is                                     attention
=============  ==========================  =============================================  =========
``random``     ``SCORERS`` (scorer=)       seeded random selection (with recycler none)   no
``uniform``    ``METHODS`` (method=)       evenly spaced tokens of every frame            no
``fastv``      ``MERGERS`` (merger=)       FastV: last-token attention pruning at layer K  in-LLM
``visionzip``  ``METHODS``                 VisionZip per frame: dominant + contextual     yes
``holitom``    ``METHODS``                 HoliTom-style: DP segments, temporal merge,    yes
                                           spatial pruning within segments
``fastvid``    ``METHODS``                 FastVID-style: DySeg + density pruning         yes
``flashvid``   ``METHODS``                 FlashVID-style: DySeg, ADTS selection, tree    yes
                                           spatiotemporal merging + DPC-KNN
``sttm``       ``METHODS``                 STTM: quadtree spatial + directed temporal     no
=============  ==========================  =============================================  =========

Every method returns exactly ``config.budget(F, P)`` tokens; docs/baselines.md describes each one,
its published defaults and how this version differs from the published code.
"""

from ustc.baselines.fastv import FastVMerger, fastv_prune
from ustc.baselines.fastvid import FastVID, dyseg
from ustc.baselines.flashvid import FlashVID, adts, frame_slots, temporal_links, tree_roots
from ustc.baselines.holitom import HoliTom, segment_frames
from ustc.baselines.random_uniform import RandomScorer, UniformSelection, evenly_spaced
from ustc.baselines.sttm import STTM, quadtree
from ustc.baselines.visionzip import VisionZip

__all__ = [
    "STTM",
    "FastVID",
    "FastVMerger",
    "FlashVID",
    "HoliTom",
    "RandomScorer",
    "UniformSelection",
    "VisionZip",
    "adts",
    "dyseg",
    "evenly_spaced",
    "fastv_prune",
    "frame_slots",
    "quadtree",
    "segment_frames",
    "temporal_links",
    "tree_roots",
]
