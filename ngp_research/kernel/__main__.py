"""``python -P -s -m ngp_research.kernel -f CONNECTION_FILE``: start the audited kernel.

Order matters: the audit hook goes in first (before IPython, ipykernel or any startup file), then
IPython is pointed at a fresh, empty, private IPYTHONDIR, pysam's file classes are wrapped, and only
then does ipykernel's app start with :func:`~.kernel.make_kernel_class`'s class.
"""

import atexit
import os
import shutil
import sys
import tempfile


def main(argv=None) -> None:
    if sys.path and sys.path[0] in ("", os.getcwd()):  # without -P: keep the working directory out
        del sys.path[0]
    # No member-written file runs before or around the hook: no PYTHONSTARTUP, and an IPYTHONDIR of
    # our own (profile config and startup files are read from it).
    os.environ.pop("PYTHONSTARTUP", None)
    # The workspace's server is exempt from the audit hook of the Python programs it starts (see
    # .autostart); the programs a cell starts are not: nothing started here inherits the exemption.
    os.environ.pop("NGP_AUDIT_EXEMPT", None)
    ipython_dir = tempfile.mkdtemp(prefix="ngp-ipython-")
    os.environ["IPYTHONDIR"] = ipython_dir
    atexit.register(shutil.rmtree, ipython_dir, True)

    from ..workspace.plan import audit_socket  # noqa: PLC0415
    from .auditor import install  # noqa: PLC0415

    options = {}  # tuning knobs: seconds the sender lets a burst of records collect; records that wake it at
    # once; records buffered at most (past that, an access waits for delivery or is refused)
    for name, option, kind in (("NGP_AUDIT_LINGER", "linger", float), ("NGP_AUDIT_BATCH", "batch", int),
                               ("NGP_AUDIT_CAPACITY", "capacity", int)):
        if os.environ.get(name):
            options[option] = kind(os.environ[name])
    auditor = install(os.environ.get("NGP_AUDIT_URL"), os.environ.get("JUPYTERHUB_API_TOKEN"),
                      socket_path=audit_socket(), **options)
    atexit.register(auditor.close)  # what is buffered goes out; later opens (__del__, threads) go out first
    from . import child  # noqa: PLC0415  (imported now: importing it after the first cell reads as tampering)

    child.adopt(auditor)  # a Dask worker in this process, or forked from it, uses this hook

    from .entrypoints import wrap_libraries  # noqa: PLC0415
    from .kernel import make_kernel_class  # noqa: PLC0415

    wrap_libraries(auditor)  # Hail is wrapped when imported (importing it takes seconds), and so on
    try:  # so that every execution can tag the Dask tasks it submits (see ngp_research.kernel.worker)
        import dask  # noqa: F401, PLC0415
    except ImportError:
        pass

    from ipykernel.kernelapp import IPKernelApp  # noqa: PLC0415

    IPKernelApp.launch_instance(argv=argv, kernel_class=make_kernel_class(auditor))


if __name__ == "__main__":
    main()
