"""Hooks of the ustc_toy task: the clip of a question, its prompt, and letter-parsing scoring."""

from __future__ import annotations

import os
import re

VIDEOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "videos")
LETTERS = "ABC"


def doc_to_visual(doc: dict) -> list[str]:
    return [os.path.join(VIDEOS, doc["video"])]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    options = " ".join(
        f"{letter} . {text}" for letter, text in zip(LETTERS, doc["options"], strict=True)
    )
    return f"{doc['question']} {options} answer with the letter"


def parse_letter(text: str) -> str | None:
    """The first standalone option letter of a generated answer, as the video benchmarks parse
    multiple-choice answers (e.g. 'B', 'B.', '(B) blue', 'answer: B')."""
    match = re.search(rf"\b([{LETTERS}])\b", text)
    return match.group(1) if match else None


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"accuracy": float(parse_letter(results[0]) == doc["answer"])}
