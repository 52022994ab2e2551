"""The micro Video-LLM of the laboratory: LLaVA-OneVision with a small SigLIP and a small Qwen2.

It is built from the real transformers classes (``LlavaOnevisionConfig``,
``LlavaOnevisionForConditionalGeneration``) and fed through the video path (``pixel_values_videos``
and the video placeholder token), so every adapter written for LLaVA-OneVision runs on it
unchanged.  Shapes, with the defaults of :mod:`ustc.lab.scenes`:

    video (B, F=8, 3, 64, 64) -> SigLIP, patch 8: (B*F, 64, 64) -> projector (B*F, 64, 128)
    -> LLaVA-OV 2x bilinear pooling (B*F, 16, 128) -> (B, N=128, 128) + 1 image_newline
    -> Qwen2, 4 decoder layers, hidden 128.

The tokenizer is a word-level ``PreTrainedTokenizerFast`` built locally from the fixed vocabulary of
the question templates; the prompt follows LLaVA-OneVision's chat template::

    <|im_start|>user <video>\\n{question}\\nA. {option}\\n...D. {option}<|im_end|>\\n
    <|im_start|>assistant\\n

and the answer is one letter token.  lmms-eval's instruction line ("Answer with the option's
letter ...") is left out: it would be the same 12 tokens in every prompt, and the suffix after the
video is what the training pays for per question.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from ustc.config import CompressionConfig
from ustc.lab import scenes
from ustc.lab.scenes import LETTERS, Question

SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<video>",
)
IMAGE_TOKEN_ID = SPECIAL_TOKENS.index("<image>")
VIDEO_TOKEN_ID = SPECIAL_TOKENS.index("<video>")
INSTRUCTION = "Answer with the option's letter from the given choices directly."

#: decoder layers of the lab LLM and the lab's merger layer K (the paper: K = 18 of 28 layers)
LLM_LAYERS = 4
LAB_LAYER = 2

WEIGHTS_DIR = "weights"
WEIGHTS_FILE = "model.safetensors"

_PIECES = re.compile(r"\n|[A-Za-z0-9']+|[^\sA-Za-z0-9']")


@dataclass(frozen=True)
class LabShape:
    """Sizes of the lab model.  P = (size / patch / 2)^2 tokens per frame after pooling."""

    frames: int = scenes.FRAMES
    size: int = scenes.SIZE
    patch: int = 4
    vision_hidden: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    hidden: int = 128
    intermediate: int = 256
    layers: int = LLM_LAYERS
    heads: int = 4
    kv_heads: int = 2

    @property
    def tokens_per_frame(self) -> int:
        side = -(-self.size // self.patch)
        return (-(-side // 2)) ** 2

    @property
    def video_tokens(self) -> int:
        """Placeholder tokens of one video: F * P features plus LLaVA-OV's one image_newline."""
        return self.frames * self.tokens_per_frame + 1


def default_config(**changes: Any) -> CompressionConfig:
    """The paper's hyperparameters with the merger layer scaled to the lab LLM (K = 2 of 4)."""
    return CompressionConfig(layer=LAB_LAYER).replace(**changes)


# ----------------------------------------------------------------------------- tokenizer


def vocabulary() -> list[str]:
    """Every token of the lab's prompts: special tokens first, then words in first-seen order."""
    texts = [
        "user assistant system",
        INSTRUCTION,
        *scenes.QUESTIONS.values(),
        " ".join(scenes.COLOUR_NAMES),
        " ".join(scenes.SHAPES),
        " ".join(scenes.COUNTS),
        " ".join(LETTERS) + " . : ,",
    ]
    words: list[str] = [*SPECIAL_TOKENS, "\n"]
    for text in texts:
        for piece in _PIECES.findall(text.replace("{colour}", "")):
            if piece not in words:
                words.append(piece)
    return words


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :func:`vocabulary`, built locally with ``tokenizers``."""
    vocab = {word: i for i, word in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n|[^\sA-Za-z0-9']"), behavior="isolated"),
        ]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )


def prompt(question: Question, options: bool = True) -> str:
    """LLaVA-OneVision's chat format with one ``<video>`` placeholder and the generation prompt.

    ``options=False`` leaves out the option lines (the open-ended form used in training, answered
    with the option's word instead of its letter).
    """
    if len(question.options) != len(LETTERS):
        raise ValueError(f"a question needs {len(LETTERS)} options, got {question.options}")
    lines = "".join(
        f"\n{a}. {o}" for a, o in zip(LETTERS, question.options, strict=True) if options
    )
    return f"<|im_start|>user <video>\n{question.text}{lines}<|im_end|>\n<|im_start|>assistant\n"


def encode_prompts(
    tokenizer: PreTrainedTokenizerFast,
    questions: list[Question],
    video_tokens: int,
    options: list[bool] | None = None,
) -> list[list[int]]:
    """Token ids of each prompt with ``<video>`` expanded to ``video_tokens`` placeholders.

    This is what ``LlavaOnevisionProcessor`` does for a video of F frames: one placeholder per
    visual feature (F * P) plus one for the image_newline.
    """
    out = []
    for i, q in enumerate(questions):
        text = prompt(q, options=True if options is None else options[i])
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if tokenizer.unk_token_id in ids:
            raise ValueError(f"prompt has words outside the lab vocabulary: {text!r}")
        at = ids.index(VIDEO_TOKEN_ID)
        out.append(ids[:at] + [VIDEO_TOKEN_ID] * video_tokens + ids[at + 1 :])
    return out


def letter_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Token ids of the answer letters A-D."""
    return [tokenizer.convert_tokens_to_ids(letter) for letter in LETTERS]


def pixel_values(frames: np.ndarray) -> torch.Tensor:
    """uint8 videos (B, F, H, W, 3) -> SigLIP input (B, F, 3, H, W), scaled to [-1, 1].

    SigLIP's image processor normalises with mean 0.5 and std 0.5 per channel.
    """
    if frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (B, F, H, W, 3), got shape {frames.shape}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 1, 4, 2, 3).float()
    return x / 127.5 - 1.0


# ----------------------------------------------------------------------------- model


def lab_model_config(shape: LabShape | None = None) -> LlavaOnevisionConfig:
    """The ``LlavaOnevisionConfig`` of the lab model (a small SigLIP and a small Qwen2)."""
    shape = shape or LabShape()
    vocab_size = len(vocabulary())
    vision = SiglipVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=2 * shape.vision_hidden,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.size,
        patch_size=shape.patch,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=SPECIAL_TOKENS.index("<|im_start|>"),
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=True,
    )
    config.lab = {"frames": shape.frames, "size": shape.size, "merger_layer": LAB_LAYER}
    return config


def build_model(
    shape: LabShape | None = None, seed: int = 0
) -> LlavaOnevisionForConditionalGeneration:
    """A randomly initialised lab model (deterministic for a given ``seed``)."""
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(lab_model_config(shape))
    return model.eval()


def weights_path() -> Path:
    """Folder of the shipped weights inside the package (``ustc/lab/weights``)."""
    return Path(str(resources.files("ustc.lab"))) / WEIGHTS_DIR


def load_model(path: str | Path | None = None) -> LlavaOnevisionForConditionalGeneration:
    """The trained lab model, from the package data by default, in eval mode, fp32, on CPU."""
    folder = Path(path) if path is not None else weights_path()
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no lab weights in {folder} (expected {WEIGHTS_FILE} and config.json); train them "
            "with `python -m ustc.lab.train --out ustc/lab/weights` (see docs/lab.md)"
        )
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def training_record(path: str | Path | None = None) -> dict[str, Any]:
    """The JSON record written next to the weights: training settings and measured accuracies."""
    folder = Path(path) if path is not None else weights_path()
    with open(folder / "lab.json") as f:
        return json.load(f)
