"""The kernel's side of the audit: a PEP 578 audit hook, a bounded buffer and its delivery to the service.

:func:`install` is called once, first thing in the kernel process (before IPython or ipykernel are
imported). It adds an audit hook (``sys.addaudithook``: it cannot be removed for the life of the
process) and starts a sender thread. Everything they share (the buffer, the connection, the
"blocked" state, the current execution) lives in closures made here; no module global holds it.
What the kernel gets back is an :class:`Auditor`, a tuple of those closures.

Records are dicts ``{"action", "path", "detail"}`` posted as ``{"records": [...]}`` to
``{url}records`` with ``Authorization: token <T>``; the service answers 200
``{"acknowledged": n, ...}`` once they are durable. Anything else is "not acknowledged".
Records leave the buffer only when acknowledged: nothing is dropped. When the buffer is full and
cannot be delivered, the audited operation itself is refused (the hook raises
:class:`AuditUnavailable`, a ``PermissionError``) and the kernel runs no further code until the
buffer is delivered.

Two senders, the same records. With the C extension and a plain-HTTP service URL (the sandbox's
socket bridge), the buffer is the C queue of ``_hook``: the C hook encodes each plain open into it,
the Python side adds the other records encoded, and a C thread delivers it over its own connection
without ever taking the GIL, so a cell's opens never wait for the sender (``_hook.start_sender``).
Otherwise (no C extension, HTTPS, ``sender_c=False``), and always in a forked child and after
:func:`close`, the list ``buffer`` below is delivered by the Python sender thread. The write-ahead
record of a cell is sent by the calling thread on the Python connection, after the queue is drained.
"""

import hashlib
import http.client
import json
import operator
import os
import pathlib
import posixpath
import re
from fnmatch import fnmatchcase
import socket
import sys
import threading
import time
import urllib.parse
from itertools import groupby
from typing import Callable, NamedTuple

try:  # the hot path in C, built with the package (setup.py); the Python hook does the same, slower
    from . import _hook
except ImportError:  # pragma: no cover - a build without a C compiler
    _hook = None

__all__ = ["AuditUnavailable", "Auditor", "install", "UNREACHABLE"]

#: pathlib's own classes: their ``__fspath__`` is theirs, not a user's.
_PURE_PATHS = (pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.Path, pathlib.PosixPath,
               pathlib.WindowsPath)

UNREACHABLE = "the audit service cannot be reached; no code was run"
#: The start of the reason a cell too large to record is refused with (the kernel shows it as it is).
TOO_LARGE = "this cell is too large to record"

#: The most bytes the audit service takes in one request (its ``MAX_BODY``).
MAX_REQUEST_BYTES = 16 * 1024 * 1024
#: A batch of buffered records is split below this, so that no request nears the service's limit.
MAX_POST_BYTES = MAX_REQUEST_BYTES // 2
#: Linux opens no longer path (ENAMETOOLONG): a recorded path is kept whole up to this many characters.
PATH_MAX = 4096
#: Characters of text a library's data open may hold to take the fast path (more go through ``bounded``).
DATA_DETAIL_FAST = 16384
#: Characters of text one record's detail keeps (a long argument list): even escaped, a few MiB at most.
DETAIL_TEXT_MAX = 1 << 18


#: Characters of an execution's msg_id or cell_id kept whole (Jupyter's are about 40).
ID_MAX = 256


def short_id(value):
    """An execution id as records carry it: None, or text of at most :data:`ID_MAX` characters (a longer
    one is cut, see :func:`_cut`). The kernel applies it to the ids of its write-ahead records and of
    the accesses they cause alike, so that the two still match.

    >>> short_id(None), short_id("m1"), short_id(3), len(short_id("x" * 10_000)) <= ID_MAX
    (None, 'm1', '3', True)
    """
    if value is None:
        return None
    text = _text(value)
    return text if len(text) <= ID_MAX else _cut(text, 128)


def _cut(text: str, keep: int) -> str:
    """``text`` cut to ``keep`` characters, followed by its length and SHA-256, so that the whole text
    can still be matched against a copy of it.

    >>> _cut("/data/syd/ds/" + "x" * 5000, 16)[:46]
    '/data/syd/ds/xxx…[cut: 5013 characters, sha256'
    """
    try:  # a file name's own bytes (as os.fsencode gives them back)
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(raw).hexdigest()
    return f"{text[:keep]}…[cut: {len(text)} characters, sha256 {digest}]"


def _text_size(value, depth: int = 0) -> int:
    """About how many characters of text ``value`` (a record's plain detail) holds.

    >>> _text_size({"argv": ["cat", "/data/a"], "n": 3})
    19
    """
    cls = value.__class__
    if cls is str:
        return len(value)
    if cls is int:  # its decimal digits: a huge int is as long as a huge string
        return value.bit_length() // 3 + 2
    if depth < 8 and cls in (list, tuple):
        return sum(_text_size(v, depth + 1) for v in value) + len(value)
    if depth < 8 and cls is dict:
        return sum(len(k) + _text_size(v, depth + 1) for k, v in value.items() if k.__class__ is str)
    return 8


def _small_detail(detail: dict) -> bool:
    """Whether a library's data open may take the fast path: exact str keys; str, float, bool, None or
    64-bit int values; :data:`DATA_DETAIL_FAST` characters at most (else ``bounded`` sees it).

    >>> _small_detail({"contig": "chr1", "start": 1}), _small_detail({"start": 10 ** 30}), _small_detail({1: "x"})
    (True, False, False)
    """
    n = 0
    for k, v in detail.items():
        if k.__class__ is not str:
            return False
        cls = v.__class__
        if cls is str:
            n += len(v)
        elif cls is int:
            if not -(1 << 63) <= v < (1 << 63):
                return False
        elif not (cls is float or cls is bool or v is None):
            return False
        n += len(k) + 24
    return n <= DATA_DETAIL_FAST


def bounded(path, detail: dict) -> tuple:
    """``(path, detail)`` of a record, each small enough to deliver: a path longer than :data:`PATH_MAX`
    (Linux opens no such absolute path; a short relative one out of a deeper working folder is
    recorded where it leads, see ``_path`` in :func:`install`) and a detail of more than
    :data:`DETAIL_TEXT_MAX` characters are cut (see :func:`_cut`); the record says so. A record too large for the service would otherwise stay
    undelivered, and the kernel would run no more code.

    >>> path, detail = bounded("/data/syd/ds/" + "a" * 9000, {"event": "open", "mode": "r"})
    >>> len(path) < 4300, detail["cut"]
    (True, 'the path was 9013 characters')
    >>> path, detail = bounded(None, {"event": "subprocess.Popen", "argv": ["cat"] + ["/data/syd/ds/x"] * 200000})
    >>> detail["event"], detail["cut"][:40], len(detail["detail_head"]) < 270_000
    ('subprocess.Popen', "the record's detail was 3600046 characte", True)
    >>> bounded("/data/syd/ds/x", {"event": "open"})
    ('/data/syd/ds/x', {'event': 'open'})
    """
    cut = []
    if path.__class__ is str and len(path) > PATH_MAX:
        cut.append(f"the path was {len(path)} characters")
        path = _cut(path, PATH_MAX)
    if _text_size(detail) > DETAIL_TEXT_MAX:
        text = json.dumps(detail, default=_text)
        cut.append(f"the record's detail was {len(text)} characters of JSON; its start is kept")
        event = detail.get("event")
        event = _cut(event, 128) if event.__class__ is str and len(event) > ID_MAX else event
        detail = {"event": event, "detail_head": _cut(text, DETAIL_TEXT_MAX)}
    if cut:
        detail = {**detail, "cut": "; ".join(cut)}
    return path, detail

#: Audit events recorded (and the record action each maps to); every other event returns at once.
EVENT_ACTIONS = {
    "open": "file.open",
    "os.listdir": "file.list",
    "os.scandir": "file.list",
    "shutil.copyfile": "file.open",
    "sqlite3.connect": "file.open",  # SQLite opens the database in C: no "open" event of its own
    "ngp.sqlite3.open": "file.open",  # raised by _hook.watch_sqlite: a database a statement opens (ATTACH)
    "os.symlink": "file.link",  # a link into /data would make later opens through it look outside every region
    "os.link": "file.link",
    "shutil.copytree": "file.list",
    "shutil.make_archive": "file.list",
    "shutil.unpack_archive": "file.open",
    "subprocess.Popen": "process.exec",
    "os.system": "process.exec",
    "os.exec": "process.exec",
    "os.posix_spawn": "process.exec",
    "ngp.process.start": "process.exec",  # raised by entrypoints.wrap_multiprocessing: (path, argv, env)
    "os.spawn": "process.exec",
    "pty.spawn": "process.exec",
    "os.fork": "process.exec",
    "ctypes.dlopen": "library.load",
    "socket.connect": "socket.connect",
    "ngp.data.open": "data.open",  # raised by ngp_research.kernel.entrypoints.record_data_access
    "ngp.review.mark": "review.mark",  # raised by ngp_research.widgets.VariantReview (a review marked)
    "sys.addaudithook": "audit.tamper",
    "cpython.PyInterpreterState_New": "process.exec",  # refused: a subinterpreter has no audit hook
    "import": "audit.tamper",  # only for (re)imports of ngp_research.kernel after start
}

#: Paths always recorded, whatever the ignore list says.
ALWAYS = ("/data", "/project", "/home")


_PROC_ROOT = re.compile(r"/proc/(?:self|thread-self|[0-9]+)(?:/task/[0-9]+)?/root(?=/|$)")


def opened(path: str) -> str:
    """The path Linux opens for the absolute ``path``, read from its text alone: cut at a NUL (where C
    stops), each process root that ``/`` reaches skipped (``/proc/self/root/x`` is ``/x``; by position, so a
    chain of them costs one pass), then normalised, ``//`` read as ``/``. The audit service reads every
    path it is sent this way (``ngp_research.audit.service.resolve``).

    >>> opened("/proc/self/root/../data/syd/ds/x"), opened("/data/syd/ds/../../norr/e/y\\x00/../z")
    ('/data/syd/ds/x', '/data/norr/e/y')
    >>> opened("//data/r/d"), opened("/project/q/../../proc/42/task/7/root/data/r/d/f")
    ('/data/r/d', '/data/r/d/f')
    """
    path = path.split("\x00", 1)[0]
    pos = 0
    if "/proc/" in path:
        while (m := _PROC_ROOT.search(path, pos)) is not None and \
                not posixpath.normpath("/" + path[pos:m.start()]).strip("/"):
            pos = m.end()
    path = posixpath.normpath(path[pos:] or "/")
    return path[1:] if path.startswith("//") else path


#: Actions that read a file's or folder's content: refused when their path cannot be recorded.
FILE_ACCESSES = frozenset(("file.open", "data.open", "file.list", "file.link"))
_PLAIN_MODES = (str, type(None))  # an open's mode as the fast paths take it (a forged event may pass anything)


def _socket_family(sock) -> int:
    """The address family of a socket, read from the C type (a subclass's ``family`` property is not run)."""
    import _socket  # noqa: PLC0415

    return _socket.socket.family.__get__(sock)


_FS_ENCODING = sys.getfilesystemencoding()


def _decoded(raw) -> str:
    """The text of a file name given as bytes or bytearray (a subclass too), read from its buffer as Linux
    gets it: no user code runs (a subclass's ``__bytes__`` or ``__getitem__`` could say another name).

    >>> class Sneaky(bytes):
    ...     def __bytes__(self):
    ...         return b"/tmp/innocent"
    >>> _decoded(Sneaky(b"/data/r/d/f")), _decoded(bytearray(b"/x\\xff"))
    ('/data/r/d/f', '/x\\udcff')
    """
    return (bytes.decode if isinstance(raw, bytes) else bytearray.decode)(raw, _FS_ENCODING, "surrogateescape")


def _text(value) -> str:
    """A str for ``value`` that runs no user code: exact str/bytes/pathlib paths as text, else the type and id.

    >>> _text("a"), _text(b"/x"), _text(3)
    ('a', '/x', '3')
    >>> class Sneaky(str):
    ...     def __str__(self):
    ...         raise AssertionError("user code ran")
    >>> _text(Sneaky("/data/r/d/f"))
    '/data/r/d/f'
    """
    cls = value.__class__
    if cls is str:
        return value
    if isinstance(value, str):
        return str.__str__(value)  # the characters, not what a subclass says
    if isinstance(value, (bytes, bytearray)):
        return _decoded(value)
    if cls in (int, float, bool) or value is None:
        return repr(value)
    if cls in _PURE_PATHS:
        return str(value)
    return object.__repr__(value)


def _plain(value, depth=0):
    """``value`` as JSON-able primitives, without running user code (see :func:`_text`).

    >>> _plain({"a": [1, None, 2.5], "b": object.__new__(type("U", (), {}))})["a"]
    [1, None, 2.5]
    """
    cls = value.__class__
    if cls in (str, int, float, bool) or value is None:
        return value
    if depth < 4 and cls in (list, tuple):
        return [_plain(v, depth + 1) for v in value]
    if depth < 4 and cls is dict:
        return {_text(k): _plain(v, depth + 1) for k, v in value.items()}
    return _text(value)


class AuditUnavailable(PermissionError):
    """Raised where an access cannot be recorded: the access does not happen."""


class Auditor(NamedTuple):
    write_ahead: Callable  # (record, timeout) -> None | reason: sends one record, waits for its ack
    flush: Callable  # (timeout) -> None | reason: delivers the whole buffer
    begin: Callable  # (msg_id, cell_id) -> the previous (msg_id, cell_id): records from now on are this execution's
    blocked: Callable  # () -> None | reason the kernel must not run code
    tamper: Callable  # (what, **detail) -> None: records audit.tamper and blocks the kernel for good
    record: Callable  # (action, path, detail) -> None: buffers one record (attributed)
    stats: Callable  # () -> dict
    watch: Callable  # (check) -> None: a () -> None | str integrity check the sender runs each round
    close: Callable  # (timeout) -> None | reason: flush, then deliver every later record before it happens
    reopen: Callable  # () -> bool: after close(), batches again where the sender runs (a spawned Dask worker)


_EMPTY = object()


def closure_guard(functions):
    """A check that the closure cells and code of ``functions`` still hold what they hold now.

    Returns ``check(restore=False) -> None | str``; with ``restore`` it puts the originals back.

    >>> def outer():
    ...     x = 1
    ...     def inner():
    ...         return x
    ...     return inner
    >>> f = outer(); check = closure_guard([f]); check() is None
    True
    >>> f.__closure__[0].cell_contents = 2; check(restore=True)
    'inner: closure cell x was replaced'
    >>> f(), check()
    (1, None)
    """
    def cells(fn):
        out = []
        for c in fn.__closure__ or ():
            try:
                out.append(c.cell_contents)
            except ValueError:
                out.append(_EMPTY)
        return out

    snapshot = [(fn, fn.__code__, fn.__closure__, cells(fn)) for fn in functions]

    def check(restore=False):
        problems = []
        for fn, code, closure, contents in snapshot:
            if fn.__code__ is not code:
                problems.append(f"{fn.__name__}.__code__ was replaced")
                if restore:
                    fn.__code__ = code
            for name, cell, value in zip(code.co_freevars, closure or (), contents):
                try:
                    now = cell.cell_contents
                except ValueError:
                    now = _EMPTY
                if now is not value:
                    problems.append(f"{fn.__name__}: closure cell {name} was replaced")
                    if restore and value is not _EMPTY:
                        cell.cell_contents = value
        return "; ".join(problems) or None

    snapshot.append((check, check.__code__, check.__closure__, cells(check)))
    return check


#: Where a shell command splits into words (and ``=``, ``:``, ``,`` inside an option's value).
SHELL_BREAKS = re.compile(r"[\s'\"=;|&<>(),:`]+")
_GLOB = re.compile(r"[*?\[\]{}$]")
#: Datasets a started program names that the workspace does not mount, recorded at most (see named_data_paths).
UNMOUNTED_NAMED = 16


def workspace_datasets(root: str = "/data") -> dict:
    """``{region: frozenset(dataset names)}`` as mounted under ``root`` (empty outside a workspace).

    Read once, when the kernel starts: a workspace's mounts do not change while it runs.
    """
    out = {}
    try:
        regions = os.listdir(root)
    except OSError:
        return out
    for region in regions:
        try:
            out[region] = frozenset(os.listdir(os.path.join(root, region)))
        except OSError:
            pass
    return out


def named_data_paths(words, cwd, datasets, limit=256, tools=None) -> list:
    """The datasets a started program was given: ``[(path, "argument" | "folder")]``, each dataset once.

    The program's own opens are not seen (it is not Python), so this says what it was started on:
    each of ``words`` (its arguments, environment values, shell command), a word with white space
    split as a shell would split a command line, that is a path into ``/data`` (``-i/data/...`` and ``--in=/data/...`` too; relative words read from
    ``cwd``), and ``cwd`` itself when it is inside a dataset. ``/data``, a region's folder, or a
    glob stand for every dataset of ``datasets`` (``{region: names}``, what the workspace mounts)
    they match. When ``datasets`` is not empty, names it lacks (an attempt on data the workspace
    does not show) are kept only up to ``UNMOUNTED_NAMED``, so they cannot crowd out the mounted
    ones, which are kept up to ``limit``. ``tools`` is ``(split, normpath, fnmatchcase, glob_search)``;
    the kernel passes the ones it holds, so nothing here is looked up in the module when it runs.

    >>> ds = {"syd": frozenset({"ds", "other"}), "norr": frozenset({"nd"})}
    >>> def named(words, cwd="/project"):
    ...     return named_data_paths(words, cwd, ds)
    >>> named(["cat", "/data/syd/ds/a.json", "--out=/project/x", "-i/data/norr/nd/v.vcf"])
    [('/data/syd/ds/a.json', 'argument'), ('/data/norr/nd/v.vcf', 'argument')]
    >>> named(["sh", "-c", "cd /data/syd && zcat ds/f.gz | head"])
    [('/data/syd/ds', 'argument'), ('/data/syd/other', 'argument')]
    >>> named(["cat", "f"], cwd="/data/norr/nd"), named(["cat", "made-up/f", "ds/f"], cwd="/data/syd")
    ([('/data/norr/nd', 'folder')], [('/data/syd/ds/f', 'argument')])
    >>> named(["cat", "/data/*/nd/x"]), named(["ls", "/project/../data/syd/o*"])
    ([('/data/norr/nd', 'argument')], [('/data/syd/other', 'argument')])
    >>> got = named(["true"] + [f"/data/zz/z{i}" for i in range(300)] + ["/data/syd/ds/f"])
    >>> len(got), got[0], got[-1]  # made-up names: a few kept, and they do not crowd out the real one
    (17, ('/data/zz/z0', 'argument'), ('/data/syd/ds/f', 'argument'))
    """
    split, normpath, match, is_glob = tools or (SHELL_BREAKS.split, posixpath.normpath, fnmatchcase, _GLOB.search)
    found = {}
    unmounted = [0]

    def put(region, dataset, path, how, guess):
        if (region, dataset) in found:
            return
        if datasets and dataset not in datasets.get(region, ()):  # an attempt on data the workspace lacks:
            if guess or unmounted[0] >= UNMOUNTED_NAMED:  # kept, but only a few, so they cannot crowd out the rest
                return
            unmounted[0] += 1
        elif len(found) >= limit:
            return
        found[(region, dataset)] = (path, how)

    def add(path, how="argument", guess=False):
        if "/." in path or "//" in path or path.endswith("/"):
            path = normpath(path)
            if path[:2] == "//":
                path = path[1:]
        if path != "/data" and not path.startswith("/data/"):
            return
        parts = path.split("/", 4)
        region = parts[2] if len(parts) > 2 else ""
        dataset = parts[3] if len(parts) > 3 else ""
        if region and dataset and not is_glob(region) and not is_glob(dataset):
            put(region, dataset, path, how, guess)
            return
        if how == "folder":
            return  # working in /data or a region's folder: its relative words say which datasets
        for r in sorted(datasets):  # /data, a region's folder, or a glob: each mounted dataset it matches
            if not region or match(r, region):
                for name in sorted(datasets[r]):
                    if not dataset or match(name, dataset):
                        put(r, name, f"/data/{r}/{name}", how, guess)

    absolute = isinstance(cwd, str) and cwd.startswith("/")
    in_data = False
    if absolute:
        cwd = normpath(cwd)
        in_data = cwd == "/data" or cwd.startswith("/data/")
        if in_data:
            add(cwd, "folder")

    def word(w):
        if not w:
            return
        if " " in w or "\t" in w or "\n" in w:  # sh -c "...": a command line, word by word
            for part in split(w):
                word(part)
            return
        if "=" in w:
            w = w[w.index("=") + 1:]  # --in=/data/..., KEY=value
        elif w[0] == "-":
            w = w[w.find("/"):] if "/" in w else ""  # -i/data/...: a value glued to its option
        if not w:
            return
        if w[0] == "/":
            if "data" in w:
                add(w)
        elif absolute and (in_data or "data" in w):
            add(cwd + "/" + w, guess=in_data)  # any word, read from a folder in /data: only what is there

    for w in words:
        word(w)
    return list(found.values())


def _default_ignored() -> tuple:
    """Prefixes of the kernel's own opens (its environment, the stdlib): not recorded.

    Only places a member cannot write to (read-only in the sandbox): a writable folder could hold
    a symlink into ``/data``, and ``/proc/self/root``, ``/proc/self/cwd`` and ``/proc/self/fd`` lead
    anywhere, so ``/proc/self``, ``/dev/shm`` and the kernel's runtime folders are recorded.
    """
    prefixes = {sys.prefix, sys.exec_prefix, sys.base_prefix + "/lib", sys.base_exec_prefix + "/lib",
                "/usr/lib", "/usr/local/lib", "/usr/share", "/sys",
                "/dev/null", "/dev/urandom", "/dev/random", "/dev/pts", "/dev/tty"}
    out = []
    for p in prefixes:
        p = os.path.normpath(p)
        if p == "/" or any(p == a or p.startswith(a + "/") for a in ALWAYS):
            continue  # never let a setting hide /data, /project or /home
        out.append(p)
    return tuple(sorted(out))


def _materialize(item):
    """The record dict of a ``("d", path, detail, ids, None)`` buffer item (a library's data open)."""
    _, path, detail, ids, _ = item
    detail["msg_id"], detail["cell_id"] = ids
    return {"action": "data.open", "path": path, "detail": detail}


_run_key, _second = operator.itemgetter(0, 2, 3, 4), operator.itemgetter(1)


def encode_items(items) -> list:
    """The records to POST for buffered ``items``, in order (``_hook.encode`` builds the same, in C).

    Buffer items are 5-tuples: ``("o", path, mode, flags, ids)`` for a plain open (the hot path, C
    or Python), ``("d", path, detail, ids, None)`` for a library's data open, and
    ``("r", record, None, None, None)`` for any other record. A run of plain opens with the same
    mode, flags and cell becomes one record with ``paths`` (the service stores one access per path).

    >>> ids = ("m1", None)
    >>> encode_items([("o", "/a", "r", 0, ids), ("o", "/b", "r", 0, ids), ("d", "/c", {"n": 1}, ids, None)])[0]
    {'action': 'file.open', 'detail': {'event': 'open', 'mode': 'r', 'flags': 0, 'msg_id': 'm1', 'cell_id': None}, 'paths': ['/a', '/b']}
    """
    out = []
    for key, group in groupby(items, _run_key):
        tag = key[0]
        if tag == "o":
            paths = list(map(_second, group))
            _, mode, flags, ids = key
            rec = {"action": "file.open", "detail": {
                "event": "open", "mode": mode, "flags": flags, "msg_id": ids[0], "cell_id": ids[1]}}
            if len(paths) == 1:
                rec["path"] = paths[0]
            else:
                rec["paths"] = paths
            out.append(rec)
        elif tag == "d":
            out.extend(map(_materialize, group))
        else:
            out.extend(map(_second, group))
    return out


def _socket_identity(sock):
    """(st_dev, st_ino) of a socket's file descriptor, or None when it has none."""
    try:
        st = os.fstat(sock.fileno())
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _service_address(parsed, socket_path=None) -> tuple[str, str]:
    """(numeric host, port) of the service URL for the C sender: an IPv4 address where there is one;
    ``(socket_path, "")`` when the service is reached on its unix socket."""
    if socket_path:
        return socket_path, ""
    port = parsed.port or 80
    found = socket.getaddrinfo(parsed.hostname, port, type=socket.SOCK_STREAM)
    found.sort(key=lambda a: a[0] != socket.AF_INET)
    return found[0][4][0], str(found[0][4][1])


def install(url: str | None, token: str | None, *, capacity: int = 10_000, batch: int = 500,
            linger: float = 0.005, timeout: float = 5.0, ignored: tuple | None = None,
            add_hook: bool = True, max_post: int = 2000, sender_c: bool = True,
            datasets: dict | None = None, socket_path: str | None = None) -> Auditor:
    """Add the audit hook and start the sender thread; returns the :class:`Auditor` (call once).

    ``socket_path`` (``NGP_AUDIT_SOCKET``; in a workspace ``/run/ngp/audit/audit.sock``, bound
    read-only from outside) is the service's own unix socket: records then go there, not to the
    URL's host and port, whose path and ``Host`` the requests keep. A socket path the service does
    not answer on refuses execution like an unreachable URL; nothing falls back to the URL.

    ``datasets`` (``{region: dataset names}``) is what the workspace mounts under ``/data``, read
    when this is called unless given; a started program is recorded under the datasets it names
    (see :func:`named_data_paths`).

    The hook is the C one from ``_hook`` when the package was built with it (``setup.py``): plain
    opens of absolute paths are buffered without entering Python, and every other recorded event is
    handed to the Python ``hook`` below, which is the whole hook when ``_hook`` is missing.

    ``batch`` buffered records wake the sender early; one POST carries at most ``max_post`` records
    (fewer, larger POSTs: the service commits each one durably).

    With the C hook and a plain-HTTP service URL, records go to the C queue of ``_hook`` and a C
    thread delivers them without taking the GIL (``_hook.start_sender``): a cell that opens many
    files then never waits for the sender. Otherwise (``sender_c=False``, HTTPS, no C extension),
    and always in a forked child and after :func:`close`, the Python sender delivers from ``buffer``.

    The hot paths (``open`` of a plain absolute path, ``ngp.data.open``) append a tuple to the
    buffer; what the service gets is built from the tuples in :func:`_encode`, when they are sent.
    """
    if socket_path is not None and not os.path.isabs(socket_path):  # never relative to a folder a cell chooses
        raise ValueError(f"the audit service's socket must be an absolute path, not {socket_path!r}")
    max_post = max(1, min(max_post, 5000))  # the service takes at most 5000 records per request
    ignored = _default_ignored() if ignored is None else tuple(ignored)
    ignored_slash = tuple(p + "/" for p in ignored)
    ignored_set = frozenset(ignored)
    always_slash = tuple(a + "/" for a in ALWAYS)
    parsed = urllib.parse.urlsplit(url or "")
    base_path = (parsed.path or "/").rstrip("/") + "/"
    headers = {"Content-Type": "application/json", "Authorization": f"token {token or ''}"}
    buffer = []  # appended by the hook (C or Python), consumed from the front by the sender
    lock = threading.Lock()  # guards buffer and state
    send_lock = threading.Lock()  # one POST at a time, in order; records leave the buffer only when acked
    wake = threading.Event()
    busy = set()  # idents of threads now talking to the service: their socket.connect is ours (not recorded)
    actions_get = EVENT_ACTIONS.get
    events = frozenset(EVENT_ACTIONS)
    buffer_append = buffer.append
    home_pid = os.getpid()  # the process whose buffer this is (a forked child takes over in _in_child)
    getpid = os.getpid
    current = [(None, None)]  # (msg_id, cell_id) of the execution records are attributed to
    state = {"armed": False, "blocked": None, "tampered": None, "posts": 0, "records": 0,
             "failures": 0, "errors": 0, "closed": False}
    checks = []
    conn_box = [None]
    socket_ids = {}  # id(bare socket) -> its (st_dev, st_ino) when connected
    decoded, normpath, getcwd, realpath = _decoded, os.path.normpath, os.getcwd, os.path.realpath
    linux_opened, _short_id = opened, short_id
    _bounded = bounded  # held in a closure cell (checked by the guard), not looked up where a cell could swap it
    monotonic, _get_ident = time.monotonic, threading.get_ident
    urlsplit, unquote = urllib.parse.urlsplit, urllib.parse.unquote  # held: a cell's patch changes nothing
    dumps, loads = json.dumps, json.loads
    encode = encode_items  # held here: a cell that rebinds the module's name changes nothing
    named_in = named_data_paths
    environ = os.environ
    tools = (SHELL_BREAKS.split, posixpath.normpath, fnmatchcase, _GLOB.search)
    datasets = workspace_datasets() if datasets is None else dict(datasets)  # before the hook: no records
    c_queue = bool(_hook is not None and add_hook and sender_c and (parsed.scheme == "http" or socket_path)
                   and parsed.hostname
                   and token)  # records go to the C queue (see _hook.start_sender); decided once
    c_put = _hook.put if c_queue else None
    c_wait = _hook.wait if c_queue else None
    c_status = _hook.sender_status if c_queue else None
    encode_string = json.encoder.encode_basestring_ascii
    c_encode = _hook.encode if _hook is not None else None
    sqlite_watch = getattr(_hook, "watch_sqlite", None) if add_hook else None
    sqlite_expect = getattr(_hook, "sqlite_expect", None)

    # -- delivery ---------------------------------------------------------------------------------

    host_header = f"Host: {parsed.hostname}{':' + str(parsed.port) if parsed.port else ''}\r\n"
    request_head = (f"POST {base_path}records HTTP/1.1\r\n{host_header}Content-Type: application/json\r\n"
                    f"Authorization: token {token or ''}\r\nContent-Length: ").encode("latin-1")

    def _connection(t):
        conn = conn_box[0]
        if conn is None:
            if socket_path:  # the service's own unix socket, plain HTTP: a bare socket (see _exchange)
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    conn.settimeout(t)
                    conn.connect(socket_path)
                except BaseException:
                    conn.close()
                    raise
                socket_ids[id(conn)] = _socket_identity(conn)
            elif parsed.scheme == "https":
                conn = http.client.HTTPSConnection(parsed.hostname, parsed.port, timeout=t)
            else:  # plain HTTP on the sandbox's socket bridge: a bare socket (see _exchange)
                conn = socket.create_connection((parsed.hostname, parsed.port or 80), timeout=t)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                socket_ids[id(conn)] = _socket_identity(conn)
            conn_box[0] = conn
        if isinstance(conn, http.client.HTTPConnection):
            conn.timeout = t
            if conn.sock is not None:
                conn.sock.settimeout(t)
        else:
            conn.settimeout(t)
        return conn

    def _exchange(conn, body):
        """(status, reason, answer) of one POST of ``body``; raises OSError/HTTPException when it fails.

        A bare socket must still be the one connected (device and inode) before the request and after
        the answer: a cell that ``os.dup2``'d a socket of its own over it could acknowledge records,
        the write-ahead record of the next cell among them, itself.
        """
        if not isinstance(conn, http.client.HTTPConnection) and socket_ids.get(id(conn)) != _socket_identity(conn):
            raise ConnectionAbortedError("the audit connection's socket was replaced or closed (tampering?)")
        if isinstance(conn, http.client.HTTPConnection):
            conn.request("POST", base_path + "records", body, headers)
            resp = conn.getresponse()
            return resp.status, resp.reason, resp.read()
        # One send and (usually) one receive: http.client's header parsing costs more than the
        # service's commit on the write-ahead path of every cell.
        conn.sendall(request_head + str(len(body)).encode() + b"\r\n\r\n" + body)
        data = b""
        while (end := data.find(b"\r\n\r\n")) < 0:
            chunk = conn.recv(65536)
            if not chunk:
                raise http.client.RemoteDisconnected("the audit service closed the connection")
            data += chunk
        lines = data[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise http.client.BadStatusLine(lines[0])
        length, close = None, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
            elif name == "transfer-encoding":
                raise http.client.HTTPException("the audit service's answer is not sized")
        if length is None:
            raise http.client.HTTPException("the audit service's answer has no Content-Length")
        answer = data[end + 4:]
        while len(answer) < length:
            chunk = conn.recv(65536)
            if not chunk:
                raise http.client.IncompleteRead(answer, length - len(answer))
            answer += chunk
        if socket_ids.get(id(conn)) != _socket_identity(conn):
            raise ConnectionAbortedError("the audit connection's socket was replaced during the request (tampering?)")
        if close:
            socket_ids.pop(id(conn), None)
            conn.close()  # socket.close sets _closed: _post does not keep it
        return int(parts[1]), parts[2] if len(parts) > 2 else "", answer[:length]

    def _body(records):
        try:
            return dumps({"records": records}).encode()
        except (TypeError, ValueError):  # never expected (values are made plain when recorded); never fatal
            return dumps({"records": [_encodable(r) for r in records]}).encode()

    def _post(records, t, count=None, body=None):
        """POST one batch (``count`` records once expanded, or ``body`` already encoded); None when
        acknowledged, else the reason. The caller holds send_lock."""
        count = len(records) if count is None else count
        if not url or not parsed.hostname:
            return "NGP_AUDIT_URL is not set"
        if not token:
            return "JUPYTERHUB_API_TOKEN is not set"
        if body is None:
            body = _body(records)
        me = _get_ident()
        was_busy = me in busy
        busy.add(me)  # the connection to the service is not recorded (opens still are)
        try:
            for attempt in (0, 1):  # a kept-alive connection the server closed is retried once
                conn = None
                try:
                    conn = _connection(t)
                    conn_box[0] = None  # out while in use: an interrupted exchange never leaves it half-read
                    status, reason, text = _exchange(conn, body)
                    if not getattr(conn, "_closed", False):
                        conn_box[0] = conn
                except BaseException as e:
                    if isinstance(conn, socket.socket) and socket_ids.pop(id(conn), None) != _socket_identity(conn):
                        conn.detach()  # its number is someone else's now: forget it, do not close theirs
                    elif conn is not None:
                        conn.close()
                    conn_box[0] = None
                    if not isinstance(e, (OSError, http.client.HTTPException, ValueError)):
                        raise  # KeyboardInterrupt and the like: the connection is gone, the records stay
                    if attempt == 0 and isinstance(e, (http.client.RemoteDisconnected, BrokenPipeError,
                                                       ConnectionResetError)):
                        continue
                    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if status != 200:
                    return f"HTTP {status} {reason}"
                try:
                    ack = loads(text)
                    if int(ack.get("acknowledged", -1)) != count:
                        return f"the service acknowledged {ack.get('acknowledged')} of {count} records"
                except (ValueError, AttributeError, TypeError):
                    return "the service's answer is not an acknowledgement"
                state["posts"] += 1
                state["records"] += count
                return None
            return "connection closed"
        finally:
            if not was_busy:
                busy.discard(me)

    def _deliver(deadline, limit=None):
        """Deliver the records buffered now (not those added meanwhile), in batches, by ``deadline``."""
        if getpid() != home_pid:
            return "a forked process does not deliver the kernel's records"
        if not send_lock.acquire(timeout=max(0.0, deadline - monotonic())):
            return "the audit sender is busy"
        try:
            target, done, n = len(buffer), 0, 0
            while done < target:
                if monotonic() > deadline:
                    return "the audit service did not take the records in time"
                items = buffer[:min(max_post, target - done)]  # one slice: atomic against the hook's appends
                if not items:
                    return None
                body = _encode_body(items)
                while len(body) > MAX_POST_BYTES and len(items) > 1:  # long records: fewer in this request
                    items = items[:len(items) // 2]
                    body = _encode_body(items)
                reason = _post(None, max(0.1, deadline - monotonic()), len(items), body)
                if reason is not None:
                    with lock:
                        state["failures"] += 1
                    return reason
                with lock:
                    del buffer[:len(items)]
                    if not buffer and state["blocked"] and not state["tampered"]:
                        state["blocked"] = None
                done += len(items)
                n += 1
                if limit is not None and n >= limit:
                    return None
            return None
        finally:
            send_lock.release()

    def write_ahead(record, t=timeout):
        if getpid() != home_pid:
            return "a forked process does not send the kernel's records"
        deadline = monotonic() + t
        reason = blocked()
        if reason is None:
            if _pending():  # records of earlier work first, so the order stays true
                reason = _drain(deadline)
        elif not state["tampered"]:
            retry = _drain(deadline)  # blocked on undelivered records: try them again now
            if retry is None:
                reason = blocked()
            else:
                with lock:
                    if not state["tampered"]:
                        state["blocked"] = f"{_pending()} audit records could not be delivered ({retry})"
                reason = blocked()
        if reason is not None:
            return reason
        body = _body([record])
        if len(body) > MAX_REQUEST_BYTES - 4096:  # the service would refuse it; no retry could help
            return (f"{TOO_LARGE}: its audit record is {len(body) / 2**20:.1f} MiB, and the audit service takes "
                    f"at most {MAX_REQUEST_BYTES // 2**20} MiB; no code was run. Read large inputs from a file "
                    "rather than writing them into the cell.")
        if not send_lock.acquire(timeout=max(0.0, deadline - monotonic())):
            return "the audit sender is busy"
        try:
            return _post([record], max(0.1, deadline - monotonic()), body=body)
        finally:
            send_lock.release()

    def _pending():
        return len(buffer) + (c_status()["pending"] if c_queue else 0)

    def _drain(deadline):
        """Deliver everything recorded so far, by ``deadline``: the C queue (its thread sends, this
        thread waits without the GIL) and the Python buffer. None when done, else the reason."""
        if c_queue and not state["closed"] and getpid() == home_pid:
            reason = c_wait(max(0.0, deadline - monotonic()))
            if reason is None and buffer:
                reason = _deliver(deadline)
            if reason is None:
                with lock:
                    if state["blocked"] and not state["tampered"]:
                        state["blocked"] = None
            return reason
        return _deliver(deadline)

    def flush(t=timeout):
        reason = _drain(monotonic() + t)
        if reason is not None:
            with lock:
                if state["blocked"] is None:
                    state["blocked"] = f"{_pending()} audit records could not be delivered ({reason})"
        return reason

    def blocked():
        if state["tampered"]:
            return state["tampered"]
        return state["blocked"]

    # -- recording --------------------------------------------------------------------------------

    def _encodable(rec):
        """``rec`` if JSON can encode it, else what can be kept of it (never expected; never dropped)."""
        try:
            dumps(rec)
            return rec
        except (TypeError, ValueError):
            with lock:
                state["errors"] += 1
            return {"action": rec.get("action"), "path": rec.get("path") if rec.get("path").__class__ is str else None,
                    "detail": {"error": "the record could not be encoded", "raw": _text(rec)[:1000]}}

    def _record_text(rec):
        return dumps(_encodable(rec))

    def _encode_body(items):
        """The POST body for buffered ``items``: built in C (``_hook.encode``) where the package has it,
        so the sender holds the GIL for a few microseconds per batch while a cell runs; else from
        :func:`_encode`. Both give the service the same records."""
        if c_encode is not None:
            try:
                return c_encode(items, dumps, encode_string, _record_text)
            except Exception:  # never expected; the Python encoder gives the same records
                with lock:
                    state["errors"] += 1
        return _body(encode(items))

    def record(action, path, detail):
        path, detail = _bounded(path, detail)
        detail["msg_id"], detail["cell_id"] = current[0]
        rec = {"action": action, "path": path, "detail": detail}
        # Appends go to the right end and only the sender (holding send_lock) pops from the left, so
        # no lock is needed here (list.append is atomic).
        n = len(buffer)
        if state["closed"]:  # after close(): delivered before the access happens, or the access is refused
            buffer.append(("r", rec, None, None, None))
            reason = blocked() or _deliver(monotonic() + min(timeout, 2.0))
            if reason is not None:
                with lock:
                    state["blocked"] = state["blocked"] or reason
                raise AuditUnavailable(f"{UNREACHABLE.split(';')[0]}; this access was refused ({reason})")
            return
        # Full: wait for room, unless an earlier wait already failed (a long outage must not stall every access of
        # a long-running process, the server's, by a whole timeout); the sender keeps retrying meanwhile.
        if c_queue:  # into the C queue (a record that cannot be encoded is kept as what can)
            if c_status()["pending"] < capacity or (not state["blocked"] and _drain(monotonic() + timeout) is None):
                try:
                    c_put(rec)
                except (TypeError, ValueError):
                    c_put(_encodable(rec))
                return
        elif n < capacity:
            buffer.append(("r", rec, None, None, None))
            if n == 0 or n + 1 == batch:
                wake.set()
            return
        elif not state["blocked"] and _deliver(monotonic() + timeout) is None:  # full: make room now, or refuse
            buffer.append(("r", rec, None, None, None))
            return
        with lock:
            state["blocked"] = state["blocked"] or "the audit buffer is full and cannot be delivered"
        raise AuditUnavailable(f"{UNREACHABLE.split(';')[0]}; this access was refused "
                               f"(audit buffer full: {capacity} records)")

    def _path(p, follow=True):
        """The absolute path text of an event's path argument, running no user code; None for an fd.

        A path through ``/proc`` or ``/dev`` (a process's working folder, open files or root, ``/dev/stdin``)
        is read where it leads now, which only this process can (``follow``; a link's target is kept as
        given, since it leads wherever the working folder of whoever opens it is)."""
        cls = p.__class__
        if cls is not str:
            if p is None or isinstance(p, int):
                return None
            if isinstance(p, str):
                p = str.__str__(p)  # the characters, whatever a subclass's methods say
            elif isinstance(p, (bytes, bytearray)):
                p = decoded(p)  # its buffer, as Linux gets it (not what a subclass's __bytes__ says)
            elif cls in _PURE_PATHS:
                p = str(p)
            else:  # its __fspath__ may not answer what was opened: the access cannot be recorded
                raise AuditUnavailable("the audit cannot record this path: pass a str, bytes or pathlib path "
                                       f"(not a {object.__repr__(p)})")
        if p[:1] != "/":
            try:
                cwd = getcwd()
            except OSError:  # the working folder was removed: Linux still reads the path from it
                cwd = "/proc/self/cwd"
            if len(cwd) + len(p) >= PATH_MAX:  # a deep working folder: only where p leads is short enough to
                return realpath(p)  # record whole (relative: resolved from here, one lstat per part of p)
            p = cwd + "/" + p
        if len(p) > PATH_MAX:  # only from a deep folder (a link's): read as the service would, before any cut
            return linux_opened(p)
        if follow and (p[:6] == "/proc/" or p[:5] == "/dev/" or
                       (("/proc/" in p or "/dev/" in p) and ("/." in p or "//" in p))):
            return realpath(p)
        if ("/." in p or "//" in p) and "/proc/" not in p:  # /proc/self/root/..: only Linux can say (the service
            p = normpath(p)                                   # reads it as Linux does, see audit.service._opened)
            if p[:2] == "//":  # POSIX normpath keeps exactly two leading slashes; Linux reads them as one
                p = p[1:]
        return p

    def _ignored(path):
        if path is None:
            return False
        if path.startswith(always_slash) or path in ALWAYS:
            return False
        return path in ignored or path.startswith(ignored_slash)

    def _argv(argv):
        argv = list(argv) if argv.__class__ in (list, tuple) else [argv]
        return [_arg(a) for a in argv]

    def _record_named(event, program, words, cwd, env):
        """A process.exec record under each dataset the program was started on (see named_data_paths), so
        that the region's report shows it: what the program opens is not seen. The values of its
        environment count as arguments (``cat $VCF``); ``env`` None is the kernel's own."""
        if cwd is None:
            try:
                cwd = getcwd()
            except OSError:  # the working folder was removed: absolute paths still count
                cwd = None
        if env is None or env is environ:
            env = environ
        elif env.__class__ is not dict:
            env = {}  # a mapping of another kind: reading it could run its code
        values = [_text(v) for v in env.values() if v.__class__ in (str, bytes)]
        for p, how in named_in([*words, *(v for v in values if "data" in v)], cwd, datasets, 256, tools):
            record("process.exec", p, {"event": event, "program": program, "named": how})

    def _arg(a):
        """A program's argument (or folder) as text; a path-like of another kind is refused: its
        ``__fspath__`` could name one path here and give the program another."""
        if a.__class__ in _PURE_PATHS or isinstance(a, (str, bytes, bytearray)) or a is None:
            return _text(a)
        if any("__fspath__" in vars(k) for k in type(a).__mro__):
            raise AuditUnavailable("the audit cannot record this program's argument: pass str, bytes or "
                                   f"pathlib paths (not a {object.__repr__(a)})")
        return _text(a)

    def _handle(event, args, action):
        """Shape and buffer the record of one event. Runs no user code (see :func:`_text`)."""
        if event == "cpython.PyInterpreterState_New":
            record(action, None, {"event": event, "refused": True})
            raise AuditUnavailable("subinterpreters are not allowed in the audited kernel: their code would run "
                                   "without the audit hook")
        if event == "open":
            path = _path(args[0])
            if path is None or _ignored(path):
                return
            record(action, path, {"event": event, "mode": _plain(args[1]), "flags": _plain(args[2])})
        elif event == "sqlite3.connect":
            # ATTACH and VACUUM INTO open files in C too: _hook.watch_sqlite wraps SQLite's VFSes at the first
            # connect (the library is loaded by then); False where it cannot (a SQLite linked into Python)
            watched = sqlite_watch is not None and sqlite_watch()
            if watched:
                sqlite_expect(None)
            database = args[0]
            given = _text(database) if isinstance(database, (str, bytes, bytearray)) else None
            if given is not None and given[:5] == "file:":  # a URI (connect(..., uri=True)): its path part
                # ?mode=memory is recorded too: SQLite takes the last mode= and ignores keys it does not know,
                # so no reading of the query here can tell that no file is opened
                parts = urlsplit(given)
                database = unquote(parts.path) if parts.netloc in ("", "localhost") else given
            if database in ("", ":memory:"):  # no file: a database in memory or a temporary one
                return
            path = _path(database)
            if path is None or _ignored(path):
                return
            detail = {"event": event, "as_given": given if given is not None else _text(args[0])}
            if not watched:
                detail["statements"] = "the databases its statements open (ATTACH, VACUUM INTO) are not recorded"
            record(action, path, detail)
            if watched:  # recorded (record raises when it cannot): SQLite's open of it is not raised again
                sqlite_expect(path)
        elif event == "ngp.sqlite3.open":
            path = _path(args[0])
            if path is None or _ignored(path):
                return
            record(action, path, {"event": event, "flags": _plain(args[1])})
        elif action == "file.list":
            path = _path(args[0] if args and args[0] is not None else ".")
            if path is None or _ignored(path):
                return
            detail = {"event": event}
            if len(args) > 1:
                detail["target"] = _text(args[1])
            record(action, path, detail)
        elif action == "file.link":  # (src, dst, ...): recorded under what the link leads to
            src, dst = args[0], args[1]
            link = _path(dst, follow=False)
            target = _text(src)
            if event == "os.symlink" and target[:1] != "/" and link is not None:
                target = link.rsplit("/", 1)[0] + "/" + target  # relative to the link's own folder
            target = _path(target, follow=False)
            record(action, target, {"event": event, "link": link, "as_given": _text(src)})
        elif event.startswith("shutil."):
            path = _path(args[0])
            if _ignored(path):
                return
            record(action, path, {"event": event, "args": [_text(a) for a in args[1:]]})
        elif action == "process.exec":
            if event == "subprocess.Popen":
                executable, argv, cwd = args[0], _argv(args[1]), args[2]
                path = _arg(executable) if executable is not None else (argv[0] if argv else "")
                cwd = None if cwd is None else _arg(cwd)
                record(action, path, {"event": event, "argv": argv, "cwd": cwd})
                _record_named(event, path, argv, cwd, args[3] if len(args) > 3 else None)
            elif event == "os.system":
                command = _arg(args[0])
                record(action, None, {"event": event, "command": command})
                _record_named(event, None, [command], None, None)
            elif event == "os.fork":
                record(action, None, {"event": event})
            else:  # os.exec / os.posix_spawn: (path, argv, env); os.spawn: (mode, path, argv, env)
                a = args[1:] if event == "os.spawn" else args
                path = _path(a[0]) if a else None
                argv = _argv(a[1]) if len(a) > 1 else []
                record(action, path, {"event": event, "argv": argv})
                _record_named(event, path, argv, None, a[2] if len(a) > 2 else None)
        elif action == "library.load":
            name = args[0]
            path = None if name is None else _text(name)
            if path and path.startswith("/") and _ignored(normpath(path)):
                return
            record(action, path, {"event": event})
        elif action == "socket.connect":
            sock, address = args[0], args[1]
            try:
                family = int(_socket_family(sock))
            except Exception:
                family = 0
            record(action, None, {"event": event, "address": _plain(address), "family": family})
        elif action == "data.open" or action == "review.mark":  # (path, detail dict)
            path, detail = args[0], args[1]
            detail = _plain(detail) if detail.__class__ is dict else {"detail": _text(detail)}
            p = None
            if isinstance(path, (str, bytes)) or path.__class__ in _PURE_PATHS:
                p = _path(path)
            elif path is not None:
                detail["object"] = _text(path)[:200]
            record(action, p, detail)
        elif event == "import":
            name = args[0]
            if state["armed"] and name.__class__ is str and name.startswith("ngp_research.kernel"):
                tamper("import", module=name)
        elif event == "sys.addaudithook":
            record(action, None, {"what": "sys.addaudithook"})

    def hook(event, args):
        if event not in events:  # nearly every event: one set lookup
            return
        if state["closed"] or c_queue:
            pass  # after close(): every record goes through record(), delivered before the access; with
            # the C queue, the C hook took every plain open it could (what it hands on goes to record())
        elif event == "open":  # the hot path, inlined: a plain absolute str path (nothing here raises events)
            p = args[0]
            if p.__class__ is str and p[:1] == "/" and "/." not in p and "//" not in p and len(p) <= PATH_MAX \
                    and p[:6] != "/proc/" and p[:5] != "/dev/" \
                    and args[1].__class__ in _PLAIN_MODES and (args[1] is None or len(args[1]) <= 64) \
                    and args[2].__class__ is int and -(1 << 63) <= args[2] < (1 << 63):
                if (p.startswith(ignored_slash) or p in ignored_set) and not p.startswith(always_slash):
                    return
                if getpid() != home_pid:
                    return
                n = len(buffer)
                if n < capacity:
                    buffer_append(("o", p, args[1], args[2], current[0]))
                    if n == 0 or n + 1 == batch:
                        wake.set()
                    return
        elif event == "ngp.data.open" and len(args) == 2:  # pysam's fetch/open wrappers: same idea
            p, detail = args
            if p.__class__ is str and detail.__class__ is dict and p[:1] == "/" and "/." not in p \
                    and "//" not in p and len(p) <= PATH_MAX and p[:6] != "/proc/" and p[:5] != "/dev/" \
                    and getpid() == home_pid \
                    and _small_detail(detail):
                n = len(buffer)
                if n < capacity:
                    buffer_append(("d", p, dict(detail), current[0], None))
                    if n == 0 or n + 1 == batch:
                        wake.set()
                    return
        if event == "import" and not (args and args[0].__class__ is str and args[0].startswith("ngp_research")):
            return
        action = actions_get(event)
        me = _get_ident()
        if getpid() != home_pid:
            return  # a forked child before _in_child has run (the interpreter's own after-fork work)
        if me in busy and action == "socket.connect":
            return  # the sender's own connection to the service
        nested = me in busy
        busy.add(me)
        try:
            _handle(event, args, action)
        except AuditUnavailable:
            raise  # fail closed: the access does not happen
        except Exception as e:  # a record we could not shape: keep what we can, or refuse the access
            with lock:
                state["errors"] += 1
            try:
                record(action, None, {"event": event, "raw": _text(dumps(_plain(list(args))))[:1000],
                                      "error": type(e).__name__})
            except AuditUnavailable:
                raise
            except Exception:
                pass
            else:
                if action not in FILE_ACCESSES:
                    return  # kept as far as it could be; the operation opens no file
            raise AuditUnavailable(f"this access could not be recorded ({type(e).__name__}); it was refused") \
                from None
        finally:
            if not nested:
                busy.discard(me)

    # -- executions and integrity ------------------------------------------------------------------

    def begin(msg_id, cell_id, arm=True):
        with lock:
            prev = current[0]
            current[0] = (_short_id(msg_id), _short_id(cell_id))
            if arm:  # from the kernel's first execution on, (re)loading our modules is tampering
                state["armed"] = True
        return prev

    def tamper(what, **detail):
        with lock:
            first = state["tampered"] is None
            state["tampered"] = (f"the kernel's audit machinery was modified ({what}); no code was run. "
                                 "Restart the kernel.")
            state["blocked"] = state["tampered"]
        if first or what == "import":
            detail["what"] = what
            _, detail = _bounded(None, detail)  # an import's name can be as long as a cell makes it
            msg_id, cell_id = current[0]
            detail.update(msg_id=msg_id, cell_id=cell_id)
            rec = {"action": "audit.tamper", "path": None, "detail": detail}
            if c_queue and not state["closed"] and getpid() == home_pid:
                c_put(_encodable(rec))
            else:
                with lock:
                    buffer.append(("r", rec, None, None, None))
                wake.set()
                if state["closed"]:  # no sender (a forked or spawned child, after close()): deliver it now
                    _deliver(monotonic() + min(timeout, 2.0))

    def watch(check):
        checks.append(check)

    def close(t=timeout):
        """Deliver what is buffered; from then on every recorded event is delivered before it happens.

        For the interpreter's exit: the sender thread may be gone, but ``__del__`` methods and
        daemon threads can still open files.
        """
        reason = flush(t)
        # In this order, so that no open of another thread lands where nothing waits for it: from now on
        # records go through the Python buffer, delivered before their access; then the C hook hands
        # every event to Python; then whatever reached the C queue meanwhile goes out.
        state["closed"] = True
        if _hook is not None and state.get("hook") == "c":
            _hook.write_through()
        if c_queue and getpid() == home_pid:
            reason = c_wait(t) or reason
        return reason

    def reopen():
        """Undo :func:`close` in the process whose C sender runs: records go in batches again. For a spawned
        Dask worker, which delivers each task's records before its result (see worker.py); False elsewhere."""
        if getpid() != home_pid or not c_queue or not state["closed"]:
            return False
        try:
            _hook.write_through(False)
        except RuntimeError:
            return False
        state["closed"] = False
        return True

    def stats():
        with lock:
            out = {"pending": len(buffer), "posts": state["posts"], "delivered": state["records"],
                   "failures": state["failures"], "errors": state["errors"], "blocked": blocked(),
                   "hook": state.get("hook"), "sender": "c" if c_queue else "python", "current": current[0]}
        if c_queue:
            q = c_status()
            out.update(pending=out["pending"] + q["pending"], posts=out["posts"] + q["posts"],
                       delivered=out["delivered"] + q["acknowledged"], failures=out["failures"] + q["failures"])
        return out

    def _run_checks():
        for check in checks:
            try:
                problem = check()
            except Exception as e:
                problem = f"integrity check failed: {e!r}"
            if problem and not state["tampered"]:
                tamper(problem)

    def sender():
        busy.add(_get_ident())  # the sender's own connection is not recorded
        backoff = 0.1
        while True:
            try:
                wake.wait(1.0)
                _run_checks()
                with lock:
                    pending = len(buffer)
                if not pending:
                    wake.clear()
                    continue
                if pending < batch:
                    time.sleep(linger)  # let a burst of opens collect into one batch
                with lock:
                    wake.clear()
                reason = _deliver(monotonic() + timeout, limit=4)
            except Exception as e:  # never let one bad round stop delivery
                with lock:
                    state["errors"] += 1
                reason = f"{type(e).__name__}"
            if reason is None:
                backoff = 0.1
                with lock:
                    if buffer:
                        wake.set()
            else:
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                wake.set()

    def _in_child():
        """After ``os.fork`` in the child: no sender thread here, so every record is delivered before its
        access (as after :func:`close`), on a connection of the child's own. The parent's pending
        records stay the parent's to deliver."""
        nonlocal home_pid
        home_pid = os.getpid()
        lock._at_fork_reinit()  # a lock the parent's sender held at the fork would never be released here
        send_lock._at_fork_reinit()
        conn_box[0] = None
        del buffer[:]
        busy.clear()  # the parent's sender threads are gone; a thread of the child's may reuse their idents
        state["closed"] = True

    auditor = Auditor(write_ahead, flush, begin, blocked, tamper, record, stats, watch, close, reopen)
    guard = closure_guard([hook, _handle, _record_named, _arg, named_data_paths, _argv, _encodable, close, encode_items, _materialize, _body, _record_text, _encode_body, _pending, _drain, record, _path, _ignored, _post, _exchange, _deliver, _connection, write_ahead,
                           flush, blocked, begin, tamper, watch, stats, _run_checks, sender, reopen])
    checks.append(lambda: guard(restore=True))
    os.register_at_fork(after_in_child=_in_child)
    if add_hook:
        if _hook is not None:  # the C hook: plain opens never enter Python; other events go to ``hook``
            if c_queue:
                _hook.start_sender(*_service_address(parsed, socket_path), request_head, linger, batch, max_post, capacity,
                                   timeout, dumps, encode_string)
            _hook.install(hook, buffer, current, wake.set, ignored, ALWAYS,
                          tuple(EVENT_ACTIONS), capacity, batch)
            state["hook"] = "c"
        else:
            sys.addaudithook(hook)
            state["hook"] = "python"
    threading.Thread(target=sender, name="ngp-audit-sender", daemon=True).start()
    return auditor
