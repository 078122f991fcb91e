"""A plain (non-editable) install puts one namespace into site-packages: ``enserve``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv

from tests.conftest import ROOT

GENERIC = ("server", "models", "tuning", "optimizer", "loadtest")
SUBPACKAGES = [f"enserve.{n}" for n in GENERIC]


def test_pip_install_puts_only_the_enserve_namespace_into_a_fresh_venv(tmp_path):
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, src / name)
    for name in ("enserve", *GENERIC):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(src)],
                   check=True, timeout=300, capture_output=True)
    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=False)
    python = fresh / "bin" / "python"
    wheel = next(wheels.glob("enserve-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    str(wheel)], check=True, timeout=300, capture_output=True)
    site = next((fresh / "lib").glob("python3*/site-packages"))
    top_level = sorted(p.name for p in site.iterdir() if not p.name.startswith(("_", ".")))
    assert [n for n in top_level if not n.endswith(".dist-info")] == ["enserve"], top_level
    assert (fresh / "bin" / "enserve").is_file()
    # run outside the checkout, so that its folders are not on sys.path
    probe = (
        "import importlib.util, json\n"
        f"generic = {{n: importlib.util.find_spec(n) is not None for n in {GENERIC!r}}}\n"
        f"ours = {{n: importlib.util.find_spec(n).origin for n in {SUBPACKAGES!r}}}\n"
        "print(json.dumps([generic, ours]))\n"
    )
    out = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         check=True, timeout=60)
    generic, ours = json.loads(out.stdout)
    assert generic == dict.fromkeys(GENERIC, False)
    for name, origin in ours.items():
        assert origin.startswith(str(site)), (name, origin)
