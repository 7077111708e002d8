"""The researcher's cohort: the project's tagged datasets as one cohort, analysed by Hail on Dask.

>>> from ngp_research.cohort import Cohort
>>> cohort = Cohort.from_workspace()                 # doctest: +SKIP
>>> cohort.samples.groupby("region").size()          # doctest: +SKIP
>>> gwas = cohort.association("cholesterol", covariates=["sex"], pcs=4)   # doctest: +SKIP

Missing genotypes follow PLINK 2's conventions by default (a sample with a
missing call is dropped for that variant in association; PCA standardises
with 0 for a missing call and divides by the variants both samples have
called). ``missing="mean"`` instead runs Hail's own ``linear_regression_rows``
/ ``logistic_regression_rows``, which mean-impute missing calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import engine
from .inputs import CohortDataset, CohortError, phenotype_table, read_manifest, variant_datasets, vcf_contigs

__all__ = ["Cohort", "PCAResult"]

VARIANT_COLUMNS = ["contig", "position", "variant_id", "ref", "alt"]
DEFAULT_SHARDS = 8


@dataclass(frozen=True)
class PCAResult:
    """Principal components of the cohort's relationship matrix (``plink2 --pca`` convention).

    Attributes
    ----------
    eigenvalues : numpy.ndarray
        Largest first.
    scores : pandas.DataFrame
        One row per sample (index: sample), columns ``region`` and ``PC1`` ... ``PCk``:
        the unit-length eigenvectors, as ``plink2 --pca`` writes them.
    variants_used : int
        Variants that passed ``min_maf``.
    """

    eigenvalues: np.ndarray
    scores: pd.DataFrame
    variants_used: int


def _default_cache() -> str:
    if os.environ.get("NGP_COHORT_CACHE"):
        return os.environ["NGP_COHORT_CACHE"]
    if os.path.isdir("/project") and os.access("/project", os.W_OK):
        return "/project/.ngp-cache"
    return str(Path.home() / ".cache" / "ngp-research" / "cohort")


class Cohort:
    """The tagged variant datasets of a project, joined into one cohort with harmonised phenotypes.

    Build it with :meth:`from_workspace` inside a workspace (or
    :meth:`from_datasets` with explicit files). Samples stay distinct and
    traceable: the ``samples`` table has each sample's ``region`` and
    ``dataset``; a sample ID found in two regions is qualified as
    ``<region>/<id>``.

    Parameters
    ----------
    datasets : list of CohortDataset
    workers : int
        Dask workers of the default ``LocalCluster`` (one Hail context each).
    client : distributed.Client, optional
        An existing Dask client; its workers must see the same ``/data`` and
        cache paths. Without one, a Dask Gateway cluster is created when
        ``$NGP_DASK_GATEWAY`` names a gateway, else a local cluster.
    cache_dir : str, optional
        Where converted tables and genotype blocks are kept (default:
        ``$NGP_COHORT_CACHE``, else ``/project/.ngp-cache``).
    shards : int, optional
        Genome shards, each one Dask task (default 8). Results do not depend
        on the number of workers.
    hail_memory : str
        Java heap of each worker's Hail context.
    progress : bool
        Show a progress bar while tasks run.
    """

    def __init__(self, datasets: list[CohortDataset], *, workers: int = 2, client=None, cache_dir=None,
                 shards: int | None = None, hail_memory: str = "2g", progress: bool = True):
        if not datasets:
            raise CohortError("datasets: a cohort needs at least one variant dataset")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: must be a positive integer, got {workers!r}")
        if shards is not None and (not isinstance(shards, int) or shards < 1):
            raise ValueError(f"shards: must be a positive integer, got {shards!r}")
        self.datasets = list(datasets)
        self.cache_dir = str(cache_dir or _default_cache())
        self.progress = progress
        self.genome = self._check_genome()
        self.samples = self._sample_table()
        self._own_cluster = None
        self._scratch = None
        if client is None and os.environ.get("NGP_DASK_GATEWAY"):
            client = self._gateway_client(os.environ["NGP_DASK_GATEWAY"], workers)
        if client is None:
            from distributed import Client, LocalCluster

            scratch = self._scratch = tempfile.mkdtemp(prefix="ngp-dask-")  # removed by close(), or at exit
            weakref.finalize(self, shutil.rmtree, scratch, True)
            self._own_cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                             host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                             local_directory=scratch, memory_limit=0)
            client = Client(self._own_cluster)
        else:  # workers that outlive this cohort keep their Hail scratch in a stable place
            scratch = os.path.join(tempfile.gettempdir(), "ngp-hail")
        client.register_plugin(engine.HailWorker(scratch, memory=hail_memory))
        self.client = client
        # The shards do not depend on the number of workers, so any cluster gives the same numbers.
        self.shards = engine.plan_shards(self.genome, shards or DEFAULT_SHARDS)
        self._tables: list[str] | None = None  # the datasets' converted tables, in dataset order
        self._blocks: list[str] | None = None  # the shards' genotype blocks, in genome order
        self._variants: pd.DataFrame | None = None
        self._shard_sizes: list[int] = []
        self._variant_qc: pd.DataFrame | None = None
        self._pca_cache: dict = {}

    def _gateway_client(self, address: str, workers: int):
        """A client of a new Dask Gateway cluster (``$NGP_DASK_GATEWAY``) scaled to ``workers``."""
        try:
            from dask_gateway import Gateway
        except ImportError:
            raise CohortError("NGP_DASK_GATEWAY is set but the dask-gateway client is not installed in this "
                              "workspace; unset it to use a local cluster") from None
        self._own_cluster = Gateway(address).new_cluster()
        self._own_cluster.scale(workers)
        return self._own_cluster.get_client()

    # --- construction -----------------------------------------------------------------

    @classmethod
    def from_workspace(cls, manifest=None, datasets=None, **options) -> "Cohort":
        """The cohort of the project's tagged variant datasets, from the workspace manifest.

        Parameters
        ----------
        manifest : str or dict, optional
            The manifest or its path (default ``$NGP_WORKSPACE_MANIFEST``).
        datasets : sequence of str, optional
            Only these tagged datasets.
        **options
            Passed to :class:`Cohort` (``workers``, ``client``, ``cache_dir``, ...).

        Examples
        --------
        Inside a workspace of the demo project ``cardio-gwas``:

        >>> cohort = Cohort.from_workspace(workers=2)          # doctest: +SKIP
        >>> sorted(cohort.samples.region.unique())[:2]          # doctest: +SKIP
        ['norr', 'orebro']
        """
        document = manifest if isinstance(manifest, dict) else read_manifest(manifest)
        return cls(variant_datasets(document, datasets), **options)

    def _check_genome(self) -> engine.Genome:
        first = None
        builds = {d.genome_build for d in self.datasets if d.genome_build}
        if len(builds) > 1:
            raise CohortError("datasets: genome builds differ (" + ", ".join(
                f"{d.name}: {d.genome_build}" for d in self.datasets if d.genome_build) + "); a cohort needs one build")
        self._vcf_samples = {}
        for d in self.datasets:
            contigs, samples, reference = vcf_contigs(d.vcf)
            self._vcf_samples[d.name] = samples
            if not samples:
                raise CohortError(f"dataset {d.name}: the VCF has no samples")
            if any(length <= 0 for _, length in contigs):
                raise CohortError(f"dataset {d.name}: every ##contig in the VCF header needs a length")
            if first is None:
                first = (d, contigs, reference)
            elif contigs != first[1] or (reference and first[2] and reference != first[2]):
                raise CohortError(f"datasets {first[0].name} and {d.name} declare different genome builds "
                                  "(contigs, lengths or ##reference differ); a cohort needs one build")
        return engine.Genome.of(first[1])

    def _sample_table(self) -> pd.DataFrame:
        tables = []
        for d in self.datasets:
            ids = self._vcf_samples[d.name]
            base = pd.DataFrame({"sample": ids, "region": d.region, "dataset": d.name})
            if d.metadata:
                with open(d.metadata, encoding="utf-8") as handle:
                    try:
                        document = json.load(handle)
                    except json.JSONDecodeError as e:
                        raise CohortError(f"dataset {d.name}: metadata {d.metadata} is not valid JSON: {e}") from None
                pheno = phenotype_table(document, d.region, d.name).drop(columns=["region", "dataset"])
                base = base.merge(pheno, on="sample", how="left")
            tables.append(base)
        table = pd.concat(tables, ignore_index=True)
        table.insert(1, "original_id", table["sample"])
        duplicated = table["sample"].duplicated(keep=False)
        table.loc[duplicated, "sample"] = table.loc[duplicated, "region"] + "/" + table.loc[duplicated, "sample"]
        if table["sample"].duplicated().any():
            raise CohortError("samples: the same sample ID appears twice within one region's datasets")
        if "sex" in table:
            table["sex"] = table["sex"].fillna("UNKNOWN_SEX")
        return table.set_index("sample")

    # --- the engine ---------------------------------------------------------------------

    @property
    def dashboard_link(self) -> str:
        """The Dask dashboard of this cohort's cluster."""
        return self.client.dashboard_link

    def _repr_html_(self):
        return (f"<b>Cohort</b>: {len(self.samples)} samples from {len(self.datasets)} datasets "
                f"({', '.join(sorted(set(d.region for d in self.datasets)))}), {len(self.shards)} genome shards; "
                f"<a href='{self.dashboard_link}' target='_blank'>Dask dashboard</a>")

    def _gather(self, futures, what: str):
        if self.progress and futures:
            from distributed import progress

            print(f"{what}: {len(futures)} tasks; dashboard {self.dashboard_link}")
            progress(futures)
        return self.client.gather(futures)

    @property
    def key(self) -> str:
        """Cache key of the joined cohort: the datasets' checksums, in order, and the shards."""
        text = json.dumps({"v": engine.FORMAT_VERSION, "datasets": [[d.name, d.sha256] for d in self.datasets],
                           "shards": [[s.contig, s.start, s.end] for s in self.shards],
                           "genome": self.genome.name})
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def prepare(self) -> list[str]:
        """Convert each dataset once (cached by checksum) and export the shards' genotype blocks."""
        if self._blocks is not None:
            return self._blocks
        for d in self.datasets:
            if not d.sha256:
                raise CohortError(f"dataset {d.name}: the manifest gives no checksum for {d.vcf}")
        tables = [self.client.submit(engine.convert_dataset, d.vcf, d.sha256, self.cache_dir, self.genome,
                                     key=f"convert-{d.sha256[:16]}-{self.key}", pure=False) for d in self.datasets]
        tables = self._tables = self._gather(tables, "converting datasets to Hail tables")
        blocks = [self.client.submit(engine.export_shard, shard, tables, self.cache_dir, self.key, self.genome,
                                     pure=False) for shard in self.shards]
        self._blocks = self._gather(blocks, "exporting genome shards")
        return self._blocks

    def _per_block(self, name: str, kwargs: dict, what: str):
        blocks = self.prepare()
        n = len(self.samples)
        futures = [self.client.submit(engine.block_statistic, prefix, n, name, kwargs, pure=False)
                   for prefix in blocks]
        return self._gather(futures, what)

    def variants(self) -> pd.DataFrame:
        """The cohort's variants in genome order: ``contig``, ``position``, ``variant_id``, ``ref``, ``alt``."""
        if self._variants is None:
            parts = [engine.read_variants(prefix) for prefix in self.prepare()]
            self._shard_sizes = [len(p) for p in parts]
            self._variants = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=VARIANT_COLUMNS)
        return self._variants.copy()

    def _with_variants(self, columns: dict) -> pd.DataFrame:
        table = self.variants()
        for name, values in columns.items():
            table[name] = values
        return table

    def genotypes(self, rows) -> np.ndarray:
        """ALT allele counts (-1 missing) of the given :meth:`variants` rows for every sample.

        Parameters
        ----------
        rows : sequence of int
            Row positions in :meth:`variants`.

        Returns
        -------
        numpy.ndarray of int8, shape (len(rows), samples)

        Examples
        --------
        >>> cohort.genotypes([0, 1]).shape
        (2, 24)
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n_variants = len(self.variants())
        if rows.size and (rows.min() < 0 or rows.max() >= n_variants):
            raise ValueError(f"rows: must be row positions between 0 and {n_variants - 1}")
        offsets = np.cumsum([0] + self._shard_sizes)
        shard_of = np.searchsorted(offsets, rows, side="right") - 1
        futures = {}
        for shard in np.unique(shard_of):
            local = (rows[shard_of == shard] - offsets[shard]).tolist()
            futures[int(shard)] = self.client.submit(engine.block_statistic, self._blocks[shard], len(self.samples),
                                                     "rows", {"rows": local}, pure=False)
        parts = dict(zip(futures, self._gather(list(futures.values()), "reading genotypes")))
        out = np.empty((len(rows), len(self.samples)), dtype=np.int8)
        for shard, block in parts.items():
            out[shard_of == shard] = block
        return out

    def clinical_variants(self, panel, annotations, max_af: float = 0.01, significance=None):
        """Candidate clinically relevant variants per carrier; see :func:`.clinical.clinical_variants`.

        Examples
        --------
        >>> hits = cohort.clinical_variants(reference / "demo-panel.bed", reference / "demo-annotations.tsv",
        ...                                 max_af=0.95)
        >>> hits.variant_id.nunique() >= 1, set(hits.genotype) <= {"het", "hom_alt"}
        (True, True)
        """
        from .clinical import PATHOGENIC, clinical_variants

        return clinical_variants(self, panel, annotations, max_af, significance or PATHOGENIC)

    # --- analyses --------------------------------------------------------------------

    def variant_qc(self) -> pd.DataFrame:
        """Per-variant call counts, allele frequency and Hardy-Weinberg p-value.

        Returns
        -------
        pandas.DataFrame
            The :meth:`variants` columns and ``n_called``, ``n_not_called``,
            ``call_rate``, ``n_hom_ref``, ``n_het``, ``n_hom_var``, ``ac``
            (ALT alleles called), ``an`` (alleles called), ``af`` (``ac/an``,
            as ``bcftools +fill-tags``), ``p_hwe`` (two-sided exact test, as
            ``plink2 --hardy``).

        Examples
        --------
        >>> qc = cohort.variant_qc()
        >>> len(qc), bool((qc.an == 2 * qc.n_called).all()), int((qc.call_rate < 0.95).sum())
        (120, True, 0)
        """
        from .statistics import hardy_weinberg

        if self._variant_qc is not None:
            return self._variant_qc.copy()
        parts = self._per_block("counts", {}, "variant QC")
        counts = {k: np.concatenate([p[k] for p in parts]) if parts else np.empty(0, int)
                  for k in ("n_called", "n_hom_ref", "n_het", "n_hom_var", "ac", "an")}
        n = len(self.samples)
        with np.errstate(invalid="ignore", divide="ignore"):
            af = counts["ac"] / counts["an"]
        self._variant_qc = self._with_variants({
            "n_called": counts["n_called"],
            "n_not_called": n - counts["n_called"],
            "call_rate": counts["n_called"] / n,
            "n_hom_ref": counts["n_hom_ref"],
            "n_het": counts["n_het"],
            "n_hom_var": counts["n_hom_var"],
            "ac": counts["ac"],
            "an": counts["an"],
            "af": af,
            "p_hwe": hardy_weinberg(counts["n_het"], counts["n_hom_ref"], counts["n_hom_var"]),
        })
        return self._variant_qc.copy()

    def hardy_weinberg(self) -> pd.DataFrame:
        """Hardy-Weinberg equilibrium per variant, as ``plink2 --hardy``.

        Returns
        -------
        pandas.DataFrame
            The :meth:`variants` columns and ``n_hom_ref``, ``n_het``,
            ``n_hom_var``, ``o_het`` and ``e_het`` (observed and expected
            heterozygote frequency), ``p_value`` (two-sided exact, not mid-p).

        Examples
        --------
        >>> hwe = cohort.hardy_weinberg()
        >>> bool(hwe.p_value.between(0, 1).all()), list(hwe.columns[-3:])
        (True, ['o_het', 'e_het', 'p_value'])
        """
        qc = self.variant_qc()
        with np.errstate(invalid="ignore", divide="ignore"):
            p = qc.ac / qc.an
            o_het = qc.n_het / qc.n_called
        table = qc[VARIANT_COLUMNS + ["n_hom_ref", "n_het", "n_hom_var"]].copy()
        table["o_het"] = o_het
        table["e_het"] = 2 * p * (1 - p)
        table["p_value"] = qc.p_hwe
        return table

    def sample_qc(self) -> pd.DataFrame:
        """Per-sample call counts over all variants.

        Returns
        -------
        pandas.DataFrame
            Index ``sample``; ``region``, ``n_called``, ``n_not_called``,
            ``call_rate``, ``n_hom_ref``, ``n_het``, ``n_hom_var``,
            ``n_non_ref``, ``r_het_hom_var`` (het / hom-var ratio).

        Examples
        --------
        >>> cohort.sample_qc().groupby("region").call_rate.mean().to_dict()
        {'norr': 1.0, 'syd': 1.0, 'uppsala': 1.0}
        """
        parts = self._per_block("samples", {}, "sample QC")
        n = len(self.samples)
        total = {k: sum((p[k] for p in parts), np.zeros(n, dtype=np.int64))
                 for k in ("n_hom_ref", "n_het", "n_hom_var", "n_not_called")}
        table = pd.DataFrame(index=self.samples.index)
        table["region"] = self.samples.region
        n_called = total["n_hom_ref"] + total["n_het"] + total["n_hom_var"]
        table["n_called"] = n_called
        table["n_not_called"] = total["n_not_called"]
        with np.errstate(invalid="ignore", divide="ignore"):
            table["call_rate"] = n_called / (n_called + total["n_not_called"])
            table["n_hom_ref"] = total["n_hom_ref"]
            table["n_het"] = total["n_het"]
            table["n_hom_var"] = total["n_hom_var"]
            table["n_non_ref"] = total["n_het"] + total["n_hom_var"]
            table["r_het_hom_var"] = np.where(total["n_hom_var"] > 0, total["n_het"] / np.maximum(total["n_hom_var"], 1),
                                              np.nan)
        return table

    def allele_frequencies(self, by="region") -> pd.DataFrame:
        """ALT allele frequency in the whole cohort and in each group of samples.

        Parameters
        ----------
        by : str
            A column of :attr:`samples` that names groups: ``region`` (default),
            ``population`` when the metadata carries one, ``sex``, ...

        Returns
        -------
        pandas.DataFrame
            The :meth:`variants` columns, ``ac``, ``an``, ``af`` for the cohort,
            then ``ac_<group>``, ``an_<group>``, ``af_<group>`` for each group
            (``af`` = ``ac/an`` over called alleles, NaN when none is called,
            as ``bcftools +fill-tags -t AF,AC,AN``).

        Examples
        --------
        >>> cohort.allele_frequencies(by="region").filter(like="an_").iloc[0].to_dict()
        {'an_norr': 16, 'an_syd': 16, 'an_uppsala': 16}
        """
        if by not in self.samples.columns:
            raise ValueError(f"by: {by!r} is not a sample column (columns: {', '.join(self.samples.columns)})")
        labels = self.samples[by].astype(str).to_numpy()
        groups = {"": np.arange(len(labels))}
        for value in sorted(set(labels)):
            groups[value] = np.flatnonzero(labels == value)
        parts = self._per_block("groups", {"groups": groups}, "allele frequencies")
        columns = {}
        for name in groups:
            ac = np.concatenate([p[name][0] for p in parts]) if parts else np.empty(0)
            an = np.concatenate([p[name][1] for p in parts]) if parts else np.empty(0)
            suffix = f"_{name}" if name else ""
            columns[f"ac{suffix}"] = ac
            columns[f"an{suffix}"] = an
            with np.errstate(invalid="ignore", divide="ignore"):
                columns[f"af{suffix}"] = ac / an
        return self._with_variants(columns)

    def _design(self, phenotype, covariates, pcs):
        if phenotype not in self.samples.columns:
            raise ValueError(f"phenotype: {phenotype!r} is not a sample column "
                             f"(columns: {', '.join(self.samples.columns)})")
        y = self.samples[phenotype]
        columns = []
        for name in covariates:
            if name not in self.samples.columns:
                raise ValueError(f"covariates: {name!r} is not a sample column")
            values = self.samples[name]
            if name == "sex":
                values = values.map({"MALE": 1.0, "FEMALE": 0.0})
            columns.append(pd.to_numeric(values, errors="raise").astype(float).to_numpy())
        if pcs:
            scores = self.pca(k=pcs).scores
            columns += [scores[f"PC{i + 1}"].to_numpy() for i in range(pcs)]
        design = np.column_stack(columns) if columns else None
        return y, design

    def association(self, phenotype: str, covariates=(), pcs: int = 0, model: str | None = None,
                    missing: str = "drop") -> pd.DataFrame:
        """Test every variant's ALT dosage for association with a phenotype.

        Parameters
        ----------
        phenotype : str
            A sample column: a number (linear model) or True/False (logistic model).
        covariates : sequence of str
            Sample columns added to the model (``sex`` is coded MALE = 1, FEMALE = 0).
        pcs : int
            Add the first ``pcs`` principal components (:meth:`pca`) as covariates.
        model : {"linear", "logistic"}, optional
            Default: logistic for a True/False phenotype, linear otherwise.
        missing : {"drop", "mean"}
            ``"drop"`` (default, ``plink2 --glm``): a sample with a missing call is
            left out for that variant; ``"mean"``: Hail's own row regression in the
            workers, which mean-imputes missing calls.

        Returns
        -------
        pandas.DataFrame
            The :meth:`variants` columns and ``n`` (samples used), ``beta`` (per
            ALT allele; log odds for logistic), ``se``, ``t_stat`` (linear) or
            ``z_stat`` and ``converged`` (logistic), ``p_value``. NaN where the
            fit is impossible (constant variant; PLINK 2 would use Firth
            regression where a logistic fit does not converge).

        Examples
        --------
        >>> gwas = cohort.association("cholesterol", covariates=["sex"], pcs=2)
        >>> len(gwas), int(gwas.n.max())
        (120, 24)
        """
        if isinstance(covariates, str):
            covariates = [covariates]
        if not isinstance(pcs, int) or pcs < 0:
            raise ValueError(f"pcs: must be a non-negative integer, got {pcs!r}")
        if missing not in ("drop", "mean"):
            raise ValueError(f"missing: must be 'drop' (PLINK 2) or 'mean' (Hail), got {missing!r}")
        y, design = self._design(phenotype, list(covariates), pcs)
        if model is None:
            model = "logistic" if y.dtype == bool else "linear"
        if model not in ("linear", "logistic"):
            raise ValueError(f"model: must be 'linear' or 'logistic', got {model!r}")
        y = pd.to_numeric(y.astype(float) if y.dtype == bool else y, errors="raise").astype(float).to_numpy()
        if missing == "mean":
            return self._hail_association(y, design, model)
        parts = self._per_block(model, {"y": y, "covariates": design}, f"{model} association")
        keys = ["n", "beta", "se", "t_stat" if model == "linear" else "z_stat", "p_value"]
        if model == "logistic":
            keys.append("converged")
        return self._with_variants({k: np.concatenate([p[k] for p in parts]) if parts else np.empty(0)
                                    for k in keys})

    def _hail_association(self, y, design, model):
        self.prepare()
        tables = self._tables
        keep = np.isfinite(y) & (np.isfinite(design).all(axis=1) if design is not None else True)
        samples = [s for s, k in zip(self.samples.original_id, keep) if k]
        if len(set(samples)) != len(samples):
            raise CohortError("missing='mean' needs sample IDs unique across regions")
        cov = design[keep].tolist() if design is not None else [[] for _ in samples]
        futures = [self.client.submit(engine.hail_regression, shard, tables, samples, y[keep].tolist(), cov,
                                      model, self.genome, pure=False) for shard in self.shards]
        parts = self._gather(futures, f"Hail {model} regression")
        table = pd.concat(parts, ignore_index=True)
        return self.variants().merge(table, on=["contig", "position", "ref", "alt"], how="left")

    def pca(self, k: int = 10, min_maf: float = 0.01) -> PCAResult:
        """Principal components of the samples, as ``plink2 --maf MIN_MAF --pca K``.

        The relationship matrix is built shard by shard on the workers (each
        variant standardised as (dosage - 2p)/sqrt(2p(1-p)), 0 for a missing
        call, each sample pair divided by the variants both have called) and
        summed in genome order; its eigendecomposition is exact.

        Parameters
        ----------
        k : int
            Number of components.
        min_maf : float
            Leave out variants with a minor allele frequency below this.

        Examples
        --------
        >>> result = cohort.pca(k=4)
        >>> result.scores.shape, bool((result.eigenvalues[:-1] >= result.eigenvalues[1:]).all())
        ((24, 5), True)
        """
        n = len(self.samples)
        if not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"k: must be an integer between 1 and the number of samples ({n}), got {k!r}")
        if not 0 <= min_maf <= 0.5:
            raise ValueError(f"min_maf: must be between 0 and 0.5, got {min_maf!r}")
        cached = self._pca_cache.get((k, min_maf))
        if cached is not None:
            return cached
        blocks = self.prepare()
        parts = [self.client.submit(engine.block_statistic, prefix, n, "gram", {"min_maf": min_maf}, pure=False)
                 for prefix in blocks]
        total = parts[0]
        for part in parts[1:]:
            total = self.client.submit(engine.add_grams, total, part, pure=False)
        result = self.client.submit(engine.eigen, total, k, pure=False)
        values, vectors, used = self._gather([result], "PCA")[0]
        scores = pd.DataFrame(vectors, index=self.samples.index, columns=[f"PC{i + 1}" for i in range(k)])
        scores.insert(0, "region", self.samples.region)
        out = PCAResult(values, scores, used)
        self._pca_cache[(k, min_maf)] = out
        return out

    # --- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop the cohort's own Dask cluster (and with it the workers' Hail contexts)."""
        if self._own_cluster is not None:
            self.client.close()
            self._own_cluster.close()
            self._own_cluster = None
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
