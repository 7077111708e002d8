"""The audit hook in every Python program of a workspace, installed before the program's own code runs.

A cell that runs ``!python analysis.py``, ``subprocess.run([sys.executable, "x.py"])`` or a shell
script that calls Python starts a fresh interpreter. Without this module it would have no audit
hook: only its start and the paths its command line names would be recorded, not the files it opens.

The workspace environment carries :data:`PTH_NAME` in its site-packages (written by
:func:`~ngp_research.workspace.environment.write_audit_pth`), one line made by :func:`pth_line`.
The ``site`` module runs it while the interpreter starts, before the program's own code and before
any other ``.pth`` file of the environment (the name sorts first). The line runs this file
from its absolute path, which is read-only inside the sandbox. That code (:func:`_boot`) then
imports this module, and the auditor behind it, from the environment's own site-packages and the
standard library only: a ``PYTHONPATH`` or ``PYTHONPYCACHEPREFIX`` a cell sets for the program
cannot put its own ``ngp_research`` (or ``json``) there. If installing fails in any way, the
program stops before its code runs (exit status 126, the reason on stderr): ``site`` would
otherwise report the error and run the program without the hook.

:func:`main` installs the hook with :func:`.child.start` when :func:`wanted`: in every interpreter
inside a workspace (its ``/run/ngp/audit`` folder exists, bound read-only from outside), and, outside
one, in an interpreter that has an audit service to report to (``NGP_AUDIT_URL``, as the audited
kernel and what it starts have), attributed to the execution that started the program
(``NGP_AUDIT_CELL``: ``[msg_id, cell_id]`` in JSON, which the kernel updates before each execution).
A program delivers each record before its access; the long-running processes
(:func:`delivers_in_batches`) deliver in batches, as the kernel always has. That covers:

- the audited kernel itself: its ``__main__`` claims this hook (see :mod:`ngp_research.kernel.__main__`);
- the workspace's Jupyter server and the relays of its launcher (their records carry no cell; the
  server's own file operations are also recorded by its contents manager);
- every Python program a cell starts, and what those start in turn: Dask workers started by
  hand, Spark's Python workers, a kernel started through jupyter_client.

A program started without the kernel's environment (``env={}``) inside a workspace still installs
the hook; it lacks the token, so the service refuses its records and the program stops at its first
recorded access, or at start: nothing runs unrecorded.

What still runs without the hook: ``python -S`` (no ``site``), an interpreter outside the workspace
environment (``/usr/bin/python3`` by its full path, a venv a cell makes), one given another
standard library (``PYTHONHOME``), and one whose ``PYTHONPATH`` (or bytecode cache prefix) shadows a
module the interpreter imports before ``site`` runs (the ``encodings`` package); their start is
recorded like a compiled program's. A cell can also
set ``NGP_AUDIT_CELL`` for a program it starts, so that the program's records name another cell
than the one that started it (that cell's code, recorded before it ran, shows it; the service
flags code that names ``NGP_AUDIT``, and a region's report an access whose cell was never recorded).
"""

import os
import sys

__all__ = ["CELL", "PTH_NAME", "pth_line", "wanted", "delivers_in_batches", "cell_ids", "main"]

#: ``[msg_id, cell_id]`` (JSON) of the kernel's current execution, set by the kernel.
CELL = "NGP_AUDIT_CELL"
#: The file in the workspace environment's site-packages. ``site`` runs its ``.pth`` files in name order;
#: this one runs first.
PTH_NAME = "00_ngp_research_audit.pth"
WORKSPACE_AUDIT_DIR = "/run/ngp/audit"  # = dirname(workspace.plan.INSIDE_AUDIT_SOCKET), not imported here
_BOOT_NAME = "_ngp_research_autostart_boot"
EXIT_STATUS = 126


def pth_line(autostart_path: str) -> str:
    """The ``.pth`` line that runs the file ``autostart_path`` (this module, installed) at interpreter start.

    ``site`` runs a ``.pth`` line that starts with ``import``; only builtins are used before this
    file's code takes over (nothing of the program has run yet to change them).

    >>> line = pth_line("/e/lib/python3.11/site-packages/ngp_research/kernel/autostart.py")
    >>> line.startswith("import sys;") and line.endswith("\\n") and line.count("\\n") == 1
    True
    """
    path = repr(str(autostart_path))
    return (f"import sys; exec(compile(open({path}, 'rb').read(), {path}, 'exec'), "
            f"{{'__name__': {_BOOT_NAME!r}, '__file__': {path}}})\n")


def wanted(environ, in_workspace: bool) -> bool:
    """Whether this interpreter installs the hook (see the module docstring).

    >>> wanted({}, in_workspace=True), wanted({}, in_workspace=False)
    (True, False)
    >>> wanted({"NGP_AUDIT_URL": "http://127.0.0.1:8082/services/audit/"}, in_workspace=False)
    True
    >>> from ngp_research.workspace.plan import INSIDE_AUDIT_SOCKET  # the folder a workspace binds
    >>> os.path.dirname(INSIDE_AUDIT_SOCKET) == WORKSPACE_AUDIT_DIR
    True
    """
    return bool(in_workspace or environ.get("NGP_AUDIT_URL"))


#: Long-running processes, which deliver in batches: ``-m`` modules, and the Jupyter server's scripts.
BATCH_MODULES = ("ngp_research.kernel", "ngp_research.workspace.launch")
BATCH_SCRIPTS = ("jupyterhub-singleuser", "jupyter-server", "jupyter-lab", "jupyter-notebook")
_FLAG_OPTIONS = frozenset("bBdEhIOPqsSuvV")  # options without a value (-c, -m, -W, -X take one; -i is not
# one a long-running process uses: an interactive prompt delivers each record before its access)


def delivers_in_batches(argv) -> bool:
    """Whether the command line ``argv`` (``sys.orig_argv``) starts a long-running process of the workspace.

    Those deliver their records in batches (a few milliseconds late, as the kernel does); every other
    program delivers each record before its access. Either way every access is recorded.

    >>> delivers_in_batches(["/e/bin/python", "-P", "-s", "-m", "ngp_research.kernel", "-f", "k.json"])
    True
    >>> import sys
    >>> delivers_in_batches([sys.executable, sys.prefix + "/bin/jupyter-server", "--sock=/run/ngp/server/server.sock"])
    True
    >>> delivers_in_batches(["python", "/tmp/jupyter-server"]), delivers_in_batches(["python", "-i", "-m", "ngp_research.kernel"])
    (False, False)
    >>> delivers_in_batches(["python", "analysis.py"]), delivers_in_batches(["python", "-c", "import x"])
    (False, False)
    >>> delivers_in_batches(["python", "-W", "ignore", "-m", "ngp_research.kernel"])
    False
    """
    words = list(argv[1:])
    for i, word in enumerate(words):
        if not word.startswith("-") or word == "-":  # the environment's own script, not a copy elsewhere
            name = os.path.basename(word)
            return name in BATCH_SCRIPTS and \
                os.path.realpath(word) == os.path.realpath(os.path.join(sys.prefix, "bin", name))
        flags, m, module = word[1:].partition("m")
        if word.startswith("--") or not set(flags) <= _FLAG_OPTIONS:
            return False
        if m:
            return (module or (words[i + 1] if i + 1 < len(words) else "")) in BATCH_MODULES
    return False


def cell_ids(environ) -> tuple:
    """The (msg_id, cell_id) in ``NGP_AUDIT_CELL``; (None, None) when it is missing or not two strings.

    >>> cell_ids({"NGP_AUDIT_CELL": '["m1", "c1"]'}), cell_ids({"NGP_AUDIT_CELL": "[1, 2]"}), cell_ids({})
    (('m1', 'c1'), (None, None), (None, None))
    """
    import json  # noqa: PLC0415

    try:
        ids = json.loads(environ.get(CELL) or "null")
    except ValueError:
        return (None, None)
    if type(ids) is list and len(ids) == 2 and all(i is None or type(i) is str for i in ids):
        return (ids[0], ids[1])
    return (None, None)


def _stop(e: BaseException) -> None:
    try:
        sys.stderr.write(f"ngp: this Python program cannot run with the audit hook ({type(e).__name__}: {e}); "
                         "it was not run\n")
        sys.stderr.flush()
    finally:
        os._exit(EXIT_STATUS)


def main() -> None:
    """Install the hook in this process (:func:`_boot` asked :func:`wanted`); stop the program if that fails."""
    try:
        from .child import start  # noqa: PLC0415

        start(*cell_ids(os.environ), batches=delivers_in_batches(getattr(sys, "orig_argv", sys.argv)))
    except BaseException as e:  # noqa: BLE001 - whatever it is, the program must not run without the hook
        _stop(e)


def _boot(path: str) -> None:
    """Run by the ``.pth`` line: import this module from the environment and the standard library only, then
    :func:`main`. ``sys.path`` and the bytecode cache prefix are put back afterwards."""
    saved_path, saved_prefix = sys.path[:], getattr(sys, "pycache_prefix", None)
    try:
        if not wanted(os.environ, os.path.isdir(WORKSPACE_AUDIT_DIR)):  # nothing to import (a build's pip, say)
            return
        site_packages = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
        stdlib = os.path.dirname(os.__file__)  # os came from the standard library before site ran
        sys.path[:] = [p for p in saved_path if p == stdlib or p.startswith(stdlib + os.sep)] + [site_packages]
        sys.pycache_prefix = None
        from ngp_research.kernel import autostart  # noqa: PLC0415

        autostart.main()
    except BaseException as e:  # noqa: BLE001
        _stop(e)
    finally:
        sys.path[:] = saved_path
        sys.pycache_prefix = saved_prefix


if __name__ == _BOOT_NAME:
    _boot(__file__)
