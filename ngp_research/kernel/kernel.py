"""The audited kernel: ipykernel's ``IPythonKernel`` whose execute path records before it runs.

:func:`make_kernel_class` builds the class around one :class:`~.auditor.Auditor`; its methods hold
the auditor's functions in closures (there is no attribute to swap). Each execute request:

1. checks that the execute path is still the one built here (else: restores it, records
   ``audit.tamper`` and refuses this and every later cell);
2. sends a ``query.execute`` record (code, cell id, silent, msg id, user expressions) and waits
   for the service's acknowledgement; without one the code is not run and the reply is an error
   ``AuditUnavailable`` shown to the user;
3. runs the cell with file records attributed to it (msg id, cell id);
4. delivers the buffered file records before replying; if that fails the reply says so and the
   next cell is refused until they are delivered (it retries first, so no restart is needed).

Comm messages (widgets) are recorded the same way before their handlers run, and so are completion
and inspection requests (they can run user code: properties, ``__getattr__``, ``__repr__``); the
debugger is off.
"""

import json
import os
import sys

from .auditor import TOO_LARGE, UNREACHABLE, closure_guard, short_id
from .autostart import CELL

ENAME = "AuditUnavailable"
ACK_TIMEOUT = 5.0


def annotate_dask(msg_id, cell_id):
    """Tag the Dask tasks this execution submits with its msg_id/cell_id (see :mod:`.worker`).

    Returns the entered ``dask.annotate`` context (exit it when the execution ends), or None when
    Dask is not installed.
    """
    dask = sys.modules.get("dask")
    if dask is None or not hasattr(dask, "annotate"):
        return None
    context = dask.annotate(ngp_msg_id=msg_id, ngp_cell_id=cell_id)
    context.__enter__()
    return context


def make_kernel_class(auditor, timeout: float = ACK_TIMEOUT):
    """The kernel class for ``IPKernelApp(kernel_class=...)``, bound to ``auditor``."""
    from ipykernel.ipkernel import IPythonKernel  # noqa: PLC0415

    write_ahead, flush, begin, tamper, watch = (auditor.write_ahead, auditor.flush, auditor.begin,
                                                auditor.tamper, auditor.watch)
    base_do_execute = IPythonKernel.__dict__["do_execute"]
    base_execute_request = IPythonKernel.__dict__["execute_request"]
    base_do_complete = IPythonKernel.do_complete
    base_do_inspect = IPythonKernel.do_inspect
    dumps = json.dumps
    short = short_id  # ids as the auditor keeps them (a crafted 3 MB cell id is cut): records still match
    environ = os.environ  # held: a cell that rebinds os.environ does not move where the execution is told

    def attribute(msg_id, cell_id):
        """Records from here on belong to this execution: the kernel's own, and (``NGP_AUDIT_CELL``, read by
        :mod:`.autostart`) those of the Python programs it starts. Returns what was current before."""
        prev = begin(msg_id, cell_id)
        try:
            environ[CELL] = dumps([msg_id if type(msg_id) is str else None, cell_id if type(cell_id) is str else None])
        except (TypeError, ValueError, OSError):  # an id the environment cannot hold: the programs get none
            environ.pop(CELL, None)
        return prev

    instances = []  # the one kernel instance, once created
    comm_wrappers = {}

    def _evalue(reason: str) -> str:
        if reason.startswith(("the kernel's audit machinery", TOO_LARGE)):
            return reason
        return f"{UNREACHABLE} ({reason})"

    def check(kernel, restore: bool):
        """None when the execute path is the one built here; else what changed (restored if asked)."""
        problems = []
        if type(kernel) is not cls:
            problems.append("the kernel's class was changed")
            if restore:
                kernel.__class__ = cls
        for name, fn in originals.items():
            if cls.__dict__.get(name) is not fn:
                problems.append(f"AuditedKernel.{name} was replaced")
                if restore:
                    setattr(cls, name, fn)
            if name in kernel.__dict__:
                problems.append(f"kernel.{name} was replaced")
                if restore:
                    del kernel.__dict__[name]
            if fn.__code__ is not codes[name]:
                problems.append(f"AuditedKernel.{name}.__code__ was replaced")
                if restore:
                    fn.__code__ = codes[name]
        for name, fn in (("do_execute", base_do_execute), ("execute_request", base_execute_request)):
            if IPythonKernel.__dict__.get(name) is not fn:
                problems.append(f"IPythonKernel.{name} was replaced")
                if restore:
                    setattr(IPythonKernel, name, fn)
        handler = kernel.shell_handlers.get("execute_request")
        if getattr(handler, "__func__", None) is not originals["execute_request"] or \
                getattr(handler, "__self__", None) is not kernel:
            problems.append("the execute_request handler was replaced")
            if restore:
                kernel.shell_handlers["execute_request"] = originals["execute_request"].__get__(kernel)
        problem = guard[0](restore=restore) if guard else None
        if problem:
            problems.append(problem)
        for msg_type, wrapper in comm_wrappers.items():
            if kernel.shell_handlers.get(msg_type) is not wrapper:
                problems.append(f"the {msg_type} handler was replaced")
                if restore:
                    kernel.shell_handlers[msg_type] = wrapper
        return "; ".join(problems) or None

    def audited_comm(kernel, msg_type, handler):
        def handle(stream, ident, msg):
            header = msg.get("header") or {}
            content = msg.get("content") or {}
            msg_id = short(header.get("msg_id"))
            try:
                data = dumps(content.get("data"), default=str)[:4000]
            except Exception:
                data = repr(content.get("data"))[:4000]
            record = {"action": "query.execute", "path": None, "detail": {
                "code": None, "msg_type": msg_type, "comm_id": content.get("comm_id"),
                "target_name": content.get("target_name"), "data": data, "silent": True,
                "msg_id": msg_id, "cell_id": None}}
            reason = write_ahead(record, timeout)
            if reason is not None:
                kernel.log.error("%s: %s; the %s was not handled", ENAME, _evalue(reason), msg_type)
                return None
            attribute(msg_id, None)
            return handler(stream, ident, msg)

        handle.__name__ = f"audited_{msg_type}"
        return handle

    class AuditedKernel(IPythonKernel):
        """IPythonKernel that records every execution before running it (see the module docstring)."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            for msg_type in ("comm_open", "comm_msg", "comm_close"):
                handler = self.shell_handlers.get(msg_type)
                if handler is not None:
                    comm_wrappers[msg_type] = self.shell_handlers[msg_type] = audited_comm(self, msg_type, handler)
            instances.append(self)
            _guard_now()
            watch(lambda: check(self, restore=False))

        async def execute_request(self, stream, ident, parent):
            problem = check(self, restore=True)
            if problem:
                tamper(problem)
            await base_execute_request(self, stream, ident, parent)

        async def do_execute(self, code, silent, store_history=True, user_expressions=None,
                             allow_stdin=False, *, cell_meta=None, cell_id=None):
            parent = self.get_parent("shell") or {}
            header = parent.get("header") or {}
            msg_id = short(header.get("msg_id"))
            if cell_id is None:
                cell_id = (parent.get("metadata") or {}).get("cellId")
            recorded_cell = short(cell_id)
            problem = check(self, restore=True)
            if problem:
                tamper(problem)
            record = {"action": "query.execute", "path": None, "detail": {
                "code": code, "cell_id": recorded_cell, "silent": bool(silent), "store_history": bool(store_history),
                "msg_id": msg_id, "msg_type": header.get("msg_type", "execute_request"),
                "user_expressions": dict(user_expressions or {}),
                "claimed": {"username": header.get("username"), "session": header.get("session")}}}
            reason = write_ahead(record, timeout)
            if reason is not None:
                return self._ngp_refuse(reason, silent)
            attribute(msg_id, recorded_cell)
            annotation = annotate_dask(msg_id, recorded_cell)
            try:
                reply = await base_do_execute(self, code, silent, store_history, user_expressions, allow_stdin,
                                              cell_meta=cell_meta, cell_id=cell_id)
            finally:
                if annotation is not None:
                    annotation.__exit__(None, None, None)
                undelivered = flush(timeout)
            if undelivered is not None and not silent:
                self.send_response(self.iopub_socket, "stream", ident=self._topic("stream"), content={
                    "name": "stderr",
                    "text": f"{ENAME}: the audit records of this cell could not be delivered ({undelivered}); "
                            "the next cell will not run until they are.\n"})
            return reply

        async def _ngp_introspect(self, msg_type, base, code, cursor_pos, *args):
            """A completion or inspection: it can run user code (properties, ``__getattr__``, ``__repr__``),
            so it is recorded before it runs, like a silent execution, and what it opens is attributed to it."""
            header = (self.get_parent("shell") or {}).get("header") or {}
            problem = check(self, restore=True)
            if problem:
                tamper(problem)
            msg_id = short(header.get("msg_id"))
            record = {"action": "query.execute", "path": None, "detail": {
                "code": code, "cursor_pos": cursor_pos, "msg_type": msg_type, "silent": True,
                "msg_id": msg_id, "cell_id": None}}
            reason = write_ahead(record, timeout)
            if reason is not None:
                return {"status": "error", "ename": ENAME, "evalue": _evalue(reason), "traceback": []}
            prev = attribute(msg_id, None)
            try:
                reply = base(self, code, cursor_pos, *args)
                if hasattr(reply, "__await__"):
                    reply = await reply
                return reply
            finally:
                attribute(*prev)

        async def do_complete(self, code, cursor_pos):
            reply = await self._ngp_introspect("complete_request", base_do_complete, code, cursor_pos)
            if reply.get("status") == "error":
                reply.update(matches=[], cursor_start=cursor_pos, cursor_end=cursor_pos, metadata={})
            return reply

        async def do_inspect(self, code, cursor_pos, detail_level=0, omit_sections=()):
            reply = await self._ngp_introspect("inspect_request", base_do_inspect, code, cursor_pos, detail_level,
                                               omit_sections)
            if reply.get("status") == "error":
                reply.update(data={}, metadata={}, found=False)
            return reply

        def _ngp_refuse(self, reason, silent):
            evalue = _evalue(reason)
            content = {"ename": ENAME, "evalue": evalue,
                       "traceback": [f"\x1b[0;31m{ENAME}\x1b[0m: {evalue}"]}
            if not silent:
                self.send_response(self.iopub_socket, "error", content, ident=self._topic("error"))
            return {"status": "error", "execution_count": self.shell.execution_count,
                    "user_expressions": {}, "payload": [], **content}

        async def do_debug_request(self, msg):
            return {"type": "response", "request_seq": msg.get("seq"), "success": False,
                    "command": msg.get("command"), "message": "the debugger is off in the audited kernel"}

    cls = AuditedKernel
    originals = {name: AuditedKernel.__dict__[name] for name in ("do_execute", "execute_request", "_ngp_refuse",
                                                                 "_ngp_introspect", "do_complete", "do_inspect")}
    codes = {name: fn.__code__ for name, fn in originals.items()}
    guard = []  # the closure guard, made once the instance (and its comm wrappers) exist

    def _guard_now():
        guard.append(closure_guard([*originals.values(), check, audited_comm, attribute, *comm_wrappers.values()]))
    AuditedKernel.__module__ = __name__
    return AuditedKernel
