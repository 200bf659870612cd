"""Test set-up: never touch the network, and helpers to fake installed plugin distributions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Hub look-ups take 23–47 s to fail offline; make every library give up at once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_distribution(root: Path, dist: str, plugins: dict[str, str]) -> Path:
    """Lay out an installed distribution under ``root``: modules plus a dist-info with entry points.

    ``plugins`` maps entry-point name -> module source; each module is importable as
    ``{dist}_{name}``. Putting ``root`` on ``sys.path``/``PYTHONPATH`` makes importlib.metadata see
    it exactly as it sees a pip-installed package.
    """
    root.mkdir(parents=True, exist_ok=True)
    lines = ["[ftkit]"]
    for name, source in plugins.items():
        module = f"{dist}_{name}".replace("-", "_")
        (root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        lines.append(f"{name} = {module}")
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n", encoding="utf-8")
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


#: Packages that cost seconds to import: commands that need no model must not load them.
HEAVY = ("torch", "transformers", "peft", "datasets", "bitsandbytes", "evaluate", "modelscope", "accelerate")


def heavy_imports_after(args: list[str]) -> list[str]:
    """The HEAVY packages in ``sys.modules`` after running ``ftkit ARGS`` in a fresh interpreter."""
    code = (
        "import sys\n"
        "from ftkit.cli import main\n"
        f"try:\n    main({args!r}, standalone_mode=False)\n"
        "except SystemExit:\n    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [m for m in out.stdout.splitlines()[-1].removeprefix("HEAVY=").split(",") if m]


def run_ftkit(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (``python -m ftkit``)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ftkit", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600
    )


@pytest.fixture
def plugin_path(tmp_path: Path):
    """Returns a function that installs a fake distribution and gives the env to see it."""

    def install(dist: str, plugins: dict[str, str]) -> dict[str, str]:
        root = make_distribution(tmp_path / dist, dist, plugins)
        existing = os.environ.get("PYTHONPATH")
        return {"PYTHONPATH": str(root) + (os.pathsep + existing if existing else "")}

    return install
