"""The audit hook in Dask workers started from a workspace (a ``distributed.worker.preload`` module).

Every workspace's environment sets ``DASK_DISTRIBUTED__WORKER__PRELOAD=["ngp_research.kernel.worker"]``,
so each Dask worker a workspace starts (a ``LocalCluster``, :class:`~ngp_research.cohort.Cohort`'s
cluster, ``dask worker``) loads this module before it takes a task. :func:`dask_setup` installs the
kernel's audit hook in the worker process with the workspace's own service URL and token: the
service attributes the worker's records to the same user and project as the kernel's, from the
token. pysam and Hail entry points are wrapped as in the kernel.

Each task's records carry the ``msg_id`` and ``cell_id`` of the cell that submitted it: the audited
kernel puts them in Dask's task annotations (``ngp_msg_id``, ``ngp_cell_id``) for every execution,
and :class:`CellAttribution` makes them current when the task starts executing. With more than one
thread per worker, concurrent tasks share that attribution (the last one started wins). A task's
records are delivered when it finishes, before its result is reported, and the rest when the worker
closes.

What this does not cover, as in the kernel: a worker started with another preload setting (for
example after the member changes ``dask.config`` in the kernel) runs without the hook. Such a
worker still runs inside the member's sandbox, so it sees only the tagged files (invariants 1 and 2).
"""

import os

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["dask_setup", "CellAttribution"]

FLUSH_TIMEOUT = 10.0  # seconds


class CellAttribution(WorkerPlugin):
    """Attributes a task's audit records to the cell that submitted it (from its annotations)."""

    name = "ngp-audit-attribution"

    def __init__(self, auditor):
        self.auditor = auditor

    def setup(self, worker):
        self.worker = worker

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing":
            task = self.worker.state.tasks.get(key)
            annotations = (getattr(task, "annotations", None) or {}) if task is not None else {}
            self.auditor.begin(annotations.get("ngp_msg_id"), annotations.get("ngp_cell_id"))
        elif start == "executing":
            # A task's records are delivered before its result goes out, as a cell's are before its reply.
            self.auditor.flush(FLUSH_TIMEOUT)

    def teardown(self, worker):
        self.auditor.flush(FLUSH_TIMEOUT)


async def dask_setup(worker):
    """Install the audit hook in this worker process (a no-op outside a workspace)."""
    if not os.environ.get("NGP_AUDIT_URL"):
        return
    from . import child

    if child.in_kernel():  # Client(processes=False): the kernel's own hook records; its cells attribute
        return
    if child.installed() is None:  # started some other way (dask-worker): as a spawned child is
        child.start()
    auditor = child.installed()
    # A spawned worker delivers each record before its access until here; from now on in batches, each
    # task's before its result goes out (CellAttribution). A forked one has no sender: it stays so.
    auditor.reopen()  # once reopened (another worker of this process), nothing to do
    await worker.plugin_add(CellAttribution(auditor), name=CellAttribution.name)
