"""Records for libraries that open files in C, without a Python audit event (htslib/pysam, Hail).

:func:`record_data_access` raises the audit event ``ngp.data.open``, which the kernel's audit hook
turns into a ``data.open`` record attributed to the running cell. So the sink is the hook itself
(which cannot be removed) and nothing here holds state a user could swap. Outside the audited
kernel (no hook installed) it does nothing.

:func:`wrap_pysam` replaces ``VariantFile``, ``AlignmentFile``, ``TabixFile`` and ``FastaFile`` (and
their old aliases) in ``pysam`` and in the extension modules that define them by subclasses whose
constructor records ``data.open`` (path, mode) and whose ``fetch`` records ``data.open`` with the
region. ``isinstance`` keeps working both ways (a metaclass answers for the original class too).
It does the same for the classes that open a file in C when made (``FastxFile``, ``FastqFile``,
``BGZFile``, ``HFile``, ``GZIterator``), records the files ``tabix_index`` and ``tabix_compress``
read, and, for the samtools and bcftools commands pysam runs in the kernel's own process
(``pysam.samtools.view(...)``, ``pysam.bcftools.stats(...)``), each argument that names an
existing file or one under ``/data``.

:func:`wrap_hail` replaces Hail's functions that read or list files in its JVM (the importers,
``read_matrix_table``/``read_table``, ``hadoop_open``/``hadoop_ls``/..., see
:data:`HAIL_ENTRY_POINTS`) by ones that first record every file their arguments name, whether given
by position or keyword, in a list, or in a BGEN index map. Hail's own internal calls may add records
of their own (``import_csv`` calls ``import_table``).
"""

import glob
import os
import sys

__all__ = ["record_data_access", "wrap_libraries", "wrap_pysam", "wrap_hail", "wrap_hail_on_import", "wrap_pyspark",
           "wrap_pyspark_on_import", "wrap_scipy", "wrap_scipy_on_import", "describe_region", "HAIL_ENTRY_POINTS",
           "HAIL_METHODS", "PYSPARK_ENTRY_POINTS", "SCIPY_ENTRY_POINTS"]

_audit = sys.audit  # bound now: reassigning sys.audit later does not silence these records


def record_data_access(path, **detail) -> None:
    """Record that ``path`` was opened by a library the audit hook cannot see (``data.open``).

    ``detail`` is free-form (JSON-able): e.g. ``mode``, ``region``, ``library``, ``entry_point``.

    >>> record_data_access("/data/norr/ds/x.vcf.gz", mode="r", library="example")  # no hook: no-op
    """
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    _audit("ngp.data.open", path, detail)


def describe_region(args, kwargs, names=("contig", "start", "stop")) -> dict:
    """The region a ``fetch(...)`` call asks for, from its positional and keyword arguments.

    >>> describe_region(("chr1", 100, 200), {})
    {'contig': 'chr1', 'start': 100, 'stop': 200}
    >>> describe_region((), {"region": "chr1:100-200"})
    {'region': 'chr1:100-200'}
    >>> describe_region((), {"reference": "chr2", "end": 5}, ("reference", "start", "end"))
    {'contig': 'chr2', 'stop': 5}
    """
    out = {}
    values = dict(zip(names, args))
    for key, value in kwargs.items():
        values.setdefault(key, value)
    contig = values.get("contig", values.get("reference"))
    if contig is not None:
        out["contig"] = contig if isinstance(contig, (str, int)) else str(contig)
    for key in ("start",):
        if values.get(key) is not None:
            out[key] = values[key]
    stop = values.get("stop", values.get("end"))
    if stop is not None:
        out["stop"] = stop
    if values.get("region") is not None:
        out["region"] = str(values["region"])
    if values.get("tid") is not None:
        out["tid"] = values["tid"]
    if values.get("until_eof"):
        out["until_eof"] = True
    return out


def _filename(obj):
    """The file ``obj`` names, absolute; a ``file:`` URL (htslib opens ``file:///x`` as ``/x``) as its
    path; another URL as given.

    >>> _filename("file:///data/syd/ds/x.vcf.gz"), _filename("file://localhost/data/x"), _filename("s3://b/k")
    ('/data/syd/ds/x.vcf.gz', '/data/x', 's3://b/k')
    """
    if isinstance(obj, (str, bytes, os.PathLike)):
        p = os.fsdecode(os.fspath(obj))
        if p.startswith("file://"):
            rest = p[len("file://"):]
            if rest.startswith("localhost/"):
                rest = rest[len("localhost"):]
            if rest.startswith("/"):
                return os.path.normpath(rest)
        return p if p == "-" or "://" in p else os.path.abspath(p)
    if isinstance(obj, int):
        return None
    name = getattr(obj, "name", None)  # a Python file object
    return _filename(name) if isinstance(name, (str, bytes)) else None


# (class name, module that defines it, the fetch argument names, old aliases)
_PYSAM_CLASSES = (
    ("VariantFile", "pysam.libcbcf", ("contig", "start", "stop", "region"), ()),
    ("AlignmentFile", "pysam.libcalignmentfile", ("contig", "start", "stop", "region", "tid"), ("Samfile",)),
    ("TabixFile", "pysam.libctabix", ("reference", "start", "end", "region"), ("Tabixfile",)),
    ("FastaFile", "pysam.libcfaidx", ("reference", "start", "end", "region"), ("Fastafile",)),
    # classes that open a file in C when made, with no fetch: the open is recorded
    ("FastxFile", "pysam.libcfaidx", None, ()),
    ("FastqFile", "pysam.libcfaidx", None, ()),
    ("BGZFile", "pysam.libcbgzf", None, ()),
    ("HFile", "pysam.libchtslib", None, ()),
    ("GZIterator", "pysam.libctabix", None, ()),
)

#: Keyword arguments of pysam's file classes that name another file read in C.
_PYSAM_OTHER_FILES = ("reference_filename", "index_filename", "filepath_index", "filepath_index_compressed",
                      "index")

#: pysam's functions that read a file named by an argument, in C (defined in ``pysam.libctabix``), and the
#: parameters that name it.
_PYSAM_FUNCTIONS = {"tabix_index": ("filename",), "tabix_compress": ("filename_in",)}


def _audited_subclass(base, fetch_names):
    record = record_data_access
    region_of = describe_region
    filename_of = _filename

    class _Meta(type):  # only the wrapper answers for the original class, not a subclass a user makes of it
        def __instancecheck__(cls, obj):
            return isinstance(obj, base) if cls is wrapper[0] else type.__instancecheck__(cls, obj)

        def __subclasscheck__(cls, sub):
            return issubclass(sub, base) if cls is wrapper[0] else type.__subclasscheck__(cls, sub)

    wrapper = []

    audit = _audit
    fetch_entry = f"{base.__name__}.fetch"
    # id(file) -> (its filename object, absolute path), resolved once at open so that a fetch loop
    # does not pay for abspath each time; held here, not on the object, where a cell could rewrite it
    resolved = {}
    plain_keys = ("contig", "start", "stop")
    has_init = base.__init__ is not object.__init__

    def __init__(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("filename", kwargs.get("filepath_or_object", kwargs.get("name")))
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else kwargs.get("mode", "r")
        path = filename_of(target)
        record(path, mode=mode, library="pysam", entry_point=base.__name__,
               **({} if path else {"object": repr(target)[:200]}))
        for key in _PYSAM_OTHER_FILES:  # a CRAM's reference, an index named apart from its file
            other = kwargs.get(key)
            other = filename_of(other) if other is not None else None
            if other is not None:
                record(other, mode="r", library="pysam", entry_point=base.__name__, argument=key)
        if has_init:  # some open in __cinit__ alone, at creation (recorded as soon as made, before use)
            base.__init__(self, *args, **kwargs)
        if len(resolved) > 4096:
            resolved.clear()
        resolved[id(self)] = (getattr(self, "filename", None), path)

    def fetch(self, *args, **kwargs):
        fn = getattr(self, "filename", None)
        known = resolved.get(id(self))
        if known is not None and known[0] is fn and fn is not None:  # the same object's own filename
            path = known[1]
        else:
            path = filename_of(fn) if fn is not None else None
        if not kwargs and 0 < len(args) <= 3 and args[0].__class__ is str and None not in args:
            detail = dict(zip(plain_keys, args))  # fetch("chr1", 100, 200): the common case, built directly
        else:
            detail = region_of(args, kwargs, fetch_names)
        detail["library"] = "pysam"
        detail["entry_point"] = fetch_entry
        audit("ngp.data.open", path, detail)
        return base.fetch(self, *args, **kwargs)

    ns = {"__init__": __init__, "__module__": base.__module__,
          "__doc__": base.__doc__, "__qualname__": base.__qualname__}
    if fetch_names is not None:
        ns["fetch"] = fetch
    cls = _Meta(base.__name__, (base,), ns)
    wrapper.append(cls)
    cls._ngp_audited_base = base
    return cls


def wrap_pysam(pysam=None) -> list[str]:
    """Replace pysam's file classes by recording subclasses, and its file-reading functions and samtools/bcftools
    commands by recording wrappers; returns the names wrapped (idempotent)."""
    if pysam is None:
        try:
            import pysam  # noqa: PLC0415
        except ImportError:
            return []
    import importlib  # noqa: PLC0415

    wrapped = []
    for name, modname, fetch_names, aliases in _PYSAM_CLASSES:
        base = getattr(pysam, name, None)
        if base is None or getattr(base, "_ngp_audited_base", None) is not None:
            continue
        cls = _audited_subclass(base, fetch_names)
        targets = [pysam]
        try:
            targets.append(importlib.import_module(modname))
        except ImportError:
            pass
        for mod in targets:
            for attr in (name, *aliases):
                if getattr(mod, attr, None) is base:
                    setattr(mod, attr, cls)
        wrapped.append(name)
    wrapped += _wrap_functions(_PYSAM_FUNCTIONS, lambda name: getattr(pysam, name, None),
                               (pysam, sys.modules.get("pysam.libctabix")), "pysam")
    dispatcher = getattr(getattr(pysam, "utils", None), "PysamDispatcher", None)
    if dispatcher is not None and not getattr(dispatcher.__call__, "_ngp_audited", False):
        dispatcher.__call__ = _audited_dispatch(dispatcher.__call__)
        wrapped.append("PysamDispatcher")
    return wrapped


def _audited(wrapper, signature=None):
    """``wrapper`` (made with ``functools.wraps``) marked as ours, without ``__wrapped__``: through that,
    ``inspect.unwrap`` would hand a cell the library's function past the record. Its signature stays.

    >>> import functools
    >>> def f(path, n=1): pass
    >>> w = _audited(functools.wraps(f)(lambda *a, **k: f(*a, **k)))
    >>> hasattr(w, "__wrapped__"), w._ngp_audited, str(__import__("inspect").signature(w))
    (False, True, '(path, n=1)')
    """
    import inspect  # noqa: PLC0415

    if signature is None:
        try:
            signature = inspect.signature(wrapper)  # the wrapped function's, through __wrapped__
        except (TypeError, ValueError):
            signature = None
    if signature is not None:
        wrapper.__signature__ = signature
    wrapper.__dict__.pop("__wrapped__", None)
    wrapper._ngp_audited = True
    return wrapper


def _audited_function(fn, name, parameters, library, split_commas=False):
    """``fn``, recording each file its ``parameters`` name (by position or keyword) before it runs;
    ``split_commas``: a str names several, separated by commas (Hadoop's input paths)."""
    import functools  # noqa: PLC0415
    import inspect  # noqa: PLC0415

    record = record_data_access
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a C function without one: the first argument is the first parameter
        signature = None

    @functools.wraps(fn)
    def audited(*args, **kwargs):
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments if signature is not None else {}
        except TypeError:  # the function itself will refuse the call; record what can be told
            bound = {}
        if args and not any(p in bound for p in parameters):  # a signature of (*args, **kwargs): the first
            bound = {parameters[0]: args[0]}
        for parameter in parameters:
            value = bound.get(parameter)
            if split_commas and isinstance(value, str):  # Hadoop's list of paths: "a,b"
                value = value.split(",")
            for path in _named_files(value):
                detail = {"library": library, "entry_point": name, "argument": parameter}
                if name == "hadoop_open":  # the one opener among them: its mode says read or write
                    detail["mode"] = bound.get("mode", "r")
                record(path, **detail)
        return fn(*args, **kwargs)

    return _audited(audited, signature)


#: The ``-c`` programs of multiprocessing's fresh interpreters that run the parent's code.
_CHILD_PROGRAMS = ("from multiprocessing.spawn import spawn_main", "from multiprocessing.forkserver import main")


def wrap_multiprocessing(current=None) -> list[str]:
    """Audit the Python children multiprocessing's ``spawn`` and ``forkserver`` methods start.

    They are started with ``_posixsubprocess`` directly, which raises no audit event, and are fresh
    interpreters without the hook. The start is recorded (``ngp.process.start``, stored as
    ``process.exec``), and the child's command runs :func:`ngp_research.kernel.child.start` first, so
    the hook is in place before the parent's code runs there; its records are attributed to
    ``current()``, the (msg_id, cell_id) of the execution that started it. (A ``fork`` child keeps the
    parent's hook. Dask's local process scheduler, dask.bag's default, spawns: covered here.)
    """
    import multiprocessing.util as util  # noqa: PLC0415

    fn = util.spawnv_passfds
    if getattr(fn, "_ngp_audited", False):
        return []
    import functools  # noqa: PLC0415

    audit = _audit

    @functools.wraps(fn)
    def spawnv_passfds(path, args, passfds):
        args = list(args)
        audit("ngp.process.start", path, args, None)
        if "-c" in args[:-1]:
            i = args.index("-c") + 1
            program = args[i]
            if isinstance(program, str) and program.startswith(_CHILD_PROGRAMS):
                ids = current() if current is not None else None
                msg_id, cell_id = ids if isinstance(ids, tuple) and len(ids) == 2 else (None, None)
                # ascii() of an exact str (or None): a plain literal, whatever characters the ids hold
                msg_id = ascii(str.__str__(msg_id)) if type(msg_id) is str else "None"
                cell_id = ascii(str.__str__(cell_id)) if type(cell_id) is str else "None"
                args[i] = (f"from ngp_research.kernel.child import start as _ngp_start; "
                           f"_ngp_start({msg_id}, {cell_id}); {program}")
        return fn(path, args, passfds)

    util.spawnv_passfds = _audited(spawnv_passfds)
    return ["spawnv_passfds"]


def _option_values(word):
    """What in one command-line word can name a file: the word, or an option's joined value.

    >>> _option_values("/data/x.bam"), _option_values("--reference=/data/ref.fa"), _option_values("-T/data/ref.fa")
    (['/data/x.bam'], ['/data/ref.fa'], ['/data/ref.fa'])
    >>> _option_values("-c"), _option_values("")
    ([], [])
    """
    if not word:
        return []
    if not word.startswith("-"):
        return [word]
    if "=" in word:
        return [word.split("=", 1)[1]] if word.split("=", 1)[1] else []
    if not word.startswith("--") and len(word) > 2:
        return [word[2:]]
    return []


def _audited_dispatch(call):
    """``PysamDispatcher.__call__`` (``pysam.samtools.view(...)``, ``pysam.bcftools.stats(...)``: samtools and
    bcftools run in the kernel's process, in C), recording each argument that names an existing file, or
    one under ``/data``, before the command runs."""
    import functools  # noqa: PLC0415

    record = record_data_access

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        words = [os.fsdecode(os.fspath(a)) for a in args if isinstance(a, (str, bytes, os.PathLike))]
        command = f"{getattr(self, 'collection', 'pysam')}.{getattr(self, 'dispatch', '?')}"
        for word in words:
            for candidate in _option_values(word):
                path = os.path.abspath(candidate)
                if path.startswith("/data/") or os.path.exists(path):
                    record(path, library="pysam", entry_point=command, argument=word, argv=words[:64])
        return call(self, *args, **kwargs)

    return _audited(__call__)


#: Hail's functions that read (or list) files in its JVM, where no Python audit event is raised, and the
#: parameters that name files: each is recorded as ``data.open`` (``entry_point``, ``argument``) before
#: the call. A name with a dot is an attribute of ``hail.experimental``.
HAIL_ENTRY_POINTS = {
    "import_vcf": ("path", "header_file"),
    "import_plink": ("bed", "bim", "fam"),
    "import_bgen": ("path", "sample_file", "index_file_map"),
    "import_gen": ("path", "sample_file"),
    "read_matrix_table": ("path",),
    "read_table": ("path",),
    "import_table": ("paths",),
    "import_csv": ("paths",),
    "import_lines": ("paths",),
    "import_matrix_table": ("paths",),
    "import_bed": ("path",),
    "import_fam": ("path",),
    "import_locus_intervals": ("path",),
    "import_avro": ("paths",),
    "import_gvcf_interval": ("path",),
    "hadoop_open": ("path",),
    "hadoop_copy": ("src", "dest"),
    "hadoop_ls": ("path",),
    "hadoop_stat": ("path",),
    "hadoop_exists": ("path",),
    "hadoop_is_file": ("path",),
    "hadoop_is_dir": ("path",),
    "index_bgen": ("path", "index_file_map"),
    "get_vcf_metadata": ("path",),
    "get_vcf_header_info": ("path",),
    "experimental.import_gtf": ("path",),
    "experimental.read_expression": ("path",),
    "vds.new_combiner": ("gvcf_paths", "vds_paths", "gvcf_external_header"),
    "grep": ("path",),
}

#: Hail's methods that read files, as (module, class, method, the parameters that name files).
HAIL_METHODS = (
    ("hail.genetics.reference_genome", "ReferenceGenome", "from_fasta_file", ("fasta_file", "index_file")),
    ("hail.genetics.reference_genome", "ReferenceGenome", "add_sequence", ("fasta_file", "index_file")),
    ("hail.genetics.reference_genome", "ReferenceGenome", "add_liftover", ("chain_file",)),
    ("hail.genetics.reference_genome", "ReferenceGenome", "read", ("path",)),
    ("hail.linalg.blockmatrix", "BlockMatrix", "read", ("path",)),
    ("hail.linalg.blockmatrix", "BlockMatrix", "fromfile", ("uri",)),
)

#: The modules whose names for those functions are replaced: Hail's public ones and those that define
#: them (``hail.methods.import_vcf`` is the same function as ``hail.import_vcf``).
_HAIL_MODULES = ("hail", "hail.methods", "hail.methods.impex", "hail.utils", "hail.utils.hadoop_utils",
                 "hail.experimental", "hail.experimental.expressions", "hail.experimental.import_gtf",
                 "hail.vds", "hail.vds.combiner", "hail.vds.combiner.variant_dataset_combiner")


def _named_files(value):
    """The file names in one argument: a path, a list of them, or a dict's keys and values (a BGEN index
    map); a ``file:`` URL as its local path, as Hail reads it.

    >>> _named_files(["/data/a.vcf", "file:///data/b.vcf"]), _named_files({"/d/x.bgen": "/d/x.idx2"})
    (['/data/a.vcf', '/data/b.vcf'], ['/d/x.bgen', '/d/x.idx2'])
    >>> _named_files(None), _named_files(3)
    ([], [])
    """
    if value is None:
        return []
    if isinstance(value, dict):
        found = [v for kv in value.items() for v in kv]
    elif isinstance(value, (list, tuple)):
        found = list(value)
    else:
        found = [value]
    out = []
    for v in found:
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if isinstance(v, bytes):
            v = os.fsdecode(v)
        if not isinstance(v, str):
            continue
        if v.startswith("file://"):
            v = v[len("file://"):]
        elif v.startswith("file:/"):
            v = v[len("file:"):]
        out.append(v)
        if v.startswith("/data/") and any(c in v for c in "*?["):  # a glob (Hail, Spark): what it matches,
            out.extend(glob.glob(v)[:1000])  # so each matching region's report shows it
    return out


def wrap_hail() -> list[str]:
    """Record Hail's entry points that read files (:data:`HAIL_ENTRY_POINTS`) if Hail is imported;
    returns the names wrapped (idempotent)."""
    hail = sys.modules.get("hail")
    if hail is None:
        try:
            import hail  # noqa: PLC0415
        except ImportError:
            return []
    def find(name):
        home = getattr(hail, name.split(".", 1)[0], None) if "." in name else hail
        return getattr(home, name.rsplit(".", 1)[-1], None)

    return (_wrap_functions(HAIL_ENTRY_POINTS, find, [sys.modules.get(n) for n in _HAIL_MODULES], "hail")
            + _wrap_methods(HAIL_METHODS, "hail"))


def _wrap_functions(table, find, modules, library) -> list[str]:
    """Wrap each function of ``table`` (``{name: parameters}``; ``find(name)`` gives the function, a dotted
    name's last part is its attribute name) in every one of ``modules`` that holds it under that name;
    returns the names wrapped (those found and not yet wrapped)."""
    wrapped = []
    for name, parameters in table.items():
        attr = name.rsplit(".", 1)[-1]
        fn = find(name)
        if fn is None or not callable(fn) or getattr(fn, "_ngp_audited", False):
            continue
        audited = _audited_function(fn, attr, parameters, library)
        for module in modules:
            if module is not None and getattr(module, attr, None) is fn:
                setattr(module, attr, audited)
        wrapped.append(name)
    return wrapped


def _wrap_methods(table, library, split_commas=()) -> list[str]:
    """Wrap the methods of ``table`` ((module, class, method, parameters)) that exist and are not yet
    wrapped: plain, class and static methods alike. The classes named in ``split_commas`` take several
    paths in one str, separated by commas."""
    import importlib  # noqa: PLC0415

    wrapped = []
    for modname, clsname, method, parameters in table:
        try:
            cls = getattr(importlib.import_module(modname), clsname)
        except (ImportError, AttributeError):
            continue
        raw = cls.__dict__.get(method)
        kind = type(raw) if isinstance(raw, (classmethod, staticmethod)) else None
        fn = raw.__func__ if kind is not None else raw
        if fn is None or not callable(fn) or getattr(fn, "_ngp_audited", False):
            continue
        audited = _audited_function(fn, f"{clsname}.{method}", parameters, library,
                                    split_commas=clsname in split_commas)
        setattr(cls, method, kind(audited) if kind is not None else audited)
        wrapped.append(f"{clsname}.{method}")
    return wrapped


#: Spark's readers (its JVM opens the files: no Python audit event), as (module, class, method, the
#: parameters that name files). Hail runs on Spark, so a cell can reach them through ``hl.spark_context()``
#: or a ``SparkSession`` of its own.
PYSPARK_ENTRY_POINTS = (
    ("pyspark.sql.readwriter", "DataFrameReader", "load", ("path",)),
    ("pyspark.sql.readwriter", "DataFrameReader", "csv", ("path",)),
    ("pyspark.sql.readwriter", "DataFrameReader", "json", ("path",)),
    ("pyspark.sql.readwriter", "DataFrameReader", "parquet", ("paths",)),
    ("pyspark.sql.readwriter", "DataFrameReader", "text", ("paths",)),
    ("pyspark.sql.readwriter", "DataFrameReader", "orc", ("path",)),
    ("pyspark.context", "SparkContext", "textFile", ("name",)),
    ("pyspark.context", "SparkContext", "wholeTextFiles", ("path",)),
    ("pyspark.context", "SparkContext", "binaryFiles", ("path",)),
    ("pyspark.context", "SparkContext", "binaryRecords", ("path",)),
    ("pyspark.context", "SparkContext", "pickleFile", ("name",)),
    ("pyspark.context", "SparkContext", "sequenceFile", ("path",)),
    ("pyspark.context", "SparkContext", "hadoopFile", ("path",)),
    ("pyspark.context", "SparkContext", "newAPIHadoopFile", ("path",)),
    ("pyspark.context", "SparkContext", "addFile", ("path",)),
    ("pyspark.context", "SparkContext", "addPyFile", ("path",)),
    ("pyspark.context", "SparkContext", "addArchive", ("path",)),
    ("pyspark.sql.streaming.readwriter", "DataStreamReader", "load", ("path",)),
    ("pyspark.sql.streaming.readwriter", "DataStreamReader", "csv", ("path",)),
    ("pyspark.sql.streaming.readwriter", "DataStreamReader", "json", ("path",)),
    ("pyspark.sql.streaming.readwriter", "DataStreamReader", "parquet", ("path",)),
    ("pyspark.sql.streaming.readwriter", "DataStreamReader", "text", ("path",)),
    ("pyspark.sql.streaming.readwriter", "DataStreamReader", "orc", ("path",)),
    ("pyspark.sql.catalog", "Catalog", "createTable", ("path",)),
    ("pyspark.sql.catalog", "Catalog", "createExternalTable", ("path",)),
)

#: Spark's reader options that name files (``spark.read.option("path", p).load()``).
_SPARK_PATH_OPTIONS = ("path", "paths")


def wrap_pyspark() -> list[str]:
    """Record the files Spark's readers are given (:data:`PYSPARK_ENTRY_POINTS`), if pyspark is imported;
    returns the names wrapped (idempotent). A path in a SQL text (``spark.sql("... csv.`/data/...`")``)
    is not seen here; the cell's code, recorded before it ran, shows it."""
    if "pyspark" not in sys.modules:
        return []
    import importlib  # noqa: PLC0415

    wrapped = _wrap_methods(PYSPARK_ENTRY_POINTS, "pyspark", split_commas=("SparkContext",))  # Hadoop's "a,b"
    for modname, clsname in (("pyspark.sql.readwriter", "DataFrameReader"),
                             ("pyspark.sql.streaming.readwriter", "DataStreamReader")):
        try:
            cls = getattr(importlib.import_module(modname), clsname)
        except (ImportError, AttributeError):
            continue
        for method in ("option", "options"):
            fn = cls.__dict__.get(method)
            if fn is not None and callable(fn) and not getattr(fn, "_ngp_audited", False):
                setattr(cls, method, _audited_options(fn, f"{clsname}.{method}"))
                wrapped.append(f"{clsname}.{method}")
    return wrapped


def _audited_options(fn, name):
    """A Spark reader's ``option(key, value)``/``options(**kw)``, recording a ``path`` option's files."""
    import functools  # noqa: PLC0415
    import inspect  # noqa: PLC0415

    record = record_data_access
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def audited(self, *args, **kwargs):
        try:
            bound = signature.bind(self, *args, **kwargs).arguments
        except TypeError:  # Spark refuses the call itself
            bound = {}
        if "key" in bound:  # option(key, value)
            given = {bound["key"]: bound.get("value")}
        else:  # options(**options)
            given = dict(bound.get("options") or {})
        for key, value in given.items():
            if isinstance(key, str) and key.lower() in _SPARK_PATH_OPTIONS:
                for path in _named_files(value.split(",") if isinstance(value, str) and key.lower() == "paths"
                                         else value):
                    record(path, library="pyspark", entry_point=name, argument=key)
        return fn(self, *args, **kwargs)

    return _audited(audited, signature)


#: scipy's readers that open the file in C++ (a Matrix Market file that is not gzip or bzip2).
SCIPY_ENTRY_POINTS = {"mmread": ("source",), "mminfo": ("source",)}


def wrap_scipy() -> list[str]:
    """Record the files ``scipy.io.mmread``/``mminfo`` read (a single-cell count matrix, ``matrix.mtx``): its
    fast reader opens them in C++, without an ``open`` event; returns the names wrapped (idempotent)."""
    io = sys.modules.get("scipy.io")
    if io is None:
        return []
    modules = (io, sys.modules.get("scipy.io._fast_matrix_market"), sys.modules.get("scipy.io._mmio"))
    return _wrap_functions(SCIPY_ENTRY_POINTS, lambda name: getattr(io, name, None), modules, "scipy")


class _WrapAfterImport:
    """A ``sys.meta_path`` finder that wraps a library's entry points as soon as ``import <name>`` has run.

    Importing Hail takes seconds, so the kernel does not import it at start; this finder delegates
    the import to the other finders and calls ``wrap`` (e.g. :func:`wrap_hail`) right after the
    module executes.
    """

    def __init__(self, name, wrap):
        self.name = name
        self.wrap = wrap

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        for finder in sys.meta_path:
            if isinstance(finder, _WrapAfterImport) or not hasattr(finder, "find_spec"):
                continue  # another of these would ask this one again, endlessly
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        original = spec.loader.exec_module
        wrap = self.wrap

        def exec_module(module):
            original(module)
            wrap()

        spec.loader.exec_module = exec_module
        return spec


def _wrap_on_import(name, wrap, what, unwrapped=None):
    """Wrap ``name``'s entry points with ``wrap`` now if it is imported, else as soon as it is; returns an
    integrity check (for the auditor's ``watch``): a problem when the finder was taken out of
    ``sys.meta_path`` while the library is not imported, or ``unwrapped(module)`` says so."""
    if name in sys.modules:
        wrap()
        finder = None
    else:
        finder = _WrapAfterImport(name, wrap)
        sys.meta_path.insert(0, finder)

    def check():
        module = sys.modules.get(name)
        if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False):
            return None  # still being imported: the finder wraps it when that is done
        if module is not None and unwrapped is not None and unwrapped(module):
            return f"{what} are not wrapped"
        if module is None and finder is not None and finder not in sys.meta_path:
            return f"the finder that wraps {what} was removed"
        return None

    return check


def wrap_pyspark_on_import():
    """Wrap Spark's readers now if pyspark is imported, else as soon as it is (Hail imports it); returns an
    integrity check like :func:`wrap_hail_on_import`'s.

    >>> check = wrap_pyspark_on_import()
    >>> check() is None
    True
    """
    return _wrap_on_import("pyspark", wrap_pyspark, "Spark's readers")


def wrap_scipy_on_import():
    """Wrap scipy's Matrix Market reader (:func:`wrap_scipy`) now if ``scipy.io`` is imported, else as soon as it is.

    >>> check = wrap_scipy_on_import()
    >>> check() is None
    True
    """
    return _wrap_on_import("scipy.io", wrap_scipy, "scipy's Matrix Market readers")


def wrap_libraries(auditor) -> None:
    """Wrap, for ``auditor`` (once per process), every library that reads files where the hook cannot see it:
    pysam, Hail, pyspark and scipy now if imported, else when they are (a program that never uses them does
    not pay for importing them; their integrity checks go to ``auditor.watch``); and multiprocessing's
    spawned children, attributed to the execution ``auditor`` attributes to."""
    def pysam_unwrapped(pysam):
        return any(getattr(getattr(pysam, name, None), "_ngp_audited_base", None) is None
                   for name, *_ in _PYSAM_CLASSES if getattr(pysam, name, None) is not None)

    checks = (_wrap_on_import("pysam", wrap_pysam, "pysam's readers", pysam_unwrapped), wrap_hail_on_import(),
              wrap_pyspark_on_import(), wrap_scipy_on_import())
    for check in checks:
        auditor.watch(check)
    wrap_multiprocessing(lambda: auditor.stats().get("current"))


def wrap_hail_on_import():
    """Wrap Hail's entry points now if it is imported, else as soon as it is; returns an integrity check.

    The check (for the auditor's ``watch``) reports a problem when the finder was taken out of
    ``sys.meta_path`` while Hail is still unwrapped.

    >>> check = wrap_hail_on_import()
    >>> check() is None
    True
    """
    def unwrapped(hail):
        return any(not getattr(getattr(hail, n, None), "_ngp_audited", True) for n in HAIL_ENTRY_POINTS if "." not in n)

    return _wrap_on_import("hail", wrap_hail, "Hail's entry points", unwrapped)
