"""The package as a user installs it (a wheel, not the checkout): the shipped profiles and the licence travel with it."""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_installed_copy_finds_its_profiles_outside_the_checkout(tmp_path):
    wheels, site, src = tmp_path / "wheels", tmp_path / "site", tmp_path / "src"
    # A copy of what the build reads, so the build's scratch (build/, *.egg-info) lands there, not in the checkout.
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        src.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    for name in ("kd_core", "flows", "tasks", "profiles"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # Without build isolation when this environment can build (quicker, no index needed); else as pip would.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(wheels), str(src)],
                   check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = wheels.glob("kd_cache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"kd_core/profiles/{p.name}" for p in (ROOT / "profiles").glob("*.yaml")} <= set(names)
    assert any(n.endswith("licenses/LICENSE") for n in names)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    # From a directory that is not the checkout, with the checkout off sys.path: the installed copy alone.
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import kd_core.config as c; from pathlib import Path; "
            f"assert Path(c.PROFILES_DIR).is_relative_to({str(site)!r}), c.PROFILES_DIR; "
            "print(c.load_config('testing').teacher.model, len(c.available_profiles()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Qwen/Qwen2.5-0.5B", str(len(list((ROOT / "profiles").glob("*.yaml"))))]
