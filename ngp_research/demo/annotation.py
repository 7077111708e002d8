"""A small, synthetic gene panel and variant annotation table for the demo's clinical filter.

**Synthetic**: the genes (``NGPD1`` ...), consequences and significances are
made up around the simulated cohorts' planted causal variants; they are not
real clinical annotations. They are built so that the demo's clinical filter
(:func:`ngp_research.cohort.clinical.clinical_variants` with the panel, the
table and ``max_af=DEMO_MAX_AF``) returns exactly the planted variants, and
every other kind of row is something the filter must leave out:

- planted variants: in a panel gene, Pathogenic or Likely pathogenic;
- other variants inside panel genes: Benign, Likely benign or Uncertain significance;
- Pathogenic variants in genes outside the panel (``NGPX*``);
- a Pathogenic variant in a panel gene (``NGPC1``) that is too common (ALT
  frequency at least 0.99 over all regions), when the simulation has one.

Files written: ``demo-panel.bed``, ``demo-annotations.tsv`` and a README.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pysam

__all__ = ["DEMO_MAX_AF", "write_demo_reference"]

DEMO_MAX_AF = 0.95
_FLANK = 1500  # bp either side of a planted variant that its synthetic gene covers
_COMMON = 0.99

_HEADER = ("# SYNTHETIC demo annotation: made-up genes, consequences and significances around the simulated\n"
           f"# cohorts' planted variants. Not clinical data. Demo filter: max_af={DEMO_MAX_AF}\n")


def _sites(vcfs):
    """(contig, pos, ref, alt) of every site and its ALT frequency over all the VCFs' samples."""
    sites, ac, an = [], None, None
    for i, path in enumerate(vcfs):
        counts = []
        with pysam.VariantFile(str(path)) as vcf:
            for rec in vcf:
                if i == 0:
                    sites.append((rec.contig, rec.pos, rec.ref, rec.alts[0]))
                calls = [a for s in rec.samples.values() for a in s["GT"] if a is not None]
                counts.append((sum(calls), len(calls)))
        arr = np.array(counts, dtype=float).reshape(-1, 2)
        ac = arr[:, 0] if ac is None else ac + arr[:, 0]
        an = arr[:, 1] if an is None else an + arr[:, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return sites, ac / an


def write_demo_reference(out_dir, cohorts, planted) -> Path:
    """Write the synthetic panel and annotation table for the simulated ``cohorts`` into ``out_dir``.

    Examples
    --------
    >>> import tempfile
    >>> from ngp_research.demo.simulate import simulate_cohorts
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     cohorts, planted = simulate_cohorts(tmp, regions=("norr", "syd"), samples_per_region=10, variants=200)
    ...     out = write_demo_reference(f"{tmp}/reference", cohorts, planted)
    ...     sorted(p.name for p in out.iterdir())
    ['README', 'demo-annotations.tsv', 'demo-panel.bed']
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sites, af = _sites([c.vcf for c in cohorts])
    planted_keys = {(p.contig, p.pos, p.ref, p.alt) for p in planted}
    genes, rows = [], []
    for k, p in enumerate(planted, start=1):
        name = f"NGPD{k}"
        genes.append((p.contig, max(0, p.pos - 1 - _FLANK), p.pos + _FLANK, name))
        rows.append((p.contig, p.pos, p.ref, p.alt, name, "missense_variant",
                     "Pathogenic" if k % 2 else "Likely pathogenic"))
    benign = ("Benign", "Likely benign", "Uncertain significance")
    consequences = ("synonymous_variant", "intron_variant", "missense_variant")
    n_benign = 0
    for site in sites:
        if site in planted_keys:
            continue
        for contig, start, end, name in genes:
            if site[0] == contig and start < site[1] <= end:
                rows.append((*site, name, consequences[n_benign % 3], benign[n_benign % 3]))
                n_benign += 1
                break
    in_panel = {(r[0], r[1]) for r in rows}
    outside = [s for s in sites if s not in planted_keys and (s[0], s[1]) not in in_panel
               and all(not (s[0] == c and a - _FLANK < s[1] <= b + _FLANK) for c, a, b, _ in genes)]
    for k, site in enumerate(outside[len(outside) // 4:: max(1, len(outside) // 4)][:3], start=1):
        rows.append((*site, f"NGPX{k}", "stop_gained", "Pathogenic"))
    common = [s for s, f in zip(sites, af) if f >= _COMMON and s not in planted_keys
              and (s[0], s[1]) not in in_panel and s not in {r[:4] for r in rows}]
    if common:
        site = common[0]
        genes.append((site[0], site[1] - 1, site[1], "NGPC1"))
        rows.append((*site, "NGPC1", "missense_variant", "Pathogenic"))
    genes.sort(key=lambda g: (g[0], g[1]))
    rows.sort(key=lambda r: (r[0], r[1]))
    with open(out / "demo-panel.bed", "w", encoding="utf-8") as handle:
        handle.write(_HEADER)
        handle.writelines(f"{c}\t{a}\t{b}\t{n}\n" for c, a, b, n in genes)
    with open(out / "demo-annotations.tsv", "w", encoding="utf-8") as handle:
        handle.write(_HEADER)
        handle.write("contig\tposition\tref\talt\tgene\tconsequence\tclinical_significance\n")
        handle.writelines("\t".join(str(v) for v in r) + "\n" for r in rows)
    (out / "README").write_text(
        "Synthetic reference files for the ngp-research demo (not clinical data).\n"
        "demo-panel.bed: a made-up gene panel (BED: contig, 0-based start, end, gene).\n"
        "demo-annotations.tsv: made-up consequences and ClinVar-style significances.\n"
        f"The demo's clinical filter uses max_af={DEMO_MAX_AF}; see ngp_research.demo.annotation.\n",
        encoding="utf-8")
    for path in out.iterdir():
        os.chmod(path, 0o644)
    return out
