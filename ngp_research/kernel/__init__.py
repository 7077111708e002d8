"""The audited kernel: what runs inside every workspace kernel (design invariant 4).

Launched as ``python -P -s -m ngp_research.kernel -f {connection_file}`` (the only kernelspec,
``kernels/ngp-python/kernel.json``). It needs ``NGP_AUDIT_URL`` (the audit service, e.g.
``http://127.0.0.1:8082/``) and ``JUPYTERHUB_API_TOKEN`` (the caller's identity, sent as
``Authorization: token <T>``); without them it refuses to run any code. In a workspace
``NGP_AUDIT_SOCKET`` is ``/run/ngp/audit/audit.sock``, the service's own unix socket in a folder
bound read-only from outside: the kernel then sends everything there (the URL gives only the
request's path) and never falls back to the URL's port, where a process of the member's could answer.

- :mod:`.auditor`: a PEP 578 audit hook (its hot path in C, ``_hook.c``), installed before IPython
  is imported, turns ``open``,
  ``os.listdir``/``os.scandir``, ``os.symlink``/``os.link`` (recorded under what the link leads
  to, so a region sees a link into its data even though later opens through it name the link),
  ``shutil`` copies, ``sqlite3.connect`` (SQLite opens its database in C: recorded as the open of
  that file; a database a statement opens, ``ATTACH DATABASE`` or ``VACUUM INTO``, through any of
  SQLite's VFSes, is recorded by the VFS ``_hook.watch_sqlite`` puts in front of each, and refused
  when it cannot be; where they cannot be wrapped, a Python with SQLite linked in or without the C
  hook, each connect's record says its statements' databases are not recorded), ``subprocess.Popen``, ``os.system``,
  ``os.exec*``/``os.posix_spawn`` (a started program is also recorded under each dataset its
  arguments, shell command, environment or working folder name literally, globs and region
  folders expanded against the mounted datasets: ``cat /data/...`` reaches the region's report),
  ``ctypes.dlopen`` and ``socket.connect`` into records; a bounded
  buffer (10,000) delivers them in batches, acknowledged by the service, retried with backoff;
  nothing leaves the buffer unacknowledged. With the C extension the buffer is a C queue of
  encoded records and a C thread delivers it without the GIL, so a cell that opens many files
  does not wait for the sender (a run of opens in one place is one record with ``paths``).
  A path through ``/proc`` or ``/dev`` (``/proc/self/cwd/x``, ``/dev/fd/3/x``, ``/dev/stdin/x``, however
  spelled) is recorded where it leads: only the kernel's own process can read that.
  Every record stays deliverable (the service takes 16 MiB per request): a path longer than any
  Linux opens (4,096) and a detail of more than 262,144 characters (a huge argument list) are
  recorded cut, with their length and SHA-256, and requests are split below 8 MiB; otherwise one
  such record, after an outage, would block the kernel for good.
- :mod:`.kernel`: an ``IPythonKernel`` whose execute path sends the cell's code (``query.execute``)
  and waits for the acknowledgement before running it; no acknowledgement, no execution
  (``AuditUnavailable``). Buffered records are delivered before each reply; if they cannot be, the
  next cell is refused until they are. A cell whose own record would be over 16 MiB (pasted data)
  is refused, saying so: read such data from a file.
- :mod:`.entrypoints`: ``data.open`` records for libraries that open files in C (pysam's
  ``VariantFile``/``AlignmentFile``/``TabixFile``/``FastaFile`` and their ``fetch`` regions, its
  FASTQ/BGZF readers, tabix functions and in-process samtools/bcftools commands; every Hail
  function that reads or lists files, and Spark's readers, when Hail or pyspark is imported), and
  :func:`~.entrypoints.record_data_access` for others.

IPython reads startup files and profile config from ``IPYTHONDIR``, which the member can write
(``/tmp/ipython``). The kernel points ``IPYTHONDIR`` at a fresh private directory it creates
(``mkdtemp``, empty) before IPython starts and drops ``PYTHONSTARTUP``, so no member-written file
runs unrecorded; the audit hook is installed even before that. ``-P`` and
``--InteractiveShellApp.ignore_cwd=True`` keep the working directory off ``sys.path`` (a
``/project/json.py`` cannot shadow what the kernel imports).

What Python can see of tampering is refused or recorded:

- An audit hook cannot be removed once added (PEP 578): no API exists to clear it.
- The hook, its buffer, the connection and the "blocked" state live in closures, not in module
  globals; the kernel's methods hold the auditor's functions in closures too. The C queue and its
  sender thread's state are C statics: no Python object reaches them (``_hook.put`` adds one whole
  record, encoded by the ``json.dumps`` captured at start, and records are the caller's own). The
  senders (C, and Python for the write-ahead record) check before and after each POST that their
  socket is still the one they connected (device and inode): a socket ``os.dup2``'d over it by a
  cell, answering as a fake service, fails the POST (a cell whose write-ahead record it was is
  refused) and the records go out again on a new connection.
- Before each execution, and once a second from the sender thread, the kernel checks that its
  ``do_execute``/``execute_request`` (class, instance, handler table, ``__code__``), the
  ``IPythonKernel`` methods it calls, the comm handlers and the auditor's functions and hook code
  are the objects built at start. A change is restored where possible, recorded as
  ``audit.tamper`` and from then on every cell is refused (restart the kernel).
  Assigning a function's ``__code__`` and re-importing ``ngp_research.kernel`` are also recorded
  (audit events), as is ``sys.addaudithook``.

What a determined user can still do, honestly: code that runs in the kernel shares its address
space. ``ctypes`` (or any C extension, or a compiled program started with ``subprocess``, whose
start is recorded but whose own opens are not) can make system calls that raise no audit event;
it can also rewrite closure cells (``cell.cell_contents``) or the interpreter's memory, stop the
sender thread, or forge extra records with ``sys.audit``. Pure Python is enough for some of
this: ``gc.get_objects()`` reaches the hook's Python state, and mutating its contents (not
replacing it, which the checks catch) can silence records without an ``audit.tamper`` record
(shown by a review, 2026-11-29; with the C queue the buffered file records themselves are out of
its reach). Other gaps a member's code can use without C: records
still buffered are lost if the kernel is killed hard (``os._exit``, SIGKILL, the memory limit)
before its next delivery (within ~5 ms during a cell, always before the reply); a socket
connection made by a signal handler while the kernel is delivering is not recorded; a cell's thread
that swaps a socket of its own in with ``os.dup2`` exactly between a sender's two identity checks,
and back, can acknowledge one POST itself (the service flags cells using ``dup2`` or
``socket(fileno=...)``). (A child made
with ``os.fork`` or ``multiprocessing``'s fork method has no sender thread: it delivers each record
before the access happens, so its ``os._exit`` loses nothing.) Those bypasses are themselves code in a cell, and every
cell's code is recorded *before* it runs, so the trail shows the cell that did it; the audit
service flags cells whose code reaches into the interpreter or the audit machinery (``gc``,
``ctypes``, closures, ``__code__``, ``/run/ngp``, ...) as "possible tampering", and the region report
shows that flag on every access the cell caused. The socket the kernel talks to sits in a folder
the member cannot write (``/run/ngp/audit``, read-only), so a member cannot put a fake service there.
Invariants 1 and 2 do not rest on the kernel at all: the bubblewrap sandbox mounts only the files
of the project's active tags, read-only, under a non-root uid without capabilities, so whatever a
user does inside the kernel reaches only data the project is entitled to see and cannot change it;
the audit kernel adds *who looked at what, when*, not the boundary.

Completion and inspection requests (which can evaluate attribute access on user objects) are
recorded as ``query.execute`` with their ``msg_type`` before they run, and refused like a cell
when that record is not acknowledged. Other known gaps: opens done by threads started from a cell are
attributed to the latest execution; ``isinstance`` against the original pysam classes works
both ways, but pysam objects created inside pysam's C code (not through the wrapped constructors)
record no ``data.open``. Two ways of naming a dataset's file by another path leave the open
recorded under that other path, outside the region's report: a link made by a started program
(``ln -s /data/syd/ds /project/l``; the ``ln`` itself is reported, as is any ``os.symlink``), and
``os.open(name, flags, dir_fd=fd)`` (Python's ``open`` event does not carry ``dir_fd``, so the
name is read as relative to the working folder; opening the dataset's folder for ``fd`` is
reported). The cell's code, recorded before it ran, shows either.

A Python child of the kernel keeps the hook: a forked one inherits it, and one that multiprocessing's
``spawn`` or ``forkserver`` method starts installs it before anything else (:mod:`.child`; its start
is recorded too). Both deliver each record before the access (slower for many small files, never
lost). A pool or forkserver's children are attributed to the cell that started the pool or server,
even when a later cell uses it. Any other Python program a cell starts (``!python analysis.py``,
``subprocess``, a shell script, a Dask worker started by hand, the Python workers Spark's JVM starts)
installs the hook itself before its own code runs (:mod:`.autostart`, through a ``.pth`` file of the
workspace environment, which the kernel's own interpreter and the workspace's server run too),
attributed to the execution that started it (``NGP_AUDIT_CELL``, which the kernel updates before each
execution; a program started by a process the kernel started earlier, such as a JVM, is attributed
to the execution current when that process started), and delivers each record before the access.
Programs that skip the environment's ``site`` module run without the hook, their start recorded like
a compiled program's: ``python -S``, an interpreter outside the workspace environment
(``/usr/bin/python3`` by its full path) or given another standard library (``PYTHONHOME``). A cell
can also start a program with an ``NGP_AUDIT_CELL`` of its choosing, so that the program's records
name another cell (the cell's code, recorded before it ran, shows it, flagged; a region's report
flags an access whose cell was never recorded).
Paths given to Hail and Spark are recorded as given (a glob under ``/data`` also as what it
matches; Spark's comma-separated lists split); a relative one is read against Python's working
folder, while the JVM reads it against the folder it started in.

Opens in C or in a JVM are recorded only where :mod:`.entrypoints` wraps the library. Ones it does not
see, found by experiment (2026-11-29): the files a samtools/bcftools list file names (``merge -b list.txt``; the list
file is recorded); the reference a CRAM's header names when none is given; a path inside Spark
SQL text; Pillow's ``ImageFont.truetype`` and colour
profiles; ``dbm.ndbm.open`` called directly.
"""
