"""Hail inside Dask workers: the tasks a :class:`~ngp_research.cohort.Cohort` schedules.

The split, chosen by measurement (``benchmarks/cohort.py``, ``benchmarks/RESULTS.md``):

- **Hail** reads and writes the genomic data. Each Dask worker holds one Hail
  context (Spark ``local[1]`` in the worker process, created lazily on the
  worker's executor thread by the first task, never on the event loop). Hail
  converts each dataset's VCF once to its native MatrixTable (keyed by the
  file's checksum), joins the regions' cohorts, and cuts the joined cohort
  into genome shards, each exported once as a compact 2-bit genotype block
  (PLINK 1 ``.bed``). With ``missing="mean"`` Hail's own row regressions run
  per shard.
- **Dask** schedules one task per dataset or shard on any worker and combines
  the results; the statistics (:mod:`ngp_research.cohort.statistics`) run as
  numpy kernels on the workers, on one decoded block at a time.

Every function here runs on a worker and takes only plain, picklable
arguments, so nothing assumes the workers share the client's machine: only
that they see the same paths (the workspace's ``/data`` and ``/project``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["Genome", "Shard", "HailWorker", "convert_dataset", "export_shard", "read_block", "FORMAT_VERSION"]

FORMAT_VERSION = 1  # bump when the cached layout changes: old caches are then simply not found

_LOCK = threading.Lock()
_STATE: dict = {"config": None, "started": False}


@dataclass(frozen=True)
class Genome:
    """The genome build a cohort's VCFs declare: a name and the ordered contigs with their lengths.

    Examples
    --------
    >>> Genome.of([("chr1", 1000), ("chr2", 500)]).name
    'ngp_3c0a3b2f28a6'
    """

    name: str
    contigs: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, contigs) -> "Genome":
        contigs = tuple((str(c), int(n)) for c, n in contigs)
        digest = hashlib.sha256(json.dumps(contigs).encode()).hexdigest()[:12]
        return cls(f"ngp_{digest}", contigs)


@dataclass(frozen=True)
class Shard:
    """A contiguous genome interval, 1-based and inclusive: one task's share of the cohort.

    Examples
    --------
    >>> Shard(0, "chr1", 1, 500).label
    'chr1:1-500'
    """

    index: int
    contig: str
    start: int
    end: int

    @property
    def label(self) -> str:
        return f"{self.contig}:{self.start}-{self.end}"


def plan_shards(genome: Genome, count: int) -> list[Shard]:
    """Cut the genome into about ``count`` intervals of equal length, never across contigs.

    Examples
    --------
    >>> g = Genome.of([("chr1", 1000), ("chr2", 500)])
    >>> [s.label for s in plan_shards(g, 3)]
    ['chr1:1-500', 'chr1:501-1000', 'chr2:1-500']
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"shards: must be a positive integer, got {count!r}")
    total = sum(n for _, n in genome.contigs)
    step = max(1, -(-total // count))
    shards = []
    for contig, length in genome.contigs:
        start = 1
        while start <= length:
            end = min(length, start + step - 1)
            if length - end < step // 4:  # no sliver at a contig's end
                end = length
            shards.append(Shard(len(shards), contig, start, end))
            start = end + 1
    return shards


class HailWorker(WorkerPlugin):
    """Gives each Dask worker one Hail context, started by the worker's first Hail task.

    Parameters
    ----------
    tmp_dir : str
        Hail's and Spark's scratch folder (a subfolder per worker is made).
    memory : str
        The worker JVM's heap (``spark.driver.memory``); Dask's ``memory_limit``
        does not cover it.
    cores : int
        Spark ``local[cores]`` inside the worker.
    """

    name = "ngp-hail"

    def __init__(self, tmp_dir: str, memory: str = "1g", cores: int = 1):
        self.config = {"tmp_dir": str(tmp_dir), "memory": str(memory), "cores": int(cores)}

    def setup(self, worker):
        _STATE["config"] = dict(self.config, worker=worker.name)

    def teardown(self, worker):
        # The JVM watches its stdin and exits with the worker process; stopping it here synchronously
        # is known to leave JVMs behind, so nothing is done.
        pass


def hail():
    """The worker's Hail module, initialised on first use (on the calling, executor, thread)."""
    import hail as hl

    with _LOCK:
        if not _STATE["started"]:
            config = _STATE["config"] or {"tmp_dir": os.environ.get("TMPDIR", "/tmp"), "memory": "1g", "cores": 1,
                                          "worker": "client"}
            scratch = Path(config["tmp_dir"]) / f"hail-{os.getpid()}"
            scratch.mkdir(parents=True, exist_ok=True)
            hl.init(
                master=f"local[{config['cores']}]",
                app_name="ngp-cohort",
                tmp_dir=str(scratch),
                local_tmpdir=str(scratch),
                log=str(scratch / "hail.log"),
                quiet=True,
                idempotent=True,
                spark_conf={
                    "spark.driver.memory": config["memory"],
                    "spark.ui.enabled": "false",
                    "spark.driver.host": "127.0.0.1",
                    "spark.driver.bindAddress": "127.0.0.1",
                    "spark.local.dir": str(scratch),
                },
            )
            _STATE["started"] = True
    return hl


def _reference(hl, genome: Genome):
    for builtin in ("GRCh38", "GRCh37"):
        rg = hl.get_reference(builtin)
        if tuple((c, rg.lengths[c]) for c in rg.contigs[: len(genome.contigs)]) == genome.contigs:
            return rg
    try:
        return hl.get_reference(genome.name)
    except KeyError:
        return hl.ReferenceGenome(genome.name, [c for c, _ in genome.contigs],
                                  {c: n for c, n in genome.contigs})


def _record(path, **detail):
    """Tell the audit hook (when the worker runs one) which data file the cohort loader opens."""
    from ..kernel.entrypoints import record_data_access

    record_data_access(str(path), via="ngp_research.cohort", **detail)


def _shared_folder(path: Path) -> None:
    """Create the cache folder (and its parents) so that every member of the project can add to it."""
    missing = [p for p in [path, *path.parents] if not p.exists()][::-1]
    for folder in missing:
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        try:
            os.chmod(folder, 0o2775)  # group-writable, new entries keep the project's group
        except PermissionError:
            pass


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished folder into place; if another task got there first, keep theirs."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def convert_dataset(vcf: str, sha256: str, cache_dir: str, genome: Genome) -> str:
    """Convert one dataset's VCF to a Hail MatrixTable once per file version; return its path.

    The table is ``<cache_dir>/datasets/<sha256>-v<FORMAT_VERSION>.mt``: the same
    file content is never converted twice, and a new version of the dataset
    (another checksum) gets its own table. Multi-allelic sites are split.
    """
    target = Path(cache_dir) / "datasets" / f"{sha256}-v{FORMAT_VERSION}.mt"
    if (target / "_SUCCESS").exists():
        return str(target)
    hl = hail()
    _record(vcf, action="convert")
    _shared_folder(target.parent)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}"
    mt = hl.import_vcf(vcf, reference_genome=_reference(hl, genome), force_bgz=True, array_elements_required=False)
    mt = mt.select_entries("GT").select_rows("rsid")
    try:  # split multi-allelic sites in the same pass as the write; biallelic data pass through
        hl.split_multi_hts(mt).select_rows("rsid").select_entries("GT").write(str(tmp), overwrite=True)
    except Exception as e:  # splitting moved a site out of order: let Hail shuffle
        if "permit_shuffle" not in str(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        mt = hl.split_multi_hts(mt, permit_shuffle=True)
        mt.select_rows("rsid").select_entries("GT").write(str(tmp), overwrite=True)
    _publish(tmp, target)
    return str(target)


def _joined_shard(hl, shard: Shard, tables: list[str], genome: Genome):
    """The datasets' tables read over one shard's interval only, joined column-wise (regions side by side)."""
    rg = _reference(hl, genome)
    interval = hl.Interval(hl.Locus(shard.contig, shard.start, rg), hl.Locus(shard.contig, shard.end, rg),
                           includes_start=True, includes_end=True)
    parts = []
    for table in tables:
        _record(table, action="read", region=shard.label)
        parts.append(hl.read_matrix_table(table, _intervals=[interval]))
    mt = parts[0]
    for other in parts[1:]:
        mt = mt.union_cols(other, row_join_type="outer")
    return mt


def export_shard(shard: Shard, tables: list[str], cache_dir: str, key: str, genome: Genome) -> str:
    """Join the datasets' tables over one shard and export its genotypes once as a 2-bit block.

    Returns the block's path prefix (``.bed``, ``.bim``, ``.fam`` beside it);
    a block already exported for the same inputs is reused.
    """
    folder = Path(cache_dir) / "cohorts" / key
    target = folder / f"shard-{shard.index:05d}"
    if (target / "_SUCCESS").exists():
        return str(target / "block")
    hl = hail()
    mt = _joined_shard(hl, shard, tables, genome)
    varid = hl.if_else(hl.is_defined(mt.rsid) & (mt.rsid != "."), mt.rsid,
                       hl.delimit([mt.locus.contig, hl.str(mt.locus.position), mt.alleles[0], mt.alleles[1]], "_"))
    _shared_folder(folder)
    tmp = folder / f".{target.name}.{uuid.uuid4().hex}"
    tmp.mkdir()
    hl.export_plink(mt, str(tmp / "block"), ind_id=mt.s, varid=varid)
    (tmp / "_SUCCESS").touch()
    _publish(tmp, target)
    return str(target / "block")


# 2-bit PLINK codes -> ALT allele count. Hail writes A1 = ALT: 00 hom A1, 01 missing, 10 het, 11 hom A2 (REF).
_CODES = np.array([2, -1, 1, 0], dtype=np.int8)
_LOOKUP = np.stack([_CODES[(np.arange(256) >> (2 * k)) & 3] for k in range(4)], axis=1)


def read_block(prefix: str, n_samples: int) -> np.ndarray:
    """Decode a ``.bed`` block into ALT allele counts, shape (variants, samples), -1 for missing.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = open(f"{tmp}/b.bed", "wb").write(bytes([0x6C, 0x1B, 0x01, 0b11100100]))
    ...     read_block(f"{tmp}/b", 3).tolist()
    [[2, -1, 1]]
    """
    raw = np.fromfile(f"{prefix}.bed", dtype=np.uint8)
    if raw[:3].tolist() != [0x6C, 0x1B, 0x01]:
        raise ValueError(f"{prefix}.bed is not a variant-major PLINK 1 .bed file")
    per_variant = (n_samples + 3) // 4
    body = raw[3:]
    if per_variant == 0 or len(body) % per_variant:
        raise ValueError(f"{prefix}.bed does not hold whole variants of {n_samples} samples")
    return _LOOKUP[body.reshape(-1, per_variant)].reshape(len(body) // per_variant, -1)[:, :n_samples]


def read_variants(prefix: str):
    """The ``.bim`` of a block as a DataFrame: contig, position, variant_id, ref, alt."""
    import pandas as pd

    bim = pd.read_csv(f"{prefix}.bim", sep="\t", header=None, dtype={0: str, 1: str, 4: str, 5: str},
                      names=["contig", "variant_id", "cm", "position", "alt", "ref"], keep_default_na=False)
    return bim[["contig", "position", "variant_id", "ref", "alt"]]


def hail_regression(shard: Shard, tables: list[str], samples: list[str], y: list, covariates: list,
                    model: str, genome: Genome):
    """Hail's own row regression on one shard (missing calls mean-imputed, Hail's convention)."""
    import pandas as pd

    hl = hail()
    mt = _joined_shard(hl, shard, tables, genome)
    values = hl.literal({s: hl.Struct(y=v, c=c) for s, v, c in zip(samples, y, covariates)},
                        dtype=hl.tdict(hl.tstr, hl.tstruct(y=hl.tfloat64, c=hl.tarray(hl.tfloat64))))
    mt = mt.annotate_cols(ph=values.get(mt.s))
    mt = mt.annotate_rows(contig=mt.locus.contig, position=mt.locus.position, ref=mt.alleles[0], alt=mt.alleles[1])
    place = ["contig", "position", "ref", "alt"]
    n_cov = len(covariates[0]) if covariates else 0
    x = hl.float64(mt.GT.n_alt_alleles())
    cov = [1.0] + [mt.ph.c[i] for i in range(n_cov)]
    if model == "linear":
        t = hl.linear_regression_rows(y=mt.ph.y, x=x, covariates=cov, pass_through=place)
        t = t.select(*place, n=t.n, beta=t.beta, se=t.standard_error, t_stat=t.t_stat, p_value=t.p_value)
    else:
        t = hl.logistic_regression_rows("wald", y=mt.ph.y, x=x, covariates=cov, pass_through=place)
        t = t.select(*place, beta=t.beta, se=t.standard_error, z_stat=t.z_stat, p_value=t.p_value,
                     converged=t.fit.converged)
    return pd.DataFrame(t.key_by().drop("locus", "alleles").to_pandas())


def _group_counts(block, groups):
    from .statistics import genotype_counts

    out = {}
    for name, index in groups.items():
        counts = genotype_counts(block[:, index])
        out[name] = (counts["ac"], counts["an"])
    return out


def block_statistic(prefix: str, n_samples: int, name: str, kwargs: dict):
    """Decode one shard's block on the worker and run one statistic of :mod:`.statistics` on it."""
    from . import statistics

    block = read_block(prefix, n_samples)
    if name == "groups":
        return _group_counts(block, kwargs["groups"])
    if name == "rows":
        return block[np.asarray(kwargs["rows"], dtype=np.int64)]
    if name == "gram":
        columns = kwargs.get("columns")
        return statistics.gram_block(block if columns is None else block[:, columns], kwargs.get("min_maf", 0.0))
    function = {
        "counts": statistics.genotype_counts,
        "samples": statistics.sample_counts,
        "linear": statistics.linear_association,
        "logistic": statistics.logistic_association,
    }[name]
    return function(block, **kwargs)


def add_grams(*parts):
    """Sum the shards' shares of the relationship matrix, in shard order (so any worker count gives the same bits)."""
    gram, both, used = parts[0]
    gram = gram.copy()
    for g, b, u in parts[1:]:
        gram += g
        both = both + b  # a number (no missing call) or a matrix
        used += u
    return gram, both, used


def eigen(total, k: int):
    """Eigendecomposition of the summed relationship matrix, on a worker: (values, vectors, variants used)."""
    from .statistics import relationship_pca

    gram, both, used = total
    values, vectors = relationship_pca(gram, both, k)
    return values, vectors, used
