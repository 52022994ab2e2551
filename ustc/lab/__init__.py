"""The laboratory benchmark: a micro Video-LLM trained on generated videos, so that ablations mean
something on a CPU.

- :mod:`ustc.lab.scenes`   procedural videos of coloured shapes and multiple-choice questions
                           (families: stationary, hit, count, order, rare), 8 frames of
                           10 x 10 visual tokens.
- :mod:`ustc.lab.model`    the micro LLaVA-OneVision (small SigLIP + small Qwen2), its word-level
                           tokenizer and prompt format, loading of the shipped weights.
- :mod:`ustc.lab.train`    ``python -m ustc.lab.train --out DIR``: training from scratch.
- :mod:`ustc.lab.evaluate` accuracy per family and overall for any ``CompressionConfig``.
- :mod:`ustc.lab.properties` ``python -m ustc.lab.properties``: the lab's properties 1-4 of
                           issue 27 (attention, feature geometry, text, oracle shape) with
                           their thresholds.

    import ustc.lab as lab
    model = lab.load_model()                                  # shipped weights, CPU
    lab.evaluate(None, model=model).overall                   # uncompressed test accuracy
    lab.evaluate(lab.default_config(), model=model)           # the method at 2 %, K = 2
    lab.evaluate(None, model=model, selector=lab.random_selector(0.02))   # random 2 %
    lab.evaluate(None, model=model, selector=lab.oracle_selector(0.02))   # keeps the evidence
"""

from __future__ import annotations

from pathlib import Path

from ustc.lab.evaluate import (
    EvalResult,
    evaluate,
    evidence_order,
    oracle_selector,
    random_selector,
    samples,
)
from ustc.lab.model import (
    LAB_LAYER,
    LLM_LAYERS,
    LabShape,
    build_model,
    build_tokenizer,
    default_config,
    lab_model_config,
    load_model,
    prompt,
    training_record,
    weights_path,
)
from ustc.lab.scenes import FAMILIES, SPLIT_CODE, Question, Sample, make_sample

#: the splits ``evaluate`` accepts (``train`` is an unbounded stream and needs ``limit``)
SPLITS: tuple[str, ...] = tuple(SPLIT_CODE)


def check(split: str = "test", path: str | Path | None = None) -> None:
    """Fail fast, without loading the model, if the split is unknown or the weights are missing."""
    if split not in SPLITS:
        raise ValueError(f"lab split must be one of {', '.join(SPLITS)}, got {split!r}")
    folder = Path(path) if path is not None else weights_path()
    missing = [f for f in ("model.safetensors", "config.json") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"lab weights missing in {folder}: {', '.join(missing)}; train them with "
            "`python -m ustc.lab.train --out ustc/lab/weights` (see docs/lab.md)"
        )


def flops_spec():  # noqa: ANN201  (ustc.flops is imported lazily: it is optional here)
    """The lab LLM's sizes as a :class:`ustc.flops.ModelSpec` (for Eq. S3 FLOPs)."""
    from ustc.flops import ModelSpec

    shape = LabShape()
    return ModelSpec(
        name="ustc-lab micro LLaVA-OV",
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_heads=shape.heads,
        num_kv_heads=shape.kv_heads,
        frames=shape.frames,
        tokens_per_frame=shape.tokens_per_frame,
    )


__all__ = [
    "FAMILIES",
    "LAB_LAYER",
    "LLM_LAYERS",
    "SPLITS",
    "EvalResult",
    "LabShape",
    "Question",
    "Sample",
    "build_model",
    "build_tokenizer",
    "check",
    "default_config",
    "evaluate",
    "evidence_order",
    "flops_spec",
    "lab_model_config",
    "load_model",
    "make_sample",
    "oracle_selector",
    "prompt",
    "random_selector",
    "samples",
    "training_record",
]
