"""CI's environment step (.ci/overlay_env.py) from inside a virtual environment.

``.ci/run`` runs the adapter tests a second time on the oldest supported transformers, in an
environment that must see everything the running interpreter has.  It used to be
``python -m venv --system-site-packages``, which sees the *base* interpreter's packages: run from
a user's venv, torch was missing and CI was red.  Here the step runs from a throwaway venv that
holds a package its base interpreter lacks, with wheels written on the spot (no network)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = ROOT / ".ci" / "overlay_env.py"


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A pure-Python wheel of one module ``name`` whose ``__version__`` is ``version``."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"__version__ = {version!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{dist}/RECORD"])
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for arcname, text in files.items():
            zf.writestr(arcname, text)
    return path


def _run(*cmd: str | Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run(
        [str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout.strip()


PROBE = "import ci_only_in_venv, ci_shadowed, torch, pytest; print(ci_shadowed.__version__)"


def test_the_oldest_transformers_environment_sees_the_venv_it_is_made_from(
    tmp_path: Path,
) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    only = _wheel(wheels, "ci_only_in_venv", "1.0")
    old, new = _wheel(wheels, "ci_shadowed", "1.0"), _wheel(wheels, "ci_shadowed", "2.0")
    no_index = ["--", "--no-index", "--no-cache-dir"]
    # a user's venv: the test interpreter's packages plus two its base does not have
    user = Path(_run(sys.executable, OVERLAY, tmp_path / "user", only, old, *no_index))
    assert _run(user, "-c", "import sys; print(sys.prefix != sys.base_prefix)") == "True"
    assert _run(user, "-c", PROBE) == "1.0"

    # CI's step, run from inside that venv: everything of the venv is seen, one package shadowed
    ci = Path(_run(user, OVERLAY, tmp_path / "oldest", new, *no_index))
    assert _run(ci, "-c", PROBE) == "2.0"
    assert _run(user, "-c", PROBE) == "1.0"  # the user's venv is untouched

    # the step it replaces sees the base interpreter only: the venv's package is missing
    _run(user, "-m", "venv", "--without-pip", "--system-site-packages", tmp_path / "before")
    before = tmp_path / "before" / "bin" / "python"
    probe = subprocess.run([before, "-c", "import ci_only_in_venv"], capture_output=True)
    assert probe.returncode != 0


def test_ci_builds_the_second_environment_with_the_overlay() -> None:
    commands = [
        line for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.startswith("#")
    ]
    assert any("python .ci/overlay_env.py" in line for line in commands)
    assert not any("venv" in line and "--system-site-packages" in line for line in commands)


def test_ci_runs_the_backbone_battery_on_the_oldest_transformers() -> None:
    """The per-family adapter tests live in tests/test_backbones.py (one battery for every
    backbone); the oldest-transformers pass must run it, not only tests/test_models_*.py."""
    line = next(
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.startswith('"$overlay" -m pytest')
    )
    shell = subprocess.run(
        ["bash", "-c", f"echo {line.split(' -q ', 1)[1]}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    ran = set(shell.stdout.split())
    assert "tests/test_backbones.py" in ran, ran
    assert "tests/test_models_llava_onevision.py" in ran and "tests/test_lmms_eval.py" in ran
