"""The audit hook in a Python child that multiprocessing starts with ``spawn`` or ``forkserver``.

Such a child is a fresh interpreter, started with ``_posixsubprocess`` (no audit event), so it has
no hook of its own: code it runs (a ``Pool`` task reading a dataset's file) would leave no record.
:func:`~.entrypoints.wrap_multiprocessing` puts a call of :func:`start` in front of the child's
command (``-c "...; spawn_main(...)"``), so the hook is installed before anything of the parent's
is unpickled or run there. The child's records are attributed to the cell that started it (a Dask
worker's then to each task's cell, see :mod:`.worker`). They are delivered as in a kernel, in
batches; at a normal exit what is buffered goes out, and so it does when the child is ended with
SIGTERM (``Pool.terminate``, a Nanny closing its worker) before it dies of the signal.
"""

import os
import signal
import threading

__all__ = ["start", "installed"]

_AUDITOR = []


def installed():
    """The auditor :func:`start` installed in this process, or None."""
    return _AUDITOR[0] if _AUDITOR else None


def start(msg_id=None, cell_id=None) -> None:
    """Install the audit hook in this process, attributed to the execution ``msg_id``/``cell_id``."""
    if _AUDITOR:
        return
    from ..workspace.plan import audit_socket
    from .auditor import install
    from .entrypoints import wrap_hail_on_import, wrap_multiprocessing, wrap_pysam, wrap_pyspark_on_import, \
        wrap_scipy_on_import

    auditor = install(os.environ.get("NGP_AUDIT_URL"), os.environ.get("JUPYTERHUB_API_TOKEN"),
                      socket_path=audit_socket())
    _AUDITOR.append(auditor)
    import atexit

    atexit.register(auditor.close)
    auditor.begin(msg_id if isinstance(msg_id, str) else None, cell_id if isinstance(cell_id, str) else None)

    def deliver_then_end(signum, frame):
        # In a thread, bounded: the handler may have interrupted this thread inside the auditor's lock.
        closing = threading.Thread(target=auditor.close, args=(3.0,), daemon=True)
        closing.start()
        closing.join(4.0)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, deliver_then_end)
    wrap_pysam()
    auditor.watch(wrap_hail_on_import())
    auditor.watch(wrap_pyspark_on_import())
    auditor.watch(wrap_scipy_on_import())
    wrap_multiprocessing(lambda: auditor.stats().get("current"))
