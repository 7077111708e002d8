"""`make demo`, the first command of the README, as a new user runs it: it seeds, starts and prints."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_seeds_starts_and_stops_on_ctrl_c():
    if not (ROOT / ".venv" / ".installed").exists():
        pytest.skip("the project is not installed by `make` here (run `make test`)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NGP_", "MAKE"))}
    base = tempfile.mkdtemp(prefix="ngp-make-demo-")
    os.chmod(base, 0o711)
    home = Path(base) / "demo"
    port, idp_port = free_port(), free_port()
    proc = subprocess.Popen(["make", "-s", "demo", f"NGP_HOME={home}", f"DEMO_PORT={port}", f"IDP_PORT={idp_port}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        out = "".join(lines)
        assert f"ngp-research demo platform in {home}" in out, out
        assert "alice in cardio-gwas: 12 files" in out
        assert f"log in at http://127.0.0.1:{port}/hub/login" in out
        assert "region-admin:syd" in out and "ngp-demo" in out
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/hub/login", timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{idp_port}/.well-known/openid-configuration", timeout=10) as r:
            assert r.status == 200
        assert (home / "regions" / "syd" / "datasets" / "syd-cohort" / "syd-cohort.vcf.gz").is_file()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        shutil.rmtree(base, ignore_errors=True)
    for url in (f"http://127.0.0.1:{port}/hub/login", f"http://127.0.0.1:{idp_port}/.well-known/openid-configuration"):
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=3)
