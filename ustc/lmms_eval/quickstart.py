"""An lmms-eval run with no network and no checkpoint to download: a tiny random
LLaVA-OneVision saved as a local checkpoint, and a five-question video task (``ustc_toy``) with
its clips, written into one folder.

    python -m ustc.lmms_eval.quickstart lmms-quickstart     # writes checkpoint/ and task/ there

then the ``lmms-eval`` command it prints (docs/lmms-eval.md, "Offline quick start").  The model
is random, so its answers are chance; what the run shows is the path: lmms-eval finds the ustc
model through its entry point, loads a local checkpoint, compresses every video as the
``--model_args`` say, and writes its results and samples (with the tokens that entered the LLM).
Needs PyAV (``pip install -e ".[video]"``) for the clips.  tests/test_lmms_eval.py runs the
documented commands.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: the ustc_toy task shipped with the package (ustc_toy.yaml, utils.py, questions.jsonl)
TOY_TASK = Path(__file__).with_name("toy_task")
#: vocabulary size and the image / video placeholder ids of the tiny model
VOCAB, IMAGE_TOKEN, VIDEO_TOKEN = 96, 90, 91
#: the tiny LLM (Qwen2 here; tests/models_helpers.py gives every tiny backbone the same): hidden
#: 64, 4 heads, 2 KV heads; its vocabulary and depth come with each config
TINY_LLM: dict[str, int] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
#: the tiny ViT (SigLIP here; tests/models_helpers.py gives the other ViT towers the same): hidden
#: 32, MLP 64, 2 heads; its depth, image and patch sizes come with each config
TINY_VIT: dict[str, int] = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
#: words of the tiny tokenizer (WordLevel, split on spaces and newlines): the task's prompts
WORDS = [
    "[UNK]",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "system",
    "user",
    "assistant",
    "You",
    "are",
    "a",
    "helpful",
    "assistant.",
    "what",
    "colour",
    "is",
    "the",
    "ball",
    "in",
    "at",
    "end",
    "of",
    "video",
    "?",
    "A",
    "B",
    "C",
    ".",
    "red",
    "blue",
    "green",
    "answer",
    "with",
    "letter",
]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
#: the settings of the documented command: 4 frames of 16 tokens, 25 % kept, merged at K = 1
MODEL_ARGS = "max_frames_num=4,retention=0.25,merger=text-aware,layer=1"


def tiny_tokenizer() -> Any:
    """A word-level tokenizer over :data:`WORDS`, with ``<image>`` / ``<video>`` at
    :data:`IMAGE_TOKEN` / :data:`VIDEO_TOKEN` and fillers up to :data:`VOCAB` ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = WORDS + [f"w{i}" for i in range(len(WORDS), IMAGE_TOKEN)] + ["<image>", "<video>"]
    words += [f"x{i}" for i in range(len(words), VOCAB)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "removed"), pre_tokenizers.WhitespaceSplit()]
    )
    # the chat markers are special tokens, as in Qwen2's tokenizer: never glued to a word
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[UNK]",
        additional_special_tokens=[w for w in WORDS if w.startswith("<|")],
    )


def tiny_config(
    layers: int = 3,
    image_size: int = 28,
    patch_size: int = 4,
    vision_layers: int = 2,
    vocab: int = VOCAB,
    image_token: int = IMAGE_TOKEN,
    video_token: int = VIDEO_TOKEN,
) -> Any:
    """The ``LlavaOnevisionConfig`` of a tiny LLaVA-OneVision: SigLIP (``vision_layers``
    layers; 28 px images in 4 px patches -> 7 x 7 patches, pooled to 4 x 4 = 16 tokens per frame)
    and Qwen2 (``layers`` layers, ``vocab`` ids).  tests/models_helpers.py builds the tests'
    LLaVA-OneVision and LLaVA-Video layouts from it too."""
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            **TINY_VIT,
            "num_hidden_layers": vision_layers,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": vocab,
            **TINY_LLM,
            "num_hidden_layers": layers,
        },
        image_token_id=image_token,
        video_token_id=video_token,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )


def tiny_model(layers: int = 3, seed: int = 0, attn: str = "sdpa") -> Any:
    """A random LLaVA-OneVision of :func:`tiny_config`, greedy, no eos stop, pad id 0."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_config(layers)
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = attn
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def tiny_checkpoint(folder: str | Path) -> Path:
    """The tiny model and its tokenizer saved as a checkpoint folder (``pretrained=<folder>``)."""
    folder = Path(folder)
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_clip(path: str | Path, colours: list[tuple[int, int, int]], frames: int = 8) -> None:
    """An mp4 of ``frames`` 32 x 32 frames: a ball of each colour in turn on grey (PyAV)."""
    try:
        import av
    except ImportError:
        raise SystemExit(
            'the clips need PyAV: pip install -e ".[video]" (or pip install av)'
        ) from None
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.full((32, 32, 3), 128, np.uint8)
            colour = colours[i * len(colours) // frames]
            x = 4 + 3 * i
            image[10:22, x : x + 12] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def toy_task(folder: str | Path) -> Path:
    """The ustc_toy task copied to ``folder`` with its clips written into ``videos/``."""
    folder = Path(folder)
    shutil.copytree(TOY_TASK, folder, ignore=shutil.ignore_patterns("__pycache__", "videos"))
    (folder / "videos").mkdir()
    for line in (folder / "questions.jsonl").read_text().splitlines():
        name = json.loads(line)["video"]
        write_clip(folder / "videos" / name, [COLOURS[c] for c in name[:-4].split("_")])
    return folder


def command() -> str:
    """The lmms-eval command that evaluates ``checkpoint/`` on ``task/``, run from ``task/``
    (the task's data files are relative to it)."""
    return (
        "lmms-eval --model llava_onevision_ustc "
        f"--model_args pretrained=../checkpoint,{MODEL_ARGS} "
        "--tasks ustc_toy --include_path . --batch_size 1 "
        "--output_path ../results --log_samples"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ustc.lmms_eval.quickstart", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("folder", help="where to write checkpoint/ and task/ (a new folder)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if folder.exists() and any(folder.iterdir()):
        parser.error(f"{folder} exists and is not empty; give a new folder")
    checkpoint = tiny_checkpoint(folder / "checkpoint")
    task = toy_task(folder / "task")
    print(f"checkpoint: {checkpoint} (a random LLaVA-OneVision, 3 LLM layers)")
    print(f"task:       {task} (ustc_toy: 5 questions on 8-frame clips)")
    print(f"run it:\n  cd {task}\n  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 {command()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
