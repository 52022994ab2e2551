"""A Python environment that sees every package of the interpreter running this script and
shadows a few with other versions: CI's second pass (the adapters on the oldest supported
transformers) runs in one.

    python .ci/overlay_env.py DIR REQUIREMENT... [-- PIP_ARGS...]   # prints DIR's python

Why not ``python -m venv --system-site-packages``: that sees the *base* interpreter's packages.
Run from inside a virtual environment (the normal way to install a project), the base is the
interpreter the venv was made from, which has neither torch nor ustc, so the second pass failed
with "No module named torch".  Here DIR is a venv (made without pip, from whichever interpreter
runs this) whose site-packages holds one ``.pth`` line that adds the running interpreter's own
site-packages directories after DIR's, through ``site.addsitedir`` (so the ``.pth`` files there,
editable installs included, work too).  The same holds for a venv, a conda-like prefix and a bare
system python.  REQUIREMENTs are installed into DIR by the running environment's pip, which sees
everything the ``.pth`` adds: it installs only what is missing or of another version, and leaves
the running environment untouched (pip does not uninstall what lies outside DIR's prefix).
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

PTH = "_overlay_of_parent_env.pth"


def parent_site_dirs() -> list[str]:
    """The running interpreter's site-packages directories, in its own order: a venv's (and, with
    system site packages, its base's), a conda prefix's, the user site when it is enabled."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    out: list[str] = []
    for d in dirs:
        d = os.path.realpath(d)
        if os.path.isdir(d) and d not in out:
            out.append(d)
    return out


def python_of(folder: Path) -> Path:
    """The interpreter of the venv at ``folder``."""
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def make(folder: Path, requirements: list[str], pip_args: list[str] = ()) -> Path:
    """Create the overlay at ``folder`` and install ``requirements`` into it; returns its
    python.  ``folder`` must not exist yet (or be empty)."""
    venv.EnvBuilder(with_pip=False, clear=False).create(folder)
    python = python_of(folder)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    line = "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in parent_site_dirs())
    (Path(purelib) / PTH).write_text(line + "\n")
    if requirements:
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *pip_args, *requirements], check=True
        )
    return python


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    folder, rest = Path(argv[0]), argv[1:]
    pip_args: list[str] = []
    if "--" in rest:
        cut = rest.index("--")
        rest, pip_args = rest[:cut], rest[cut + 1 :]
    if folder.exists() and any(folder.iterdir()):
        print(f"overlay_env: {folder} exists and is not empty; give a new folder", file=sys.stderr)
        return 2
    print(make(folder, rest, pip_args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
