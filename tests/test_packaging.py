"""A wheel of the repository installs and works away from the checkout.

The wheel is built from a copy of the sources (so no ``build/`` or ``*.egg-info`` lands in the
repository), installed into a target folder, and used from a process whose working directory is
outside the repository with ``PYTHONPATH`` pointing at that folder: the package data (the
built-in encoder configs, the Blended-Text font) must come from the wheel.
"""
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

from conftest import REPO

CHECK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    import par, par.models, par.triggers

    site = Path(sys.argv[1]).resolve()
    origin = Path(par.__file__).resolve()
    assert origin.is_relative_to(site), f"par imported from {origin}, not from the installed wheel in {site}"
    assert not par.models.REPO_MODEL_CONFIGS.is_dir()  # no checkout around: only the packaged configs

    import open_clip
    for name in ("par-tiny-vit", "par-micro-vit", "par-micro-vit-p32"):
        model = par.models.create_model(name)
        packaged = json.loads((site / "par" / "model_configs" / f"{name}.json").read_text())
        assert open_clip.get_model_config(name) == packaged, name
        assert model.par_model_name == name

    images = torch.rand(1, 3, 64, 64)
    triggered = par.triggers.apply("water_patt", images, seed=0)
    assert par.triggers.FONT.resolve().is_relative_to(site) and par.triggers.FONT.is_file()
    assert triggered.shape == images.shape and not torch.equal(triggered, images)
    from importlib.metadata import distribution
    (command,) = [e for e in distribution("par").entry_points if e.group == "console_scripts"]
    assert command.name == "par" and command.load() is __import__("par.app.cli").app.cli.run  # the `par` command
    print("ok")
""")


def _run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


def test_wheel_installs_and_works_outside_the_repo(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(Path(REPO, name), src / name)
    shutil.copytree(Path(REPO, "par"), src / "par", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(wheels)],
         cwd=tmp_path)
    (wheel,) = wheels.glob("par-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    for data in ("par/model_configs/par-tiny-vit.json", "par/model_configs/par-micro-vit.json",
                 "par/model_configs/par-micro-vit-p32.json",
                 "par/assets/DejaVuSansMono.ttf", "par/assets/LICENSE_DEJAVU"):
        assert data in names, f"{data} missing from {wheel.name}"

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
         cwd=tmp_path)

    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PAR_MODEL_CONFIGS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    result = _run([sys.executable, "-c", CHECK, str(site)], cwd=away, env=env)
    assert result.stdout.strip().endswith("ok")
