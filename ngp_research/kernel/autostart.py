"""The audit hook in every Python program a workspace's kernel starts.

A cell that runs ``!python analysis.py``, ``subprocess.run([sys.executable, "x.py"])`` or a shell
script that calls Python starts a fresh interpreter: without this module it has no audit hook, so
the files the program opens would leave no record (only its start and the paths its command line
names would). The workspace environment carries ``ngp_research_audit.pth`` in its site-packages,
one line that imports this module and calls :func:`main`: the ``site`` module runs it while the interpreter
starts, before any of the program's own code, and this module then installs the hook with
:func:`.child.start` (each record delivered before its access, as in multiprocessing's children),
attributed to the execution that started the program (``NGP_AUDIT_CELL``, which the kernel sets
before each execution: ``[msg_id, cell_id]`` in JSON).

Which interpreters install it (:func:`wanted`):

- not the workspace's Jupyter server and its relays: the spawner starts them with
  ``NGP_AUDIT_EXEMPT`` set (the server's own file events are recorded by its contents manager).
  The kernel removes that variable from its environment before it runs anything, so nothing the
  kernel starts inherits it, and its hook refuses a cell that sets it again (``os.putenv``) or
  starts a program with it in the program's environment;
- not the audited kernel itself (``python ... -m ngp_research.kernel``), which installs its own
  hook first thing (a kernel a cell starts, such as papermill's);
- every other interpreter inside a workspace (its ``/run/ngp/audit`` folder exists), and, outside
  one, an interpreter started from an audited kernel (``NGP_AUDIT_URL`` is set).

A program started without the kernel's environment (``env={}``) inside a workspace still installs
the hook; it lacks the token, so the service refuses its records and the program's recorded accesses
are refused: nothing runs unrecorded. If the hook cannot be installed at all, the program stops
before its code runs (exit status 126, the reason on stderr): ``site`` would otherwise report the
error and go on without the hook.

``python -S`` (no ``site``) skips ``.pth`` files: such a program runs without the hook, like a
compiled one. Its start is recorded by the kernel, under each dataset its command line names.
"""

import os
import sys

__all__ = ["EXEMPT", "CELL", "PTH_NAME", "PTH_LINE", "wanted", "starts_kernel", "cell_ids", "main"]

#: Set by the spawner for the workspace's server and relays: they do not install the hook.
EXEMPT = "NGP_AUDIT_EXEMPT"
#: ``[msg_id, cell_id]`` (JSON) of the kernel's current execution, set by the kernel.
CELL = "NGP_AUDIT_CELL"
KERNEL_MODULE = "ngp_research.kernel"
#: The file in the workspace environment's site-packages, and its one line (``site`` runs lines that start
#: with ``import``).
PTH_NAME = "ngp_research_audit.pth"
PTH_LINE = "import ngp_research.kernel.autostart as _ngp_audit; _ngp_audit.main()\n"
WORKSPACE_AUDIT_DIR = "/run/ngp/audit"  # = dirname(workspace.plan.INSIDE_AUDIT_SOCKET), not imported here

_FLAG_OPTIONS = frozenset("bBdEhiIOPqsSuvV")  # options that take no value; -c, -m, -W and -X do


def starts_kernel(argv) -> bool:
    """Whether the command line ``argv`` (``sys.orig_argv``) runs ``-m ngp_research.kernel``.

    Only flag options may come before ``-m``; anything else (a script, ``-c``, an option with a
    value) means it is not the kernel.

    >>> starts_kernel(["/e/bin/python", "-P", "-s", "-m", "ngp_research.kernel", "-f", "c.json"])
    True
    >>> starts_kernel(["python", "-Ps", "-mngp_research.kernel"]), starts_kernel(["python", "-sm", "ngp_research.kernel"])
    (True, True)
    >>> starts_kernel(["python", "-m", "ngp_research.kernel.child"]), starts_kernel(["python", "-m"])
    (False, False)
    >>> starts_kernel(["python", "-c", "import x", "-m", "ngp_research.kernel"])
    False
    >>> starts_kernel(["python", "-W", "ignore", "-m", "ngp_research.kernel"])
    False
    """
    words = list(argv[1:])
    for i, word in enumerate(words):
        if not word.startswith("-") or word.startswith("--") or len(word) < 2:
            return False
        flags, m, module = word[1:].partition("m")
        if not set(flags) <= _FLAG_OPTIONS:
            return False
        if m:
            if not module:
                module = words[i + 1] if i + 1 < len(words) else ""
            return module == KERNEL_MODULE
    return False


def wanted(environ, argv, in_workspace: bool) -> bool:
    """Whether this interpreter installs the hook (see the module docstring).

    >>> wanted({}, ["python", "x.py"], in_workspace=True)
    True
    >>> wanted({"NGP_AUDIT_EXEMPT": "server"}, ["python", "x.py"], in_workspace=True)
    False
    >>> wanted({}, ["python", "-P", "-s", "-m", "ngp_research.kernel", "-f", "c.json"], in_workspace=True)
    False
    >>> wanted({}, ["python", "x.py"], in_workspace=False)
    False
    >>> wanted({"NGP_AUDIT_URL": "http://127.0.0.1:8082/"}, ["python", "x.py"], in_workspace=False)
    True
    """
    if environ.get(EXEMPT):
        return False
    if starts_kernel(argv):
        return False
    return bool(in_workspace or environ.get("NGP_AUDIT_URL"))


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


def main() -> None:
    """Install the hook here when :func:`wanted`; stop the program if that fails."""
    try:
        if not wanted(os.environ, getattr(sys, "orig_argv", sys.argv), os.path.isdir(WORKSPACE_AUDIT_DIR)):
            return
        from .child import start  # noqa: PLC0415

        start(*cell_ids(os.environ))
    except BaseException as e:  # noqa: BLE001 - whatever it is, the program must not run without the hook
        try:
            sys.stderr.write(f"ngp: the audit hook could not be installed in this Python program "
                             f"({type(e).__name__}: {e}); it was not run\n")
            sys.stderr.flush()
        finally:
            os._exit(126)

