"""The audit hook in a Python child that multiprocessing starts with ``spawn`` or ``forkserver``.

Such a child is a fresh interpreter, started with ``_posixsubprocess`` (no audit event), so it has
no hook of its own: code it runs (a ``Pool`` task reading a dataset's file) would leave no record.
:func:`~.entrypoints.wrap_multiprocessing` puts a call of :func:`start` in front of the child's
command (``-c "...; spawn_main(...)"``), so the hook is installed before anything of the parent's
is unpickled or run there. The child's records are attributed to the cell that started it (a Dask
worker's then to each task's cell, see :mod:`.worker`). Each is delivered before its access, as in a
forked child: a child may end with SIGTERM (``Pool.terminate``) or ``os._exit``, and a child whose
records cannot be delivered (no token, the service down) is refused the access, never left to run
unrecorded. A Dask worker's preload switches back to batches (``Auditor.reopen``): it delivers each
task's records before the task's result goes out.

The kernel registers its own auditor here too (:func:`adopt`), so that code running in the kernel's
process or in a child forked from it (a Dask worker of either kind) finds the hook that is there
instead of installing a second one.
"""

import os

__all__ = ["start", "adopt", "installed", "in_kernel"]

_AUDITOR = []  # (auditor, pid of the process that installed it, whether that process is the kernel)


def adopt(auditor, kernel: bool = True) -> None:
    """Register the auditor installed in this process (the kernel's, from ``ngp_research.kernel.__main__``)."""
    if not _AUDITOR:
        _AUDITOR.append((auditor, os.getpid(), kernel))


def installed():
    """The auditor of this process (or of the process this one was forked from), or None."""
    return _AUDITOR[0][0] if _AUDITOR else None


def in_kernel() -> bool:
    """Whether this is the kernel's own process."""
    return bool(_AUDITOR) and _AUDITOR[0][2] and _AUDITOR[0][1] == os.getpid()


def start(msg_id=None, cell_id=None) -> None:
    """Install the audit hook in this process, attributed to the execution ``msg_id``/``cell_id``."""
    if _AUDITOR:
        return
    from ..workspace.plan import audit_socket
    from .auditor import install
    from .entrypoints import wrap_libraries

    auditor = install(os.environ.get("NGP_AUDIT_URL"), os.environ.get("JUPYTERHUB_API_TOKEN"),
                      socket_path=audit_socket())
    adopt(auditor, kernel=False)
    auditor.begin(msg_id if type(msg_id) is str else None, cell_id if type(cell_id) is str else None)
    auditor.close()  # from here on every record is delivered before its access
    wrap_libraries(auditor)
