"""`make demo`, the first command of the README, as a new user runs it."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_seeds_and_prints(tmp_path):
    if not (ROOT / ".venv" / ".installed").exists():
        pytest.skip("the project is not installed by `make` here (run `make test`)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NGP_", "MAKE"))}
    home = tmp_path / "demo"
    p = subprocess.run(["make", "-s", "demo", f"NGP_HOME={home}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"ngp-research demo platform in {home}" in p.stdout
    assert "alice in cardio-gwas: 12 files" in p.stdout
    assert "bob in cardio-gwas: nothing; bob is not a member" in p.stdout
    assert "ngp access files cardio-gwas --user alice" in p.stdout
    assert (home / "regions" / "syd" / "datasets" / "syd-cohort" / "syd-cohort.vcf.gz").is_file()
