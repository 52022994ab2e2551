"""Real checkpoints and real videos, for users who have them.

Nothing here is needed by the compressor itself; the heavy or optional dependencies (PyAV or
decord for decoding, torchvision for the transformers video processors, the checkpoints) are
imported only when a function needs them.

    model, processor = load_model("llava-hf/llava-onevision-qwen2-7b-ov-hf")
    frames = load_video("clip.mp4", num_frames=32)                  # (F, H, W, 3) uint8
    inputs = video_inputs(processor, frames, "What happens after the man sits down?")
    handle = ustc.attach(model, ustc.CompressionConfig(retention=0.02))
    out = model.generate(**inputs.to(model.device), max_new_tokens=64)
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: frames sampled per video by the paper's backbones (Section 4.1): LLaVA-OneVision 32,
#: LLaVA-Video 64
DEFAULT_FRAMES = 32


def sample_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """Uniform frame sampling of LLaVA-OneVision / lmms-eval: ``linspace(0, T - 1, F)`` floored.

    Videos shorter than ``num_frames`` give every frame once.
    """
    if total_frames < 1:
        raise ValueError(f"the video has no frames (total_frames={total_frames})")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if total_frames <= num_frames:
        return list(range(total_frames))
    return np.linspace(0, total_frames - 1, num_frames, dtype=int).tolist()


def load_video(
    path: str | Path, num_frames: int = DEFAULT_FRAMES, backend: str | None = None
) -> np.ndarray:
    """Decode ``num_frames`` uniformly sampled RGB frames: (F, H, W, 3) uint8.

    backend: ``"decord"``, ``"pyav"``, or None for the first one installed (decord, then PyAV;
    ``pip install ustc[video]`` installs PyAV).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no video file at {path}")
    if backend is None:
        backend = "decord" if _installed("decord") else "pyav" if _installed("av") else None
        if backend is None:
            raise ImportError("decoding a video needs PyAV (pip install av) or decord")
    if backend == "decord":
        return _load_decord(path, num_frames)
    if backend == "pyav":
        return _load_pyav(path, num_frames)
    raise ValueError(f"backend must be 'decord', 'pyav' or None, got {backend!r}")


def _load_decord(path: Path, num_frames: int) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    indices = sample_frame_indices(len(reader), num_frames)
    return reader.get_batch(indices).asnumpy()


def _load_pyav(path: Path, num_frames: int) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total = stream.frames
        if total <= 0:  # not in the header: count the packets (no decoding)
            total = sum(1 for packet in container.demux(stream) if packet.size > 0)
    wanted = sample_frame_indices(total, num_frames)
    keep = set(wanted)
    frames: list[np.ndarray] = []
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in keep:
                frames.append(frame.to_ndarray(format="rgb24"))
            if index >= wanted[-1]:
                break
    if not frames:
        raise ValueError(f"could not decode any frame of {path}")
    return np.stack(frames)


def load_model(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    device_map: str | dict[str, Any] | None = "auto",
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Load a supported Video-LLM and its processor from a hub id or a local directory.

    Works with ``llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf``, LLaVA-Video checkpoints in the
    LLaVA-OneVision format, and ``Qwen/Qwen2.5-VL-{3B,7B,72B}-Instruct``.  The processor's video
    part needs torchvision.  Returns (model in eval mode, processor).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(
        str(name_or_path),
        dtype=dtype,
        attn_implementation=attn_implementation,
        device_map=device_map,
        **kwargs,
    )
    processor = AutoProcessor.from_pretrained(str(name_or_path))
    return model.eval(), processor


def video_inputs(processor: Any, frames: np.ndarray, question: str, **processor_kwargs: Any) -> Any:
    """Tokenised chat prompt (video, then the question) and pixel inputs for ``generate()``.

    frames: (F, H, W, 3) uint8 from ``load_video``.  Returns the processor's ``BatchFeature``
    (``input_ids``, ``attention_mask``, ``pixel_values_videos`` and, for Qwen2.5-VL,
    ``video_grid_thw`` and ``mm_token_type_ids``).
    """
    if not _installed("torchvision"):
        raise ImportError(
            "the transformers video processors need torchvision; install the torchvision build "
            "that matches your torch (pip install torchvision==<matching version>)"
        )
    conversation = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return processor(text=[prompt], videos=[frames], return_tensors="pt", **processor_kwargs)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
