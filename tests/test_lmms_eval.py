"""Tests of ustc/lmms_eval/: the lmms-eval models of every supported backbone.

The plugin tests go through lmms-eval's own entry-point loader, its real ``Instance`` requests
and, end to end, its real ``lmms-eval`` command line (one process, and two under
``accelerate launch --multi_gpu``) on a tiny random LLaVA-OneVision saved to a folder and the
tiny video task of ``ustc/lmms_eval/toy_task``, both built by ``ustc.lmms_eval.quickstart`` (the
offline quick start of docs/lmms-eval.md, whose commands are run here as documented).  They need
lmms-eval installed (the optional extra; the ``--no-deps`` recipe of
``.ci/lmms-eval-nodeps.txt``) and are skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ustc.lmms_eval import (
    BACKBONES,
    LlavaOneVisionUSTC,
    Qwen2_5_VLUSTC,
    config_from_model_args,
    default_device,
    left_pad,
)
from ustc.lmms_eval.quickstart import (
    TOY_TASK,
    tiny_checkpoint,
    tiny_tokenizer,
    toy_task,
)

ROOT = Path(__file__).resolve().parents[1]

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
lmms = pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed (optional extra)")


def _entry_point_dist(folder: Path) -> Path:
    """A ``ustc`` dist-info holding the entry points pyproject.toml declares, as pip would install
    it; first on the path, it stands in for an installed ustc (importlib.metadata keeps the first
    distribution of a name)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    group = project["entry-points"]["lmms_eval.models"]
    dist = folder / "ustc-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ustc\nVersion: 0.1.0\n")
    lines = ["[lmms_eval.models]"] + [f"{k} = {v}" for k, v in group.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return folder


def _request(kind: str, args: tuple, doc_id: int = 0, padding: bool = False) -> object:
    from lmms_eval.api.instance import Instance

    metadata = {"task": "toy", "doc_id": doc_id, "repeats": 1}
    if padding:
        metadata["__padding_only__"] = True
    return Instance(request_type=kind, arguments=args, idx=0, metadata=metadata)


# --------------------------------------------------------------------------------------------
# Registration, arguments, device
# --------------------------------------------------------------------------------------------


@lmms
def test_every_backbone_registers_through_the_lmms_eval_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmms_eval.api.model import lmms as lmms_base
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    monkeypatch.syspath_prepend(str(_entry_point_dist(tmp_path)))
    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()  # lmms-eval's own loader, group lmms_eval.models
    assert {"llava_onevision_ustc", "qwen2_5_vl_ustc", "qwen3_vl_ustc", "internvl_ustc"} <= set(
        BACKBONES
    )
    for name, cls in BACKBONES.items():
        assert registry.get_model_class(name) is cls and issubclass(cls, lmms_base)
    assert registry.get_model_class("llava_onevision_ustc") is LlavaOneVisionUSTC
    assert registry.get_model_class("qwen2_5_vl_ustc") is Qwen2_5_VLUSTC
    assert registry.get_model_class("ustc") is LlavaOneVisionUSTC


@lmms
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("scorer=nope", "unknown scorer 'nope'"),
        ("colour=red", r"unknown model_args \['colour'\] for qwen2_5_vl_ustc; it takes pretrained"),
        ("retention=1.5", r"retention must be in \(0, 1\]"),
        ("batch_size=auto", "batch_size must be a positive integer .* 'auto'"),
        ("batch_size=0", "batch_size must be a positive integer, got 0"),
        ("max_frames_num=0", "max_frames_num must be a positive integer, got 0"),
        ("dtype=float33", "dtype must be 'auto' or a torch dtype name, got 'float33'"),
    ],
)
def test_bad_model_args_fail_before_any_model_loads(
    args: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_loading(*a: object, **k: object) -> None:
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(Qwen2_5_VLUSTC, "_load", no_loading)
    with pytest.raises(ValueError, match=message):
        Qwen2_5_VLUSTC.create_from_arg_string(f"pretrained=never/loaded,{args}")


def test_device_defaults_to_what_the_machine_has(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert default_device() == "cuda:0"
    monkeypatch.setenv("LOCAL_RANK", "3")  # one GPU per process under accelerate / torchrun
    assert default_device() == "cuda:3"


def test_left_pad_pads_sequences_on_the_left_and_concatenates_the_rest() -> None:
    a = {
        "input_ids": torch.tensor([[5, 6, 7]]),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
    }
    b = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    a["pixel_values_videos"] = torch.zeros(1, 2, 3)
    b["pixel_values_videos"] = torch.ones(1, 2, 3)
    batch = left_pad([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["pixel_values_videos"][:, 0, 0].tolist() == [0.0, 1.0]


@lmms
def test_lmms_eval_0_7_3_turns_loglikelihood_results_into_strings() -> None:
    """The caveat docs/lmms-eval.md states: lmms-eval's evaluator stringifies (logprob, greedy)
    pairs for every model, so loglikelihood (multiple_choice) tasks cannot be scored.  If this
    fails, lmms-eval fixed it: update the docs and the plugin's warning."""
    from lmms_eval.api.instance import unwrap_generation_output

    text, _ = unwrap_generation_output((-1.5, True))
    assert text == "(-1.5, True)"


# --------------------------------------------------------------------------------------------
# Requests, in process
# --------------------------------------------------------------------------------------------


def _toy_docs(frames: int = 6) -> dict[int, dict]:
    rng = np.random.default_rng(0)
    questions = ["what colour is the ball ?", "what colour is the ball at the end of the video ?"]
    return {
        i: {"video": rng.integers(0, 256, (frames, 28, 28, 3), dtype=np.uint8), "question": q}
        for i, q in enumerate(questions)
    }


def _generate_requests(docs: dict[int, dict], padding: bool = False) -> list:
    gen = {"max_new_tokens": 3, "until": ["\n\n"]}
    requests = [
        _request(
            "generate_until",
            (d["question"], gen, lambda d: [d["video"]], i, "toy", "test"),
            doc_id=i,
        )
        for i, d in docs.items()
    ]
    if padding:
        requests.append(
            _request("generate_until", requests[-1].args, doc_id=len(docs), padding=True)
        )
    return requests


@lmms
@pytest.mark.parametrize(
    ("backbone", "frames", "per_frame", "budget"),
    [
        # 4 frames of 4 x 4 pooled tokens; 25 % -> 4 per frame
        ("llava_onevision_ustc", 4, 16, 16),
        # 4 frames -> 2 temporal pairs of 8 x 8 patches merged 2 x 2; 25 % -> 4 per pair
        ("qwen2_5_vl_ustc", 2, 16, 8),
    ],
)
def test_generate_until_answers_as_the_model_does_on_the_same_inputs(
    backbone: str, frames: int, per_frame: int, budget: int
) -> None:
    """Through lmms-eval ``Instance`` requests: the answers equal ``model.generate`` on the inputs
    the manual processor lays out, ``token_counts.input_tokens`` is what entered the LLM, and
    lmms-eval's rank-padding request is answered without running the model."""
    from models_helpers import tiny_llava_onevision, tiny_qwen2_5_vl

    torch.set_num_threads(1)
    if backbone == "llava_onevision_ustc":
        model = tiny_llava_onevision(layers=3)
    else:
        model = tiny_qwen2_5_vl(layers=3)
    cls = BACKBONES[backbone]
    lm = cls.create_from_arg_string(
        "retention=0.25,merger=text-aware,layer=1,max_frames_num=4",
        {"model": model, "tokenizer": tiny_tokenizer(), "pretrained": None},
    )
    if backbone == "qwen2_5_vl_ustc":  # 28 x 28 frames -> 32 x 32 (multiples of p * m = 8)
        lm.processor.min_pixels, lm.processor.max_pixels = 32 * 32, 32 * 32
    docs = _toy_docs()
    lm.task_dict = {"toy": {"test": docs}}
    results = lm.generate_until(_generate_requests(docs, padding=True))
    assert len(results) == 3 and results[-1].text == ""  # the padding request
    assert lm.handle.stats.prefills == 2  # ... never reached the model

    for i, doc in docs.items():
        inputs = lm._to_device(lm._inputs(doc["question"], [doc["video"]]))
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        expected = lm.tokenizer.decode(
            out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        assert results[i].text == expected.split("\n\n")[0]
        stats = lm.handle.stats
        n = inputs["input_ids"].shape[1]
        assert (stats.visual_tokens, stats.tokens_in) == (frames * per_frame, budget)
        assert results[i].token_counts.input_tokens == n - stats.visual_tokens + stats.tokens_in
        assert results[i].token_counts.input_tokens == stats.sequence_in < n


@lmms
@pytest.mark.parametrize(
    "compression", ["retention=1,merger=none", "retention=0.25,merger=text-aware,layer=1"]
)
def test_plugin_answers_lmms_eval_requests(compression: str) -> None:
    """loglikelihood and generate_until on one request equal the model run directly on the
    processor's layout written out by hand."""
    from models_helpers import tiny_llava_onevision

    from ustc.models import attach

    torch.set_num_threads(1)
    model, tokenizer = tiny_llava_onevision(layers=3), tiny_tokenizer()
    lm = LlavaOneVisionUSTC.create_from_arg_string(
        compression + ",max_frames_num=4", {"model": model, "tokenizer": tokenizer}
    )
    rng = np.random.default_rng(0)
    doc = {"video": rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8), "answer": " red ball"}
    lm.task_dict = {"toy": {"test": {0: doc}}}
    context = "what colour is the ball ?"

    ((loglik, greedy),) = lm.loglikelihood(
        [
            _request(
                "loglikelihood",
                (context, lambda d: d["answer"], lambda d: [d["video"]], 0, "toy", "test"),
            )
        ]
    )
    (result,) = lm.generate_until(
        [
            _request(
                "generate_until",
                (
                    context,
                    {"max_new_tokens": 3, "until": ["\n\n"]},
                    lambda d: [d["video"]],
                    0,
                    "toy",
                    "test",
                ),
            )
        ]
    )

    # reference: the processor's layout written out by hand, run on the model directly
    frames = doc["video"][np.linspace(0, 5, 4).round().astype(int)]
    pixels = ((torch.tensor(frames, dtype=torch.float32) / 255 - 0.5) / 0.5).permute(0, 3, 1, 2)
    vocab = tokenizer.get_vocab()
    head = [vocab[w] for w in ("<|im_start|>", "user")]
    tail = [
        vocab[w]
        for w in (
            "what",
            "colour",
            "is",
            "the",
            "ball",
            "?",
            "<|im_end|>",
            "<|im_start|>",
            "assistant",
        )
    ]
    answer = [vocab["red"], vocab["ball"]]
    video = [91] * (4 * 16 + 1)  # F * P + one image_newline, P = (ceil(7 / 2))^2
    ids = torch.tensor([head + video + tail + answer])
    config, _ = config_from_model_args(dict(kv.split("=") for kv in compression.split(",")))
    if lm.handle is not None:
        lm.handle.remove()
    handle = None if config.is_identity else attach(model, config)
    with torch.no_grad():
        logits = (
            model(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pixels[None]
            )
            .logits[0]
            .float()
        )
        generated = model.generate(
            input_ids=ids[:, :-2],
            attention_mask=torch.ones_like(ids[:, :-2]),
            pixel_values_videos=pixels[None],
            max_new_tokens=3,
            do_sample=False,
        )
    steps = logits[-3:-1].log_softmax(-1)
    expected = float(steps[0, answer[0]] + steps[1, answer[1]])
    assert loglik == pytest.approx(expected, abs=1e-4)
    assert greedy == bool((steps.argmax(-1) == torch.tensor(answer)).all())
    assert result.text == tokenizer.decode(
        generated[0, ids.shape[1] - 2 :], skip_special_tokens=True
    )
    if handle is not None:
        # the compression really ran: 4 frames x ceil(0.25 * 16) tokens entered the LLM
        assert handle.stats.tokens_in == config.budget(4, 16) == 16
        assert handle.stats.tokens_after_merge == 8
        assert logits.shape[0] < ids.shape[1]  # the LLM saw the shorter sequence
        handle.remove()
    else:
        assert logits.shape[0] == ids.shape[1]


# --------------------------------------------------------------------------------------------
# The real lmms-eval command line, end to end
# --------------------------------------------------------------------------------------------


def _command(name: str) -> list[str]:
    """A console script (``lmms-eval``, ``accelerate``) run by this Python, also from a venv that
    sees the packages of another environment (CI's second transformers)."""
    from importlib.metadata import entry_points

    script = Path(sys.executable).parent / name
    if script.is_file():
        return [str(script)]
    found = [ep for ep in entry_points(group="console_scripts") if ep.name == name]
    if not found:
        pytest.skip(f"the {name} command is not installed")
    module, attr = found[0].value.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {attr}; sys.exit({attr}())"]


def _accelerate_launch(*extra: str) -> list[str]:
    """``accelerate launch`` asking for 2 processes on one machine, no mixed precision, no
    dynamo, then ``extra`` (the launcher's own flags and what to run)."""
    return _command("accelerate") + [
        "launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *extra,
    ]


def _expected_input_tokens(question: str, frames: int, per_frame: int, budget: int) -> int:
    """Tokens entering the LLM for one toy question: the chat prompt around F*P + 1 video
    placeholders, less the visual tokens the compression removed (F*P - budget)."""
    tokenizer = tiny_tokenizer()
    text = f"<|im_start|>user\n\n{question}<|im_end|>\n<|im_start|>assistant\n"
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + frames * per_frame + 1
    return n - (frames * per_frame - budget)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny checkpoint, the toy task with its clips, and the environment the command lines
    run in: this checkout's ustc and entry points first on the path, the hub offline."""
    folder = tmp_path_factory.mktemp("lmms")
    env = _command_env(folder, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return {
        "checkpoint": tiny_checkpoint(folder / "checkpoint"),
        "task": toy_task(folder / "task"),
        "env": env,
        "folder": folder,
    }


def _command_env(folder: Path, **extra: str) -> dict[str, str]:
    """The environment of a command line: this checkout's ustc and its entry points (built in
    ``folder``) first on the path, the hub cache in ``folder``, one thread, no GPU; and
    ``extra``."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(
            [str(_entry_point_dist(folder / "dist")), str(ROOT), env.get("PYTHONPATH", "")]
        ),
        HF_HOME=str(folder / "hf"),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",
        **extra,
    )
    return env


def _run_toy(toy_run: dict, launcher: list[str], out: str, batch_size: int = 1) -> dict:
    """Run ``launcher + [lmms-eval args]`` on the toy task; return what it wrote and logged."""
    output = toy_run["folder"] / out
    args = [
        "--model",
        "llava_onevision_ustc",
        "--model_args",
        f"pretrained={toy_run['checkpoint']},max_frames_num=4,retention=0.25,"
        "merger=text-aware,layer=1",
        "--tasks",
        "ustc_toy",
        "--include_path",
        str(toy_run["task"]),
        "--batch_size",
        str(batch_size),
        "--output_path",
        str(output),
        "--log_samples",
        "--verbosity",
        "INFO",
    ]
    proc = subprocess.run(
        launcher + args,
        cwd=toy_run["task"],  # the task's data_files are relative to it
        env=toy_run["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    # lmms-eval exits 0 after errors inside the evaluation: check what it really produced
    assert "Traceback" not in log and "Error during evaluation" not in log, log[-6000:]
    (results,) = output.glob("*/*_results.json")
    (samples,) = output.glob("*/*_samples_ustc_toy.jsonl")
    return {
        "results": json.loads(results.read_text()),
        "samples": [json.loads(line) for line in samples.read_text().splitlines()],
        "log": log,
        "returncode": proc.returncode,
    }


def _check_toy_run(run: dict, ranks: int, batch_size: int) -> None:
    """Every document scored once, with the compression settings applied to each."""
    docs = [json.loads(x) for x in (TOY_TASK / "questions.jsonl").read_text().splitlines()]
    assert run["returncode"] == 0, run["log"][-4000:]
    assert run["results"]["n-samples"]["ustc_toy"]["effective"] == len(docs)
    accuracy = run["results"]["results"]["ustc_toy"]["accuracy,none"]
    scored = run["samples"]
    assert sorted(s["doc_id"] for s in scored) == list(range(len(docs)))  # each exactly once
    assert accuracy == pytest.approx(np.mean([s["accuracy"] for s in scored]))
    utils_path = str(TOY_TASK)
    sys.path.insert(0, utils_path)
    try:
        import utils as toy_utils  # the task's own prompt
    finally:
        sys.path.remove(utils_path)
    for sample in scored:
        doc = docs[sample["doc_id"]]
        question = toy_utils.doc_to_text(doc)
        # 4 frames x 16 tokens, 25 % retention: 16 visual tokens entered the LLM
        assert sample["token_counts"] == [
            {"input_tokens": _expected_input_tokens(question, 4, 16, 16), "output_tokens": 3}
        ]
    # each document reached the model once over all ranks, in batches of at most batch_size
    # (lmms-eval's rank padding never ran it), and every batch was compressed as configured
    batches = [line for line in run["log"].splitlines() if "llava_onevision_ustc rank" in line]
    sizes = [int(re.search(r"batch of (\d+)", line).group(1)) for line in batches]
    assert sum(sizes) == len(docs) and max(sizes) == batch_size, "\n".join(batches)
    # 4 frames x 16 tokens -> 16 entering the LLM -> 8 after the merge at K = 1 (R = 50 %)
    assert all("visual tokens 64 -> 16 entering the LLM -> 8 after layer 1" in x for x in batches)
    assert {int(re.search(r"rank (\d+):", line).group(1)) for line in batches} == set(range(ranks))


@lmms
def test_the_lmms_eval_command_line_in_one_process(toy_run: dict) -> None:
    _check_toy_run(_run_toy(toy_run, _command("lmms-eval"), "one"), ranks=1, batch_size=1)


@lmms
def test_the_lmms_eval_command_line_on_two_processes_under_accelerate(toy_run: dict) -> None:
    """``accelerate launch --multi_gpu --num_processes 2``, batch size 2: on a machine without CUDA
    the two processes join a gloo group; each evaluates its shard (3 and 2 of the 5 questions, in
    left-padded batches) and rank 0 writes the results once.
    (``--cpu`` makes accelerate 1.x use its single-process launcher whatever --num_processes
    says; see docs/lmms-eval.md.)"""
    launcher = _accelerate_launch("--multi_gpu", "--main_process_port", "0", "-m", "lmms_eval")
    run = _run_toy(toy_run, launcher, "two", batch_size=2)
    _check_toy_run(run, ranks=2, batch_size=2)


def _tiny_lm(backbone: str, model_args: str, docs: list[dict] | dict[int, dict]) -> Any:
    """The lmms-eval model ``backbone`` (llava_onevision_ustc or qwen2_5_vl_ustc) with
    ``model_args`` on a fresh 3-layer tiny model and the toy task's ``docs`` (Qwen2.5-VL's
    processor at 32 x 32 px, the tiny model's size)."""
    from models_helpers import tiny_llava_onevision, tiny_qwen2_5_vl

    build = tiny_llava_onevision if backbone == "llava_onevision_ustc" else tiny_qwen2_5_vl
    lm = BACKBONES[backbone].create_from_arg_string(
        model_args, {"model": build(layers=3), "tokenizer": tiny_tokenizer(), "pretrained": None}
    )
    if backbone == "qwen2_5_vl_ustc":
        lm.processor.min_pixels, lm.processor.max_pixels = 32 * 32, 32 * 32
    lm.task_dict = {"toy": {"test": docs}}
    return lm


@lmms
@pytest.mark.parametrize(
    ("backbone", "calls"),
    # the 3-frame clip: LLaVA-OV gets 3 frames instead of 4, a second generate() call; Qwen2.5-VL
    # repeats its last frame to a whole temporal pair, the same (2, 8, 8) grid as the others
    [("llava_onevision_ustc", 2), ("qwen2_5_vl_ustc", 1)],
)
def test_batches_answer_as_one_prompt_at_a_time(backbone: str, calls: int) -> None:
    """batch_size 4 on prompts of different lengths (LEFT-padded, one video each) and a shorter
    clip: the same answers and token counts as batch_size 1, in request order."""
    torch.set_num_threads(1)
    docs = _toy_docs()
    docs[2] = {**docs[0], "question": "what is the ball ?"}
    docs[3] = {**docs[1], "video": docs[1]["video"][:3]}
    answers = {}
    for batch_size in (1, 4):
        lm = _tiny_lm(
            backbone,
            f"retention=0.25,merger=text-aware,layer=1,max_frames_num=4,batch_size={batch_size}",
            docs,
        )
        answers[batch_size] = lm.generate_until(_generate_requests(docs))
        assert lm.handle.stats.prefills == (len(docs) if batch_size == 1 else calls)
    assert [r.text for r in answers[4]] == [r.text for r in answers[1]]
    assert [r.token_counts for r in answers[4]] == [r.token_counts for r in answers[1]]
    lengths = {r.token_counts.input_tokens for r in answers[1][:3]}
    assert len(lengths) == 3  # three prompt lengths: the batch was padded


def test_every_supported_model_class_has_an_lmms_eval_model():
    from ustc.models import ADAPTERS

    classes = {cls.model_class: name for name, cls in BACKBONES.items()}
    assert set(classes) == set(ADAPTERS), set(ADAPTERS) ^ set(classes)


def test_a_backbone_without_a_manual_layout_names_what_it_needs():
    plugin = BACKBONES["qwen3_vl_ustc"].__new__(BACKBONES["qwen3_vl_ustc"])
    with pytest.raises(ValueError, match="needs torchvision.*qwen2_5_vl_ustc"):
        plugin.manual_processor(None, None, "some/checkpoint")


# --------------------------------------------------------------------------------------------
# The offline quick start of docs/lmms-eval.md, and accelerate's single-process launcher
# --------------------------------------------------------------------------------------------


def _quickstart_block() -> str:
    """The commands of docs/lmms-eval.md's "Offline quick start", as written there."""
    page = (ROOT / "docs" / "lmms-eval.md").read_text()
    section = page.split("## Offline quick start", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


@lmms
def test_the_offline_quick_start_runs_as_documented(tmp_path: Path) -> None:
    """The documented lines, run by bash in an empty folder with no network (this checkout's ustc
    and its entry points first on the path, this interpreter's scripts first on PATH)."""
    block = _quickstart_block()
    assert block.startswith("python -m ustc.lmms_eval.quickstart lmms-quickstart\n")
    scripts = str(Path(sys.executable).parent)
    env = _command_env(tmp_path, PATH=os.pathsep.join([scripts, os.environ.get("PATH", "")]))
    if not (Path(sys.executable).parent / "lmms-eval").is_file():
        pytest.skip("the lmms-eval script is not beside this interpreter")
    work = tmp_path / "user"
    work.mkdir()
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in log, log[-6000:]
    out = work / "lmms-quickstart" / "results"
    (results,) = out.glob("*/*_results.json")
    (samples,) = out.glob("*/*_samples_ustc_toy.jsonl")
    assert json.loads(results.read_text())["n-samples"]["ustc_toy"]["effective"] == 5
    scored = [json.loads(line) for line in samples.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in scored) == list(range(5))
    sys.path.insert(0, str(TOY_TASK))
    try:
        import utils as toy_utils
    finally:
        sys.path.remove(str(TOY_TASK))
    docs = [json.loads(x) for x in (TOY_TASK / "questions.jsonl").read_text().splitlines()]
    for sample in scored:  # 4 frames x 16 tokens at 25 %: 16 visual tokens entered the LLM
        question = toy_utils.doc_to_text(docs[sample["doc_id"]])
        tokens = _expected_input_tokens(question, 4, 16, 16)
        assert sample["token_counts"] == [{"input_tokens": tokens, "output_tokens": 3}]


def test_processes_asked_of_accelerate_reads_the_launcher_command_line() -> None:
    from ustc.lmms_eval.base import processes_asked_of_accelerate as asked

    launch = ["accelerate", "launch", "--num_processes", "2", "-m", "lmms_eval"]
    assert asked({"ACCELERATE_USE_CPU": "False"}, launch) == 2
    assert asked({"ACCELERATE_USE_CPU": "False"}, ["x", "--num_processes=4"]) == 4
    assert asked({"ACCELERATE_USE_CPU": "False"}, ["accelerate", "launch", "-m", "x"]) is None
    assert asked({}, launch) is None  # not started by accelerate (torchrun, plain lmms-eval)


@lmms
def test_accelerate_without_multi_gpu_runs_one_process_and_the_plugin_says_so(
    tmp_path: Path,
) -> None:
    """The real launcher: ``--num_processes 2`` without ``--multi_gpu`` starts one process with no
    WORLD_SIZE; the ustc model built there warns, naming the fix."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, warnings\n"
        "from ustc.lmms_eval.base import processes_asked_of_accelerate\n"
        "print('asked', processes_asked_of_accelerate(), 'world', os.environ.get('WORLD_SIZE'))\n"
    )
    launcher = _accelerate_launch()  # no --multi_gpu
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [*launcher, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("asked 2 world None") == 1  # one process, which knows 2 were asked


@lmms
def test_the_plugin_warns_when_accelerate_started_fewer_processes_than_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from models_helpers import tiny_llava_onevision

    from ustc.lmms_eval import base

    model, tokenizer = tiny_llava_onevision(layers=3), tiny_tokenizer()
    monkeypatch.setattr(base, "processes_asked_of_accelerate", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.warns(UserWarning, match=r"--num_processes 2` started ONE process.*--multi_gpu"):
        first = LlavaOneVisionUSTC(model=model, tokenizer=tokenizer, pretrained=None, layer=1)
    first.handle.remove()
    monkeypatch.setenv("WORLD_SIZE", "2")  # --multi_gpu: as many processes as asked, no warning
    monkeypatch.setenv("RANK", "0")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*started ONE process.*")
        LlavaOneVisionUSTC(model=model, tokenizer=tokenizer, pretrained=None, layer=1)


@lmms
def test_a_model_in_several_processes_destroys_the_process_group_at_exit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """lmms-eval leaves its gloo group alive; one alive at interpreter shutdown can abort a
    process whose results are written (SIGABRT, and accelerate reports the run failed).  A model
    built in a multi-process run registers ``close_process_group`` at exit, which destroys it."""
    import torch.distributed as dist
    from models_helpers import tiny_llava_onevision

    from ustc.lmms_eval import base

    registered: list[Any] = []
    monkeypatch.setattr(base.atexit, "register", registered.append)
    model, tokenizer = tiny_llava_onevision(layers=3), tiny_tokenizer()
    monkeypatch.setattr(base, "processes_asked_of_accelerate", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    LlavaOneVisionUSTC(model=model, tokenizer=tokenizer, pretrained=None, layer=1).handle.remove()
    assert registered == []  # one process: nothing to close
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    LlavaOneVisionUSTC(model=model, tokenizer=tokenizer, pretrained=None, layer=1).handle.remove()
    assert registered == [base.close_process_group]

    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        base.close_process_group()
        assert not dist.is_initialized()
        base.close_process_group()  # a second call (a second model) does nothing
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
