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

Every other Python program of a workspace gets its hook from here too, through
:mod:`.autostart` (the environment's ``.pth`` file), the kernel included: it claims that hook as
its own (:func:`claim_for_kernel`), so that code running in the kernel's process or in a child
forked from it (a Dask worker of either kind) finds the hook that is there instead of installing a
second one.
"""

import os

__all__ = ["start", "adopt", "installed", "in_kernel", "claim_for_kernel", "tuning"]

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


def claim_for_kernel():
    """The auditor :func:`start` installed here, now registered as the kernel's (``ngp_research.kernel.__main__``,
    which switches it to batches); None when there is none."""
    if not _AUDITOR or _AUDITOR[0][1] != os.getpid():
        return None
    _AUDITOR[0] = (_AUDITOR[0][0], os.getpid(), True)
    return _AUDITOR[0][0]


def tuning(environ) -> dict:
    """The sender's tuning knobs from the environment: seconds a burst of records may collect
    (``NGP_AUDIT_LINGER``), records that wake the sender at once (``NGP_AUDIT_BATCH``), records buffered at
    most (``NGP_AUDIT_CAPACITY``; past that an access waits for delivery or is refused). A value that is
    not a number raises ValueError.

    >>> tuning({"NGP_AUDIT_LINGER": "0.001", "NGP_AUDIT_BATCH": "200"})
    {'linger': 0.001, 'batch': 200}
    """
    options = {}
    for name, option, kind in (("NGP_AUDIT_LINGER", "linger", float), ("NGP_AUDIT_BATCH", "batch", int),
                               ("NGP_AUDIT_CAPACITY", "capacity", int)):
        if environ.get(name):
            options[option] = kind(environ[name])
    return options


def start(msg_id=None, cell_id=None, batches: bool = False) -> None:
    """Install the audit hook in this process, attributed to the execution ``msg_id``/``cell_id``.

    Each record is delivered before its access; with ``batches`` (a long-running process: the kernel, the
    workspace's server) records go in batches, as in the kernel, and what is buffered goes out at exit."""
    if _AUDITOR:
        return
    from ..workspace.plan import audit_socket
    from .auditor import install
    from .entrypoints import wrap_libraries

    url, token = os.environ.get("NGP_AUDIT_URL"), os.environ.get("JUPYTERHUB_API_TOKEN")
    batches = batches and bool(url and token)  # without them nothing could be delivered: refuse each access now
    auditor = install(url, token, socket_path=audit_socket(), **tuning(os.environ))
    adopt(auditor, kernel=False)
    # Not armed: only the kernel's own executions make a later import of ngp_research.kernel tampering.
    auditor.begin(msg_id if type(msg_id) is str else None, cell_id if type(cell_id) is str else None, arm=False)
    if batches:
        import atexit  # noqa: PLC0415

        atexit.register(auditor.close)
    else:
        auditor.close()  # from here on every record is delivered before its access
    wrap_libraries(auditor)
