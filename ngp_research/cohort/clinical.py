"""Candidate clinically relevant variants: a gene panel, a cohort frequency ceiling and an annotation table.

The annotation table is tab-separated with a header and the columns
``contig``, ``position`` (1-based), ``ref``, ``alt``, ``gene``,
``consequence`` and ``clinical_significance`` (ClinVar's terms: Pathogenic,
Likely pathogenic, Uncertain significance, Likely benign, Benign). Lines
starting with ``#`` are comments. A panel is a BED file (contig, 0-based
start, end, gene name) or a list of gene names matched against the
annotation's ``gene`` column.

The demo platform ships a small **synthetic** table and panel in
``/reference`` (:mod:`ngp_research.demo.annotation`); they are not real
clinical annotations.

Examples
--------
>>> import io
>>> table = read_annotations(io.StringIO("contig\\tposition\\tref\\talt\\tgene\\tconsequence\\tclinical_significance\\n"
...                                      "chr1\\t100\\tA\\tG\\tNGPD1\\tmissense_variant\\tPathogenic\\n"))
>>> table.gene.tolist()
['NGPD1']
>>> read_panel(io.StringIO("chr1\\t50\\t150\\tNGPD1\\n")).gene.tolist()
['NGPD1']
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["ANNOTATION_COLUMNS", "PATHOGENIC", "read_annotations", "read_panel", "select_candidates",
           "clinical_variants"]

ANNOTATION_COLUMNS = ["contig", "position", "ref", "alt", "gene", "consequence", "clinical_significance"]
PATHOGENIC = ("Pathogenic", "Likely pathogenic")


def read_annotations(source) -> pd.DataFrame:
    """Read an annotation table (path or file object); a missing column is named in the error."""
    table = pd.read_csv(source, sep="\t", comment="#", dtype={"contig": str, "ref": str, "alt": str, "gene": str},
                        keep_default_na=False)
    missing = [c for c in ANNOTATION_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"annotations: missing column(s) {', '.join(missing)} (needs {', '.join(ANNOTATION_COLUMNS)})")
    table["position"] = pd.to_numeric(table["position"], errors="raise").astype(int)
    return table[ANNOTATION_COLUMNS + [c for c in table.columns if c not in ANNOTATION_COLUMNS]]


def read_panel(source) -> pd.DataFrame:
    """Read a BED panel (path or file object): ``contig``, ``start`` (0-based), ``end``, ``gene``."""
    panel = pd.read_csv(source, sep="\t", comment="#", header=None, dtype={0: str, 3: str}, keep_default_na=False)
    if panel.shape[1] < 4:
        raise ValueError("panel: a BED panel needs four columns (contig, start, end, gene name)")
    panel = panel.iloc[:, :4]
    panel.columns = ["contig", "start", "end", "gene"]
    if ((panel.end <= panel.start) | (panel.start < 0)).any():
        raise ValueError("panel: every BED interval needs 0 <= start < end")
    return panel


def _in_panel(annotations: pd.DataFrame, panel) -> np.ndarray:
    if isinstance(panel, (list, tuple, set, frozenset)):
        genes = {str(g) for g in panel}
        if not genes:
            raise ValueError("panel: the gene list is empty")
        return annotations.gene.isin(genes).to_numpy()
    if not isinstance(panel, pd.DataFrame):
        panel = read_panel(panel)
    inside = np.zeros(len(annotations), dtype=bool)
    for row in panel.itertuples(index=False):
        inside |= ((annotations.contig == row.contig) & (annotations.position > row.start)
                   & (annotations.position <= row.end)).to_numpy()
    return inside


def select_candidates(frequencies: pd.DataFrame, annotations, panel, max_af: float = 0.01,
                      significance=PATHOGENIC) -> pd.DataFrame:
    """The cohort's variants that are in the panel, rarer than ``max_af`` and annotated as ``significance``.

    Parameters
    ----------
    frequencies : pandas.DataFrame
        :meth:`Cohort.allele_frequencies` (``contig``, ``position``, ``ref``, ``alt``, ``af``, ...).
    annotations : str or pandas.DataFrame
        The annotation table or its path.
    panel : str, pandas.DataFrame or list of str
        A BED panel (path or :func:`read_panel` table) or gene names.
    max_af : float
        Keep variants whose ALT allele frequency in the cohort is below this.
    significance : sequence of str
        Clinical significance values to keep.

    Examples
    --------
    >>> freq = pd.DataFrame({"contig": ["chr1", "chr1"], "position": [100, 200], "variant_id": ["a", "b"],
    ...                      "ref": ["A", "C"], "alt": ["G", "T"], "af": [0.004, 0.2]})
    >>> ann = pd.DataFrame({"contig": ["chr1", "chr1"], "position": [100, 200], "ref": ["A", "C"], "alt": ["G", "T"],
    ...                     "gene": ["NGPD1", "NGPD1"], "consequence": ["missense_variant"] * 2,
    ...                     "clinical_significance": ["Pathogenic", "Pathogenic"]})
    >>> select_candidates(freq, ann, ["NGPD1"], max_af=0.01).variant_id.tolist()
    ['a']
    """
    if not isinstance(max_af, (int, float)) or not 0 < max_af <= 1:
        raise ValueError(f"max_af: must be a frequency in (0, 1], got {max_af!r}")
    if isinstance(significance, str):
        significance = [significance]
    if not isinstance(annotations, pd.DataFrame):
        annotations = read_annotations(annotations)
    annotations = annotations[_in_panel(annotations, panel) & annotations.clinical_significance.isin(list(significance))]
    merged = frequencies.merge(annotations, on=["contig", "position", "ref", "alt"], how="inner")
    return merged[merged.af < max_af].reset_index(drop=True)


def clinical_variants(cohort, panel, annotations, max_af: float = 0.01, significance=PATHOGENIC) -> pd.DataFrame:
    """Candidate clinically relevant variants per carrier, ready for a review report.

    Parameters
    ----------
    cohort : ngp_research.cohort.Cohort
    panel, annotations, max_af, significance
        As :func:`select_candidates`.

    Returns
    -------
    pandas.DataFrame
        One row per (carrier sample, candidate variant): ``sample``, ``region``,
        ``dataset``, the variant (``contig``, ``position``, ``variant_id``,
        ``ref``, ``alt``), ``gene``, ``consequence``, ``clinical_significance``,
        ``genotype`` (``het`` or ``hom_alt``), ``alt_dosage``, ``af`` (cohort)
        and ``af_region`` (the sample's region), sorted by sample and position.

    Examples
    --------
    On the demo data, with the synthetic panel and annotations (``/reference`` in a workspace):

    >>> hits = clinical_variants(cohort, reference / "demo-panel.bed",
    ...                          reference / "demo-annotations.tsv", max_af=0.95)
    >>> list(hits.columns[:3]), bool((hits.alt_dosage > 0).all())
    (['sample', 'region', 'dataset'], True)
    """
    frequencies = cohort.allele_frequencies(by="region")
    frequencies["_row"] = np.arange(len(frequencies))
    candidates = select_candidates(frequencies, annotations, panel, max_af, significance)
    columns = ["sample", "region", "dataset", "contig", "position", "variant_id", "ref", "alt", "gene", "consequence",
               "clinical_significance", "genotype", "alt_dosage", "af", "af_region"]
    if candidates.empty:
        return pd.DataFrame(columns=columns)
    dosages = cohort.genotypes(candidates["_row"].to_numpy())  # (candidates, samples)
    samples = cohort.samples
    rows = []
    for k, variant in enumerate(candidates.to_dict("records")):  # records: region names may hold - or .
        for j in np.flatnonzero(dosages[k] > 0):
            region = samples.region.iloc[j]
            rows.append({
                "sample": samples.index[j], "region": region, "dataset": samples.dataset.iloc[j],
                **{key: variant[key] for key in ("contig", "position", "variant_id", "ref", "alt", "gene",
                                                 "consequence", "clinical_significance")},
                "genotype": "hom_alt" if dosages[k, j] == 2 else "het", "alt_dosage": int(dosages[k, j]),
                "af": variant["af"], "af_region": variant[f"af_{region}"],
            })
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values("sample", kind="stable").reset_index(drop=True)  # variants stay in genome order
