"""Simulated regional cohorts for ``ngp demo seed``.

One msprime simulation per contig models all regions jointly (one deme per
region, stepping-stone migration in the order the regions are given), so the
cohorts share realistic linkage disequilibrium and show population structure.
Each region gets a bgzipped, tabix-indexed VCF and a GA4GH Phenopacket v2
``Cohort`` JSON document carrying a quantitative trait (serum cholesterol) and
a binary trait (hypertrophic cardiomyopathy), both driven by a handful of
planted causal variants.  Everything is derived from one integer seed, and the
same arguments always produce byte-identical files.

Examples
--------
>>> import tempfile
>>> from ngp_research.demo.simulate import simulate_cohorts
>>> with tempfile.TemporaryDirectory() as tmp:
...     cohorts, planted = simulate_cohorts(tmp, regions=("norr", "syd"),
...                                         samples_per_region=10, variants=200)
...     [c.samples[0] for c in cohorts], len(planted)
(['NOR-0001', 'SYD-0001'], 5)
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import msprime
import numpy as np
import pysam
import tskit

__all__ = [
    "DEFAULT_REGIONS",
    "PlantedVariant",
    "SimulatedCohort",
    "simulate_cohorts",
]

DEFAULT_REGIONS = ("norr", "uppsala", "orebro", "stockholm", "ost", "vast", "syd")

# --- population-genetic model -------------------------------------------------
_NE = 10_000  # diploid effective size of each regional deme
_RECOMBINATION_RATE = 1e-8  # per bp per generation
_MUTATION_RATE = 1.25e-8  # per bp per generation
_MIGRATION_RATE = 5e-4  # between neighbouring regions, per generation
_MAX_ATTEMPTS = 8

# --- trait model ---------------------------------------------------------------
_N_CAUSAL = 5
_MIN_CAUSAL_MAF = 0.1
_MAX_CAUSAL_R2 = 0.05  # causal variants are chosen nearly independent
_MAX_CAUSAL_TRIES = 2000
# Share of the genetic variance carried by each causal variant (strongest first).
_CAUSAL_WEIGHTS = (0.40, 0.25, 0.15, 0.12, 0.08)
_H2_QUANTITATIVE = 0.40  # variance explained by the causal variants
_H2_LIABILITY = 0.60
_CASE_FRACTION = 0.30
_CHOLESTEROL_MEAN = 190.0  # mg/dL
_CHOLESTEROL_SD = 35.0  # mg/dL

_CREATED = "2024-01-01T00:00:00Z"  # fixed so that reruns are byte-identical
_CREATED_BY = "ngp demo seed"

_QUANT_ASSAY = {"id": "LOINC:2093-3", "label": "Cholesterol [Mass/volume] in Serum or Plasma"}
_QUANT_UNIT = {"id": "UCUM:mg/dL", "label": "mg/dL"}
_CASE_TERM = {"id": "HP:0001639", "label": "Hypertrophic cardiomyopathy"}
_CASE_DISEASE = {"id": "MONDO:0005045", "label": "hypertrophic cardiomyopathy"}
_BACKGROUND_TERMS = (
    {"id": "HP:0000822", "label": "Hypertension"},
    {"id": "HP:0001513", "label": "Obesity"},
    {"id": "HP:0002099", "label": "Asthma"},
    {"id": "HP:0002315", "label": "Headache"},
    {"id": "HP:0000365", "label": "Hearing impairment"},
    {"id": "HP:0005978", "label": "Type II diabetes mellitus"},
)
_RESOURCES = (
    {
        "id": "hp",
        "name": "human phenotype ontology",
        "url": "http://purl.obolibrary.org/obo/hp.owl",
        "version": "2024-04-26",
        "namespacePrefix": "HP",
        "iriPrefix": "http://purl.obolibrary.org/obo/HP_",
    },
    {
        "id": "mondo",
        "name": "Mondo Disease Ontology",
        "url": "http://purl.obolibrary.org/obo/mondo.obo",
        "version": "2024-05-08",
        "namespacePrefix": "MONDO",
        "iriPrefix": "http://purl.obolibrary.org/obo/MONDO_",
    },
    {
        "id": "loinc",
        "name": "Logical Observation Identifiers Names and Codes",
        "url": "https://loinc.org",
        "version": "2.77",
        "namespacePrefix": "LOINC",
        "iriPrefix": "https://loinc.org/",
    },
    {
        "id": "ucum",
        "name": "Unified Code for Units of Measure",
        "url": "https://ucum.org",
        "version": "2.1",
        "namespacePrefix": "UCUM",
        "iriPrefix": "https://ucum.org/",
    },
)

_KNOWN_PREFIXES = {
    "norr": "NOR",
    "uppsala": "UPP",
    "orebro": "ORE",
    "stockholm": "STO",
    "ost": "OST",
    "vast": "VAS",
    "syd": "SYD",
}
_REGION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CONTIG_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.*+=|-]*$")
_CHUNK = 512  # variants per vectorised VCF write block


@dataclass(frozen=True)
class PlantedVariant:
    """A causal variant planted in the simulated traits.

    Attributes
    ----------
    contig, pos : str, int
        Location (1-based) as written in the VCFs.
    ref, alt : str
        Alleles; effects are per copy of ``alt``.
    beta_quantitative : float
        Additive effect on serum cholesterol, mg/dL per ``alt`` allele.
    log_odds_binary : float
        Additive effect on the logistic liability of hypertrophic
        cardiomyopathy per ``alt`` allele.

    Examples
    --------
    >>> PlantedVariant("chr1", 1234, "A", "G", 12.5, 0.8).alt
    'G'
    """

    contig: str
    pos: int
    ref: str
    alt: str
    beta_quantitative: float
    log_odds_binary: float


@dataclass(frozen=True)
class SimulatedCohort:
    """Files written for one region.

    Attributes
    ----------
    region : str
        Region name.
    vcf : Path
        ``<out_dir>/<region>/<region>-cohort.vcf.gz`` (BGZF).
    index : Path
        Tabix index, ``vcf`` + ``".tbi"``.
    metadata : Path
        ``<out_dir>/<region>/<region>-phenopackets.json``, a Phenopacket v2
        ``Cohort`` in proto3 JSON.
    samples : tuple of str
        Sample IDs in VCF column order (also the phenopacket subject IDs).

    Examples
    --------
    >>> from pathlib import Path
    >>> SimulatedCohort("syd", Path("syd.vcf.gz"), Path("syd.vcf.gz.tbi"),
    ...                 Path("syd.json"), ("SYD-0001",)).samples
    ('SYD-0001',)
    """

    region: str
    vcf: Path
    index: Path
    metadata: Path
    samples: tuple[str, ...]


# ---------------------------------------------------------------------------
# argument checking
# ---------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_names(values: object, argument: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{argument} must be a sequence of names, got {values!r}")
    names = tuple(values)
    if not names:
        raise ValueError(f"{argument} must not be empty")
    for name in names:
        if not isinstance(name, str) or not pattern.match(name) or name in (".", ".."):
            raise ValueError(f"{argument} contains an invalid name: {name!r}")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{argument} contains a duplicated name: {name!r}")
        seen.add(name)
    return names


def _check_arguments(
    regions: object, samples_per_region: object, variants: object, seed: object, contigs: object
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    region_names = _check_names(regions, "regions", _REGION_RE)
    lowered = [r.lower() for r in region_names]
    if len(set(lowered)) != len(lowered):
        raise ValueError("regions contains names that differ only in case")
    if not _is_int(samples_per_region) or samples_per_region < 2:
        raise ValueError(f"samples_per_region must be an integer >= 2, got {samples_per_region!r}")
    if not _is_int(variants) or variants < 10:
        raise ValueError(f"variants must be an integer >= 10, got {variants!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    contig_names = _check_names(contigs, "contigs", _CONTIG_RE)
    if len(contig_names) > variants:
        raise ValueError(f"contigs: {len(contig_names)} contigs cannot share {variants} variants")
    return region_names, contig_names


def _sample_prefixes(regions: Sequence[str]) -> list[str]:
    """Unique 3-character uppercase sample-ID prefixes, one per region."""
    used: set[str] = set()
    prefixes = []
    for region in regions:
        base = _KNOWN_PREFIXES.get(region.lower())
        if base is None:
            letters = "".join(ch for ch in region.upper() if ch.isalnum())
            base = (letters + "XXX")[:3]
        candidate = base
        if candidate in used:
            suffixes = "23456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
            for stem_len, pool in ((2, suffixes), (1, None)):
                found = None
                if pool is not None:
                    for ch in pool:
                        if base[:2] + ch not in used:
                            found = base[:2] + ch
                            break
                else:
                    for a in suffixes:
                        for b in suffixes:
                            if base[:1] + a + b not in used:
                                found = base[:1] + a + b
                                break
                        if found:
                            break
                if found:
                    candidate = found
                    break
        used.add(candidate)
        prefixes.append(candidate)
    return prefixes


# ---------------------------------------------------------------------------
# simulation
# ---------------------------------------------------------------------------


@dataclass
class _Contig:
    name: str
    length: int
    ts: object  # tskit.TreeSequence restricted to the kept sites
    positions: np.ndarray  # 1-based, int64
    refs: list[str]
    alts: list[str]
    alt_counts: np.ndarray  # alt allele count over all haplotypes


def _demography(n_regions: int) -> msprime.Demography:
    demography = msprime.Demography()
    for i in range(n_regions):
        demography.add_population(name=f"region{i}", initial_size=_NE)
    for i in range(n_regions - 1):
        demography.set_symmetric_migration_rate([i, i + 1], _MIGRATION_RATE)
    return demography


def _watterson_length(target: int, n_regions: int, samples_per_region: int) -> int:
    n_haplotypes = 2 * n_regions * samples_per_region
    harmonic = sum(1.0 / i for i in range(1, n_haplotypes))
    theta_per_bp = 4 * _NE * n_regions * _MUTATION_RATE
    return max(1_000, int(math.ceil(1.2 * target / (theta_per_bp * harmonic))))


def _simulate_contig(
    name: str, index: int, target: int, seed: int, n_regions: int, samples_per_region: int
) -> _Contig:
    demography = _demography(n_regions)
    samples = {f"region{i}": samples_per_region for i in range(n_regions)}
    n_haplotypes = 2 * n_regions * samples_per_region
    length = _watterson_length(target, n_regions, samples_per_region)
    for attempt in range(_MAX_ATTEMPTS):
        anc_seed, mut_seed = (
            int(x) % (2**32 - 1) + 1
            for x in np.random.SeedSequence([seed, index, attempt]).generate_state(2)
        )
        ts = msprime.sim_ancestry(
            samples=samples,
            demography=demography,
            sequence_length=length,
            recombination_rate=_RECOMBINATION_RATE,
            random_seed=anc_seed,
        )
        ts = msprime.sim_mutations(
            ts,
            rate=_MUTATION_RATE,
            model=msprime.JC69(),
            discrete_genome=True,
            random_seed=mut_seed,
        )
        keep: list[int] = []
        counts: list[int] = []
        for tree in ts.trees():
            for site in tree.sites():
                if len(site.mutations) != 1:
                    continue
                mutation = site.mutations[0]
                if mutation.derived_state == site.ancestral_state:
                    continue
                if site.ancestral_state not in "ACGT" or mutation.derived_state not in "ACGT":
                    continue
                count = tree.num_samples(mutation.node)
                if 0 < count < n_haplotypes:
                    keep.append(site.id)
                    counts.append(count)
        if len(keep) >= target:
            break
        # Too few sites: lengthen the contig in proportion and simulate again.
        factor = 1.3 * target / max(len(keep), 1)
        length = int(math.ceil(length * min(max(factor, 1.3), 20.0)))
    else:  # pragma: no cover - only reachable with pathological parameters
        raise RuntimeError(f"could not simulate {target} biallelic sites on {name}")

    # Thin evenly (deterministic) to exactly `target` sites.
    m = len(keep)
    if target == 1:
        chosen = np.array([0])
    else:
        chosen = (np.arange(target, dtype=np.int64) * (m - 1)) // (target - 1)
    keep_ids = np.asarray(keep, dtype=np.int64)[chosen]
    alt_counts = np.asarray(counts, dtype=np.int64)[chosen]
    drop = np.setdiff1d(np.arange(ts.num_sites), keep_ids)
    ts = ts.delete_sites(drop)
    positions = ts.tables.sites.position.astype(np.int64) + 1
    refs = [site.ancestral_state for site in ts.sites()]
    alts = [site.mutations[0].derived_state for site in ts.sites()]
    return _Contig(name, int(ts.sequence_length), ts, positions, refs, alts, alt_counts)


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------


def _vcf_header(contigs: Sequence[_Contig], samples: Sequence[str], region: str, seed: int) -> bytes:
    lines = [
        "##fileformat=VCFv4.2",
        f"##source=ngp_research.demo.simulate (msprime {msprime.__version__}, seed={seed}, region={region})",
    ]
    lines.append('##FILTER=<ID=PASS,Description="All filters passed">')
    lines += [f"##contig=<ID={c.name},length={c.length}>" for c in contigs]
    lines.append('##FORMAT=<ID=GT,Number=1,Type=String,Description="Phased genotype">')
    lines.append("\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT", *samples]))
    return ("\n".join(lines) + "\n").encode("ascii")


def _genotype_block(haplotypes: np.ndarray) -> np.ndarray:
    """Encode a (variants, 2 * individuals) 0/1 matrix as 'a|b\\t...a|b\\n' rows."""
    n_variants, n_hap = haplotypes.shape
    out = np.empty((n_variants, n_hap // 2, 4), dtype=np.uint8)
    out[:, :, 0] = haplotypes[:, 0::2] + ord("0")
    out[:, :, 1] = ord("|")
    out[:, :, 2] = haplotypes[:, 1::2] + ord("0")
    out[:, :, 3] = ord("\t")
    out[:, -1, 3] = ord("\n")
    return out.reshape(n_variants, -1)


def _write_vcfs(
    contigs: Sequence[_Contig],
    vcf_paths: Sequence[Path],
    region_samples: Sequence[Sequence[str]],
    regions: Sequence[str],
    samples_per_region: int,
    seed: int,
) -> None:
    """Write one uncompressed VCF per region (all regions share the sites)."""
    hap_per_region = 2 * samples_per_region
    handles = [open(path, "wb") for path in vcf_paths]
    try:
        for handle, samples, region in zip(handles, region_samples, regions):
            handle.write(_vcf_header(contigs, samples, region, seed))
        for contig in contigs:
            n = len(contig.positions)
            prefixes = [
                f"{contig.name}\t{contig.positions[k]}\t{contig.name}_{contig.positions[k]}_"
                f"{contig.refs[k]}_{contig.alts[k]}\t{contig.refs[k]}\t{contig.alts[k]}"
                "\t.\tPASS\t.\tGT\t".encode("ascii")
                for k in range(n)
            ]
            block = np.empty((min(_CHUNK, n), contig.ts.num_samples), dtype=np.uint8)
            start = 0
            for k, variant in enumerate(contig.ts.variants()):
                row = k - start
                block[row] = variant.genotypes
                if row == block.shape[0] - 1 or k == n - 1:
                    used = block[: row + 1]
                    for r, handle in enumerate(handles):
                        encoded = _genotype_block(used[:, r * hap_per_region : (r + 1) * hap_per_region])
                        handle.write(
                            b"".join(prefixes[start + i] + encoded[i].tobytes() for i in range(row + 1))
                        )
                    start = k + 1
    finally:
        for handle in handles:
            handle.close()


def _compress_and_index(plain: Path, target: Path) -> None:
    pysam.tabix_compress(str(plain), str(target), force=True)
    plain.unlink()
    pysam.tabix_index(str(target), preset="vcf", force=True)


def _ontology(term: dict[str, str]) -> dict[str, str]:
    return {"id": term["id"], "label": term["label"]}


def _meta_data() -> dict[str, object]:
    return {
        "created": _CREATED,
        "createdBy": _CREATED_BY,
        "resources": [dict(r) for r in _RESOURCES],
        "phenopacketSchemaVersion": "2.0",
    }


def _phenopacket(
    sample: str, sex: str, cholesterol: float, is_case: bool, background: Sequence[dict[str, str]]
) -> dict[str, object]:
    features: list[dict[str, object]] = [{"type": _ontology(_CASE_TERM)}]
    if not is_case:
        features[0]["excluded"] = True
    features += [{"type": _ontology(term)} for term in background]
    packet: dict[str, object] = {
        "id": f"{sample}-phenopacket",
        "subject": {"id": sample, "sex": sex},
        "phenotypicFeatures": features,
        "measurements": [
            {
                "assay": dict(_QUANT_ASSAY),
                "value": {"quantity": {"unit": dict(_QUANT_UNIT), "value": cholesterol}},
            }
        ],
    }
    if is_case:
        packet["diseases"] = [{"term": _ontology(_CASE_DISEASE)}]
    packet["metaData"] = _meta_data()
    return packet


# ---------------------------------------------------------------------------
# traits
# ---------------------------------------------------------------------------


def _site_dosages(contig: _Contig, k: int) -> np.ndarray:
    variant = tskit.Variant(contig.ts)
    variant.decode(k)
    haplotypes = variant.genotypes.astype(np.float64)
    return haplotypes[0::2] + haplotypes[1::2]


def _choose_causal(
    contigs: Sequence[_Contig], n_haplotypes: int, rng: np.random.Generator
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Pick causal sites among common ones, avoiding LD between them.

    Returns the sites in genomic order and their dosages (individuals x sites).
    """
    candidates: list[tuple[int, int]] = []
    mafs: list[float] = []
    for ci, contig in enumerate(contigs):
        freq = contig.alt_counts / n_haplotypes
        maf = np.minimum(freq, 1.0 - freq)
        candidates += [(ci, k) for k in range(len(maf))]
        mafs += maf.tolist()
    mafs_arr = np.asarray(mafs)
    n_causal = min(_N_CAUSAL, len(candidates))
    common = np.flatnonzero(mafs_arr >= _MIN_CAUSAL_MAF)
    if len(common) >= n_causal:
        order = rng.permutation(common)
    else:  # tiny cohorts: fall back to the most common sites
        order = np.argsort(-mafs_arr, kind="stable")
    chosen: list[int] = []
    columns: list[np.ndarray] = []
    rejected: list[tuple[float, int, np.ndarray]] = []
    for tries, index in enumerate(order[:_MAX_CAUSAL_TRIES]):
        ci, k = candidates[int(index)]
        dosage = _site_dosages(contigs[ci], k)
        centred = dosage - dosage.mean()
        norm = float(np.sqrt(centred @ centred))
        worst = 0.0
        for other in columns:
            other_c = other - other.mean()
            denominator = norm * float(np.sqrt(other_c @ other_c))
            r = float(centred @ other_c) / denominator if denominator > 0 else 1.0
            worst = max(worst, r * r)
        if norm > 0 and worst <= _MAX_CAUSAL_R2:
            chosen.append(int(index))
            columns.append(dosage)
            if len(chosen) == n_causal:
                break
        else:
            rejected.append((worst, tries, dosage))
    if len(chosen) < n_causal:  # relax: least-linked rejected candidates
        rejected.sort(key=lambda item: (item[0], item[1]))
        for _, tries, dosage in rejected[: n_causal - len(chosen)]:
            chosen.append(int(order[tries]))
            columns.append(dosage)
    ranking = np.argsort(chosen, kind="stable")
    sites = [candidates[chosen[i]] for i in ranking]
    return sites, np.column_stack([columns[i] for i in ranking])


def _effects(
    dosages: np.ndarray, signs: np.ndarray, weights: np.ndarray, total_variance: float, h2: float
) -> np.ndarray:
    """Per-allele effects giving each causal variant its share ``weights`` of ``h2``."""
    var_dosage = np.maximum(dosages.var(axis=0), 1e-12)
    effects = signs * np.sqrt(weights * h2 * total_variance / var_dosage)
    # Rescale so that LD between causal variants does not change the total.
    genetic = dosages @ effects
    scale = math.sqrt(h2 * total_variance / max(float(genetic.var()), 1e-12))
    return effects * scale


def _orthogonal_noise(noise: np.ndarray, dosages: np.ndarray, variance: float) -> np.ndarray:
    """Project ``noise`` off the causal dosages (in-sample) and give it exact variance.

    This keeps the planted signal from being diluted or inflated by chance
    correlation with the noise in small cohorts.
    """
    n = dosages.shape[0]
    design = np.column_stack([np.ones(n), dosages])
    coef, *_ = np.linalg.lstsq(design, noise, rcond=None)
    noise = noise - design @ coef
    sd = float(noise.std())
    return noise * (math.sqrt(variance) / sd) if sd > 0 else noise


# ---------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------


def simulate_cohorts(
    out_dir: str | os.PathLike[str],
    regions: Sequence[str] = DEFAULT_REGIONS,
    samples_per_region: int = 40,
    variants: int = 2000,
    seed: int = 42,
    contigs: Sequence[str] = ("chr1", "chr2"),
) -> tuple[list[SimulatedCohort], list[PlantedVariant]]:
    """Simulate one genotyped, phenotyped cohort per region.

    All regions are simulated jointly with msprime (one deme of size 10 000
    per region, stepping-stone migration along the order of ``regions``,
    recombination 1e-8, JC69 mutations on a discrete genome), one simulation
    per contig.  Only biallelic sites carrying exactly one mutation are kept,
    thinned evenly to exactly ``variants`` sites split across ``contigs``;
    every region's VCF holds the same sites.  A quantitative trait (serum
    cholesterol, mg/dL; the causal variants explain 40 % of its variance) and
    a binary trait (hypertrophic cardiomyopathy, liability threshold with
    30 % cases) are driven by five causal variants drawn among sites with
    cohort-wide minor allele frequency >= 0.1.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Output directory, created if missing.  Writes
        ``<region>/<region>-cohort.vcf.gz`` (+ ``.tbi``),
        ``<region>/<region>-phenopackets.json`` and ``planted.json``.
    regions : sequence of str, default DEFAULT_REGIONS
        Unique region names, ordered along the migration chain.
    samples_per_region : int, default 40
        Diploid individuals per region, at least 2.
    variants : int, default 2000
        Total number of variant sites over all contigs, at least 10.
    seed : int, default 42
        Non-negative seed; equal arguments give byte-identical files.
    contigs : sequence of str, default ("chr1", "chr2")
        Unique contig names; variants are split evenly across them.

    Returns
    -------
    cohorts : list of SimulatedCohort
        One per region, in the order of ``regions``.
    planted : list of PlantedVariant
        The causal variants, in genomic order.

    Raises
    ------
    ValueError
        If an argument is invalid; the message names the argument.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     cohorts, planted = simulate_cohorts(tmp, regions=("uppsala", "syd"),
    ...                                         samples_per_region=5, variants=50)
    ...     cohorts[0].vcf.name, cohorts[1].samples[-1]
    ('uppsala-cohort.vcf.gz', 'SYD-0005')
    """
    region_names, contig_names = _check_arguments(regions, samples_per_region, variants, seed, contigs)
    seed = int(seed)
    samples_per_region = int(samples_per_region)
    variants = int(variants)
    out = Path(out_dir)
    n_regions = len(region_names)
    n_individuals = n_regions * samples_per_region
    n_haplotypes = 2 * n_individuals

    # --- genotypes -----------------------------------------------------------
    per_contig = [variants // len(contig_names)] * len(contig_names)
    for i in range(variants % len(contig_names)):
        per_contig[i] += 1
    simulated = [
        _simulate_contig(name, i, per_contig[i], seed, n_regions, samples_per_region)
        for i, name in enumerate(contig_names)
    ]

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7EA175]))
    causal_sites, dosages = _choose_causal(simulated, n_haplotypes, rng)

    width = max(4, len(str(samples_per_region)))
    prefixes = _sample_prefixes(region_names)
    region_samples = [
        tuple(f"{prefix}-{i:0{width}d}" for i in range(1, samples_per_region + 1)) for prefix in prefixes
    ]
    region_dirs = [out / region for region in region_names]
    for directory in region_dirs:
        directory.mkdir(parents=True, exist_ok=True)
    vcf_paths = [d / f"{r}-cohort.vcf.gz" for d, r in zip(region_dirs, region_names)]
    plain_paths = [d / f".{r}-cohort.vcf.tmp" for d, r in zip(region_dirs, region_names)]
    _write_vcfs(simulated, plain_paths, region_samples, region_names, samples_per_region, seed)
    for plain, target in zip(plain_paths, vcf_paths):
        _compress_and_index(plain, target)

    # --- traits ----------------------------------------------------------------
    signs = rng.choice(np.array([-1.0, 1.0]), size=len(causal_sites))
    weights = rng.permutation(np.asarray(_CAUSAL_WEIGHTS[: len(causal_sites)], dtype=float))
    weights = weights / weights.sum()
    total_var = _CHOLESTEROL_SD**2
    betas = _effects(dosages, signs, weights, total_var, _H2_QUANTITATIVE)
    genetic = dosages @ betas
    noise = _orthogonal_noise(rng.standard_normal(n_individuals), dosages, (1.0 - _H2_QUANTITATIVE) * total_var)
    cholesterol = np.round(_CHOLESTEROL_MEAN + (genetic - genetic.mean()) + noise, 1)

    logistic_var = math.pi**2 / 3.0
    log_odds = _effects(dosages, signs, weights, logistic_var / (1.0 - _H2_LIABILITY), _H2_LIABILITY)
    uniform = rng.random(n_individuals)
    logistic_noise = _orthogonal_noise(np.log(uniform / (1.0 - uniform)), dosages, logistic_var)
    liability = dosages @ log_odds + logistic_noise
    n_cases = min(max(int(round(_CASE_FRACTION * n_individuals)), 1), n_individuals - 1)
    order = np.argsort(-liability, kind="stable")
    is_case = np.zeros(n_individuals, dtype=bool)
    is_case[order[:n_cases]] = True

    sexes = rng.choice(np.array(["FEMALE", "MALE"]), size=n_individuals)
    n_background = rng.integers(0, 3, size=n_individuals)
    background = [
        [_BACKGROUND_TERMS[t] for t in sorted(rng.choice(len(_BACKGROUND_TERMS), size=k, replace=False))]
        for k in n_background
    ]

    # --- metadata ------------------------------------------------------------------
    cohorts: list[SimulatedCohort] = []
    for r, (region, directory, samples) in enumerate(zip(region_names, region_dirs, region_samples)):
        members = []
        for i, sample in enumerate(samples):
            g = r * samples_per_region + i
            members.append(
                _phenopacket(sample, str(sexes[g]), float(cholesterol[g]), bool(is_case[g]), background[g])
            )
        document = {
            "id": f"{region}-cohort",
            "description": (
                f"Simulated demo cohort for region {region}: {samples_per_region} individuals, "
                f"{variants} variants (seed {seed}). Not real patients."
            ),
            "members": members,
            "metaData": _meta_data(),
        }
        metadata_path = directory / f"{region}-phenopackets.json"
        metadata_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        vcf = vcf_paths[r]
        cohorts.append(
            SimulatedCohort(region, vcf, Path(str(vcf) + ".tbi"), metadata_path, samples)
        )

    planted = []
    for j, (ci, k) in enumerate(causal_sites):
        contig = simulated[ci]
        planted.append(
            PlantedVariant(
                contig=contig.name,
                pos=int(contig.positions[k]),
                ref=contig.refs[k],
                alt=contig.alts[k],
                beta_quantitative=float(betas[j]),
                log_odds_binary=float(log_odds[j]),
            )
        )

    alt_freq = dosages.mean(axis=0) / 2.0
    planted_doc = {
        "seed": seed,
        "regions": list(region_names),
        "samples_per_region": samples_per_region,
        "variants": variants,
        "contigs": [{"id": c.name, "length": c.length, "variants": len(c.positions)} for c in simulated],
        "traits": {
            "quantitative": {
                "name": "cholesterol",
                "assay": dict(_QUANT_ASSAY),
                "unit": dict(_QUANT_UNIT),
                "variance_explained": _H2_QUANTITATIVE,
                "effect": "beta_quantitative, mg/dL per alt allele",
            },
            "binary": {
                "name": "hypertrophic_cardiomyopathy",
                "phenotype": dict(_CASE_TERM),
                "disease": dict(_CASE_DISEASE),
                "case_fraction": n_cases / n_individuals,
                "cases": n_cases,
                "effect": "log_odds_binary, logistic liability per alt allele",
            },
        },
        "planted": [
            {
                "contig": p.contig,
                "pos": p.pos,
                "ref": p.ref,
                "alt": p.alt,
                "id": f"{p.contig}_{p.pos}_{p.ref}_{p.alt}",
                "alt_frequency": float(alt_freq[j]),
                "beta_quantitative": p.beta_quantitative,
                "log_odds_binary": p.log_odds_binary,
                "variance_explained_quantitative": float(
                    betas[j] ** 2 * dosages[:, j].var() / total_var
                ),
            }
            for j, p in enumerate(planted)
        ],
    }
    (out / "planted.json").write_text(json.dumps(planted_doc, indent=2) + "\n", encoding="utf-8")
    return cohorts, planted
