"""What a cohort is made of: the workspace manifest's variant datasets and their harmonised phenotypes.

Pure functions: they read the manifest (``/etc/ngp/workspace.json``, written by
the workspace planner) and each dataset's Phenopacket v2 ``Cohort`` document,
and never assume where the files live beyond the paths the manifest gives, so
the same code works in a local sandbox and on Kubernetes.

Examples
--------
>>> manifest = {"project": "cardio", "datasets": [{"name": "syd-cohort", "region": "syd", "kind": "vcf",
...     "files": [{"name": "c.vcf.gz", "path": "/data/syd/syd-cohort/c.vcf.gz", "role": "data", "sha256": "ab"},
...               {"name": "p.json", "path": "/data/syd/syd-cohort/p.json", "role": "metadata", "sha256": "cd"}]}]}
>>> [(d.name, d.region, d.vcf) for d in variant_datasets(manifest)]
[('syd-cohort', 'syd', '/data/syd/syd-cohort/c.vcf.gz')]
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import pandas as pd

from ..errors import RefusedError

__all__ = ["CohortDataset", "CohortError", "variant_datasets", "read_manifest", "phenotype_table",
           "PHENOTYPE_NAMES", "vcf_contigs"]

#: Short column names for harmonised terms the demo and common cohorts use; other terms get a
#: snake_case form of their label.
PHENOTYPE_NAMES = {
    "LOINC:2093-3": "cholesterol",
    "HP:0001639": "hypertrophic_cardiomyopathy",
}

_VARIANT_SUFFIXES = (".vcf.gz", ".vcf.bgz", ".bcf")


class CohortError(RefusedError):
    """The project's data cannot form one cohort (no variant data, mixed genome builds, bad metadata)."""


@dataclass(frozen=True)
class CohortDataset:
    """One tagged variant dataset of the workspace, as the manifest describes it."""

    name: str
    region: str
    vcf: str
    sha256: str
    metadata: str | None
    genome_build: str | None = None


def read_manifest(path: str | os.PathLike | None = None) -> dict:
    """Load the workspace manifest (default: ``$NGP_WORKSPACE_MANIFEST``, then ``/etc/ngp/workspace.json``)."""
    path = path or os.environ.get("NGP_WORKSPACE_MANIFEST") or "/etc/ngp/workspace.json"
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise CohortError(f"no workspace manifest at {path}: run this inside a project workspace, "
                          "or pass manifest= a manifest file") from None
    except json.JSONDecodeError as e:
        raise CohortError(f"the workspace manifest {path} is not valid JSON: {e}") from None


def variant_datasets(manifest: dict, datasets=None) -> list[CohortDataset]:
    """The manifest's datasets that carry variant calls, in manifest order.

    Parameters
    ----------
    manifest : dict
        The workspace manifest.
    datasets : sequence of str, optional
        Only these datasets (by name); each must be in the manifest.
    """
    entries = manifest.get("datasets") or []
    if datasets is not None:
        if isinstance(datasets, str):
            datasets = [datasets]
        known = {d.get("name") for d in entries}
        missing = [d for d in datasets if d not in known]
        if missing:
            raise CohortError(f"datasets: {', '.join(missing)} not tagged for project "
                              f"{manifest.get('project')!r} (tagged: {', '.join(sorted(known)) or 'none'})")
        entries = [d for d in entries if d.get("name") in set(datasets)]
    out = []
    for entry in entries:
        files = entry.get("files") or []
        variant = [f for f in files if f.get("role", "data") == "data" and f["path"].endswith(_VARIANT_SUFFIXES)]
        if not variant:
            continue
        if len(variant) > 1:
            raise CohortError(f"dataset {entry['name']} has {len(variant)} variant files; "
                              "a cohort dataset holds one VCF/BCF")
        meta = [f for f in files if f.get("role") == "metadata"]
        out.append(CohortDataset(entry["name"], entry["region"], variant[0]["path"], variant[0].get("sha256") or "",
                                 meta[0]["path"] if meta else None, entry.get("genome_build")))
    if not out:
        raise CohortError(f"project {manifest.get('project')!r} has no tagged variant dataset (VCF/BCF) in this "
                          "workspace")
    return out


def vcf_contigs(path: str) -> tuple[list[tuple[str, int]], list[str], str | None]:
    """Contigs (name, length) declared in a VCF header, its samples, and its ``##reference`` line if any."""
    import pysam

    with pysam.VariantFile(path) as vcf:
        contigs = [(name, int(c.length or 0)) for name, c in vcf.header.contigs.items()]
        samples = list(vcf.header.samples)
        reference = next((r.value for r in vcf.header.records if r.key == "reference"), None)
    return contigs, samples, reference


def _column(term: dict) -> str:
    if term.get("id") in PHENOTYPE_NAMES:
        return PHENOTYPE_NAMES[term["id"]]
    text = term.get("label") or term.get("id") or "term"
    return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")


def phenotype_table(document: dict, region: str, dataset: str) -> pd.DataFrame:
    """One row per subject of a Phenopacket v2 ``Cohort``: sex, measurements and observed terms.

    Quantitative measurements become float columns; phenotypic features and
    diseases become boolean columns (True when observed, False when excluded
    or not recorded for that subject).

    Examples
    --------
    >>> doc = {"members": [{"subject": {"id": "S1", "sex": "MALE"},
    ...     "phenotypicFeatures": [{"type": {"id": "HP:0001639", "label": "Hypertrophic cardiomyopathy"},
    ...                             "excluded": True}],
    ...     "measurements": [{"assay": {"id": "LOINC:2093-3"}, "value": {"quantity": {"value": 201.5}}}]}]}
    >>> phenotype_table(doc, "syd", "syd-cohort").to_dict("records")
    [{'sample': 'S1', 'region': 'syd', 'dataset': 'syd-cohort', 'sex': 'MALE', 'cholesterol': 201.5, 'hypertrophic_cardiomyopathy': False}]
    """
    rows = []
    for member in document.get("members") or []:
        subject = member.get("subject") or {}
        if not subject.get("id"):
            raise CohortError(f"dataset {dataset}: a phenopacket has no subject id")
        row = {"sample": subject["id"], "region": region, "dataset": dataset,
               "sex": subject.get("sex") or "UNKNOWN_SEX"}
        for m in member.get("measurements") or []:
            quantity = (m.get("value") or {}).get("quantity") or {}
            if "value" in quantity:
                row[_column(m.get("assay") or {})] = float(quantity["value"])
        for f in member.get("phenotypicFeatures") or []:
            row[_column(f.get("type") or {})] = not f.get("excluded", False)
        for d in member.get("diseases") or []:
            name = _column(d.get("term") or {})
            row.setdefault(name, not d.get("excluded", False))
        rows.append(row)
    table = pd.DataFrame(rows)
    for name in table.columns:
        if table[name].dtype == object and name not in ("sample", "region", "dataset", "sex"):
            if set(table[name].dropna().unique()) <= {True, False}:
                table[name] = table[name].map(lambda value: value is True).astype(bool)
    return table
