"""The workspace's Python environment: what the single-user server and the kernels run on, inside the sandbox.

The sandbox runs as the member's own uid, which cannot read ``/root`` (where the developer's
``.venv`` and its pyenv Python live), so workspaces get their own venv made from Debian's
``/usr/bin/python3`` at a path every workspace uid can traverse (:func:`default_workspace_env`).
It holds JupyterHub's single-user server, JupyterLab, ipykernel, numpy, pysam and this project
(installed as a copy, so the repository need not be reachable from inside), plus:

- ``share/jupyter/kernels/ngp-python/kernel.json``: the only kernelspec, written from the template
  ``kernels/ngp-python/kernel.json`` with this environment's python; ipykernel's own ``python3``
  kernelspec is removed;
- ``00_ngp_research_audit.pth`` in its site-packages: every Python program of a workspace installs
  the audit hook before its own code runs (:mod:`ngp_research.kernel.autostart`);
- ``etc/ngp-jupyter/``: the platform's Jupyter config (from ``spawner/jupyter/``), found through
  ``JUPYTER_CONFIG_DIR``;
- only JupyterLab's server-extension switch under ``etc/jupyter/jupyter_server_config.d``.

Build it with ``make workspace-env`` or ``python -m ngp_research.workspace.environment build [PATH]``.
"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE_PYTHON = "/usr/bin/python3"
PACKAGES = ("jupyterhub==6.1.1", "jupyterlab", "jupyter_server", "ipykernel", "numpy", "pysam",
            "hail==0.2.139", "dask[array,distributed]==2026.8.0", "pandas>=2.2", "scipy>=1.11", "ipywidgets",
            "matplotlib", "papermill==2.7.0", "nbconvert>=7.16")
KERNEL_NAME = "ngp-python"
PYTHON_PLACEHOLDER = "@WORKSPACE_PYTHON@"
CONFIG_SUBDIR = "etc/ngp-jupyter"
STAMP = ".ngp-built"
#: Server extensions whose enabling files are kept; every other one is removed from the environment.
KEPT_SERVER_EXTENSIONS = ("jupyterlab",)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_workspace_env() -> str:
    """``$NGP_WORKSPACE_ENV``, else ``/opt/ngp-research/envs/<sha256(repo root)[:12]>``.

    Examples
    --------
    >>> import os
    >>> p = default_workspace_env()
    >>> p == os.environ["NGP_WORKSPACE_ENV"] if os.environ.get("NGP_WORKSPACE_ENV") else p.startswith("/opt/")
    True
    """
    env = os.environ.get("NGP_WORKSPACE_ENV")
    if env:
        return env
    digest = hashlib.sha256(str(repo_root()).encode()).hexdigest()[:12]
    return f"/opt/ngp-research/envs/{digest}"


def kernel_dir(env: str) -> str:
    return os.path.join(env, "share", "jupyter", "kernels", KERNEL_NAME)


def config_dir(env: str) -> str:
    return os.path.join(env, CONFIG_SUBDIR)


def is_built(env: str) -> bool:
    """Whether ``env`` is a finished workspace environment: built to the end (its stamp), with its python and
    the audit ``.pth`` (an environment built before that file existed would run ``!python x.py`` unhooked).

    >>> is_built("/nonexistent")
    False
    """
    from ..kernel.autostart import PTH_NAME  # noqa: PLC0415

    return (os.path.exists(os.path.join(env, STAMP)) and os.path.exists(os.path.join(env, "bin", "python"))
            and any(Path(env).glob(f"lib/python3*/site-packages/{PTH_NAME}")))


def _run(argv, **kw):
    subprocess.run(argv, check=True, **kw)


def _make_traversable(path: Path) -> None:
    """Give every ancestor of ``path`` the search (x) bit for others, so workspace uids reach it."""
    for parent in list(path.parents)[::-1]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(parent, stat.S_IMODE(mode) | stat.S_IXOTH)


def _world_readable(path: Path) -> None:
    """chmod -R a+rX: readable by all, directories and executables searchable/executable by all."""
    _run(["chmod", "-R", "a+rX", str(path)])


def write_kernelspec(env: str, template: Path) -> str:
    spec = json.loads(template.read_text())
    spec["argv"] = [os.path.join(env, "bin", "python") if a == PYTHON_PLACEHOLDER else a for a in spec["argv"]]
    target = Path(kernel_dir(env))
    target.mkdir(parents=True, exist_ok=True)
    (target / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
    return str(target / "kernel.json")


def write_audit_pth(python: str) -> str:
    """Put :data:`~ngp_research.kernel.autostart.PTH_NAME` in the environment's site-packages: every Python
    program of a workspace installs the audit hook before its own code runs (see
    :mod:`ngp_research.kernel.autostart`). Returns the file's path."""
    from ..kernel.autostart import PTH_NAME, pth_line  # noqa: PLC0415

    env = {k: v for k, v in os.environ.items() if not k.startswith("NGP_AUDIT")}  # no audit service here
    purelib = Path(subprocess.run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  check=True, capture_output=True, text=True, env=env).stdout.strip())
    prefix = Path(python).parent.parent
    if prefix not in purelib.parents:  # never into another Python's site-packages
        raise RuntimeError(f"{python}: site-packages {purelib} is outside the environment {prefix}")
    autostart = purelib / "ngp_research" / "kernel" / "autostart.py"
    if not autostart.is_file():
        raise RuntimeError(f"{autostart} is missing: install the project into the environment first")
    path = purelib / PTH_NAME
    path.write_text(pth_line(str(autostart)))
    return str(path)


def _prune(env: Path) -> None:
    """Remove every kernelspec but ours and every server-extension switch but JupyterLab's."""
    kernels = env / "share" / "jupyter" / "kernels"
    if kernels.is_dir():
        for d in kernels.iterdir():
            if d.name != KERNEL_NAME:
                shutil.rmtree(d)
    for sub in ("jupyter_server_config.d", "jupyter_notebook_config.d", "nbconfig"):
        d = env / "etc" / "jupyter" / sub
        if d.is_dir():
            for f in d.iterdir():
                if f.stem not in KEPT_SERVER_EXTENSIONS:
                    f.unlink() if f.is_file() else shutil.rmtree(f)


def _install_project(python: str, repo: Path) -> None:
    """Install the project as a copy (not editable) from a clean copy of its sources, without its deps."""
    with tempfile.TemporaryDirectory(prefix="ngp-build-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "setup.py", "README.md"):
            shutil.copy2(repo / name, src / name)
        shutil.copytree(repo / "ngp_research", src / "ngp_research",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.so"))
        _run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", "--no-cache-dir", str(src)])


def build_workspace_env(path: str | None = None, repo: str | os.PathLike | None = None, log=print) -> str:
    """Create or update the workspace environment at ``path`` (default :func:`default_workspace_env`)."""
    env = Path(path or default_workspace_env())
    repo = Path(repo) if repo else repo_root()
    t0 = time.monotonic()
    python = str(env / "bin" / "python")
    env.parent.mkdir(parents=True, exist_ok=True)
    _make_traversable(env)
    stamp = env / STAMP
    if stamp.exists():
        stamp.unlink()
    if not os.path.exists(python):
        log(f"creating the workspace environment {env} from {BASE_PYTHON}")
        _run([BASE_PYTHON, "-m", "venv", str(env)])
        _run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    old = os.umask(0o022)
    try:
        _run([python, "-m", "pip", "install", "-q", *PACKAGES])
        _install_project(python, repo)
        write_audit_pth(python)
        _prune(env)
        write_kernelspec(str(env), repo / "kernels" / KERNEL_NAME / "kernel.json")
        cfg = Path(config_dir(str(env)))
        if cfg.exists():
            shutil.rmtree(cfg)
        shutil.copytree(repo / "spawner" / "jupyter", cfg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # No bytecode is written at run time (read-only inside); compile now so imports stay fast.
        _run([python, "-m", "compileall", "-q", "-j", "0", str(env / "lib")], stdout=subprocess.DEVNULL)
        _world_readable(env)
        stamp.write_text(json.dumps({"repo": str(repo), "built_at": time.time(),
                                     "seconds": round(time.monotonic() - t0, 1)}) + "\n")
        os.chmod(stamp, 0o644)
    finally:
        os.umask(old)
    log(f"workspace environment ready at {env} ({time.monotonic() - t0:.0f} s)")
    return str(env)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("build", "path"):
        print("usage: python -m ngp_research.workspace.environment build [PATH] | path", file=sys.stderr)
        return 2
    if argv[0] == "path":
        print(default_workspace_env())
        return 0
    build_workspace_env(argv[1] if len(argv) > 1 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
