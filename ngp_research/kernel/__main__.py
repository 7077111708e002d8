"""``python -P -s -m ngp_research.kernel -f CONNECTION_FILE``: start the audited kernel.

Order matters: the audit hook goes in first (before IPython, ipykernel or any startup file). In the
workspace environment it is already there when this runs (:mod:`.autostart` installs it while the
interpreter starts, delivering in batches, and wraps the libraries that open files in C); the
kernel claims it. Then IPython is pointed at a fresh, empty, private IPYTHONDIR, and only then does
ipykernel's app start with :func:`~.kernel.make_kernel_class`'s class. Command-line options other than the connection file are
refused: they could run code before the first recorded execution.
"""

import atexit
import os
import shutil
import sys
import tempfile

USAGE = "python -P -s -m ngp_research.kernel -f CONNECTION_FILE"


#: The one option the kernel takes besides its connection file (the kernelspec gives it; it is always set).
IGNORE_CWD = "--InteractiveShellApp.ignore_cwd=True"


def kernel_arguments(args) -> list | None:
    """The arguments ipykernel's app gets, or None when ``args`` holds anything but the connection file
    (and :data:`IGNORE_CWD`), as the kernelspec gives them.

    Any other option (``--IPKernelApp.exec_lines``, ``--ipython-dir``, a config file) could run code
    before the kernel's first recorded execution, so the kernel refuses to start with one.

    >>> kernel_arguments(["-f", "/tmp/k.json"]), kernel_arguments(["--f=/tmp/k.json", IGNORE_CWD])
    (['-f', '/tmp/k.json', '--InteractiveShellApp.ignore_cwd=True'], ['--f=/tmp/k.json', '--InteractiveShellApp.ignore_cwd=True'])
    >>> kernel_arguments(["-f", "/tmp/k.json", "--IPKernelApp.exec_lines=['import os']"]) is None
    True
    """
    rest = [a for a in args if a != IGNORE_CWD]
    if (len(rest) == 2 and rest[0] == "-f") or (len(rest) == 1 and rest[0].startswith(("-f=", "--f="))):
        return [*rest, IGNORE_CWD]
    return None


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    launch = kernel_arguments(args)
    if launch is None or sys.flags.inspect:
        sys.stderr.write(f"ngp: the audited kernel takes only its connection file ({USAGE}), and no -i; "
                         "it did not start\n")
        sys.stderr.flush()
        os._exit(2)  # not SystemExit: under -i (or PYTHONINSPECT) that would open an interactive prompt
    if sys.path and sys.path[0] in ("", os.getcwd()):  # without -P: keep the working directory out
        del sys.path[0]
    from . import child  # noqa: PLC0415  (imported now: importing it after the first cell reads as tampering)

    auditor = child.claim_for_kernel()
    if auditor is None:  # not started through the workspace environment's .pth (see .autostart): install here
        from ..workspace.plan import audit_socket  # noqa: PLC0415
        from .auditor import install  # noqa: PLC0415
        from .entrypoints import wrap_libraries  # noqa: PLC0415

        auditor = install(os.environ.get("NGP_AUDIT_URL"), os.environ.get("JUPYTERHUB_API_TOKEN"),
                          socket_path=audit_socket(), **child.tuning(os.environ))
        child.adopt(auditor)  # a Dask worker in this process, or forked from it, uses this hook
        wrap_libraries(auditor)  # Hail is wrapped when imported (importing it takes seconds), and so on
    else:  # installed by .autostart, libraries wrapped: in batches already, unless .autostart did not
        auditor.reopen()  # recognise this command line
    atexit.register(auditor.close)  # what is buffered goes out; later opens (__del__, threads) go out first
    # No member-written file runs before or around the hook: no PYTHONSTARTUP, and an IPYTHONDIR of
    # our own (profile config and startup files are read from it).
    os.environ.pop("PYTHONSTARTUP", None)
    ipython_dir = tempfile.mkdtemp(prefix="ngp-ipython-")
    os.environ["IPYTHONDIR"] = ipython_dir
    atexit.register(shutil.rmtree, ipython_dir, True)

    from .kernel import make_kernel_class  # noqa: PLC0415

    try:  # so that every execution can tag the Dask tasks it submits (see ngp_research.kernel.worker)
        import dask  # noqa: F401, PLC0415
    except ImportError:
        pass

    from ipykernel.kernelapp import IPKernelApp  # noqa: PLC0415

    IPKernelApp.launch_instance(argv=launch, kernel_class=make_kernel_class(auditor))


if __name__ == "__main__":
    main()
