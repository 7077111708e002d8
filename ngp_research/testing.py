"""Tiny, deterministic builders of genomic test data (VCF, BAM, CRAM, phenopackets)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pysam
import pysam.bcftools as bcftools

_BASES = "ACGT"


def _reference_sequence(name, length):
    """Return a deterministic pseudo-random sequence for contig ``name``."""
    seed = sum(name.encode()) + 7
    out = []
    for i in range(length):
        seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
        out.append(_BASES[(seed >> 16) & 3])
    return "".join(out)


def write_vcf(path, samples, records, contigs=(("chr1", 100000),), compress=True, index=True,
              csi=False, header_extra=()) -> Path:
    """Write a VCF (bgzipped and indexed by default) or, for a ``.bcf`` path, a BCF; return its path.

    ``records`` are ``(chrom, pos, ref, alt, [gt, ...])`` tuples (one GT string per sample), or raw
    tab-separated strings written verbatim.  ``csi=True`` makes a ``.csi`` instead of a ``.tbi``.
    """
    path = Path(path)
    lines = ["##fileformat=VCFv4.2"]
    lines += [f"##contig=<ID={name},length={length}>" for name, length in contigs]
    lines += list(header_extra)
    lines.append('##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">')
    cols = ["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO"]
    if samples:
        cols += ["FORMAT", *samples]
    lines.append("\t".join(cols))
    for rec in records:
        if isinstance(rec, str):
            lines.append(rec)
            continue
        chrom, pos, ref, alt, gts = rec
        fields = [chrom, str(pos), ".", ref, alt, ".", "PASS", "."]
        if samples:
            fields += ["GT", *gts]
        lines.append("\t".join(fields))
    text = "\n".join(lines) + "\n"
    if path.suffix == ".bcf":
        plain = path.with_name(path.name + ".tmp.vcf")
        plain.write_text(text)
        try:
            with pysam.VariantFile(str(plain)) as src, \
                    pysam.VariantFile(str(path), "wb", header=src.header) as dst:
                for rec in src:
                    dst.write(rec)
        finally:
            plain.unlink()
        if index:
            bcftools.index("--csi", "-f", str(path))
        return path
    if not compress:
        path.write_text(text)
        return path
    plain = path.with_name(path.name[:-3] if path.name.endswith(".gz") else path.name + ".plain")
    plain.write_text(text)
    target = str(plain) + ".gz"
    pysam.tabix_compress(str(plain), target, force=True)
    plain.unlink()
    if target != str(path):
        os.replace(target, path)
    if index:
        pysam.tabix_index(str(path), preset="vcf", force=True, csi=csi)
    return path


def write_cohort_metadata(path, samples, extra_subjects=(), sex="FEMALE") -> Path:
    """Write a minimal valid phenopacket v2 Cohort JSON for ``samples`` (+ ``extra_subjects``)."""
    members = []
    for sid in [*samples, *extra_subjects]:
        members.append({
            "id": f"pp-{sid}",
            "subject": {"id": sid, "sex": sex},
            "phenotypicFeatures": [
                {"type": {"id": "HP:0001250", "label": "Seizure"}},
                {"type": {"id": "HP:0001263", "label": "Global developmental delay"}, "excluded": True},
            ],
            "diseases": [{"term": {"id": "OMIM:308350", "label": "Developmental and epileptic encephalopathy"}}],
        })
    document = {
        "id": "cohort-1",
        "members": members,
        "metaData": {
            "created": "2024-01-01T00:00:00Z",
            "createdBy": "ngp_research.testing",
            "resources": [{
                "id": "hp", "name": "human phenotype ontology", "url": "http://purl.obolibrary.org/obo/hp.owl",
                "version": "2024-01-01", "namespacePrefix": "HP", "iriPrefix": "http://purl.obolibrary.org/obo/HP_",
            }],
            "phenopacketSchemaVersion": "2.0",
        },
    }
    path = Path(path)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def write_reference_fasta(path, contigs) -> Path:
    """Write a deterministic FASTA for ``contigs`` (``(name, length)`` pairs) plus its ``.fai``."""
    path = Path(path)
    with open(path, "w") as fh:
        for name, length in contigs:
            seq = _reference_sequence(name, length)
            fh.write(f">{name}\n")
            for i in range(0, length, 60):
                fh.write(seq[i:i + 60] + "\n")
    pysam.faidx(str(path))
    return path


def write_bam(path, samples, reads, contigs=(("chr1", 1000),), reference=None, index=True,
              read_length=20) -> Path:
    """Write a BAM (or, for a ``.cram`` path, a CRAM against ``reference``) and index it.

    Each sample gets one ``@RG`` (``ID=rg<i>``, ``SM=<sample>``); ``reads`` are ``(contig, pos)``
    pairs (1-based, ``contig=None`` for an unplaced read), assigned to read groups round-robin.
    Sequences match ``reference`` when given (see :func:`write_reference_fasta`), else are ``A``s.
    """
    path = Path(path)
    header = {
        "HD": {"VN": "1.6", "SO": "coordinate"},
        "SQ": [{"SN": name, "LN": length} for name, length in contigs],
        "RG": [{"ID": f"rg{i}", "SM": s} for i, s in enumerate(samples)],
    }
    cram = path.suffix == ".cram"
    seqs = {}
    if reference is not None:
        with pysam.FastaFile(str(reference)) as fa:
            seqs = {name: fa.fetch(name) for name, _ in contigs}
    mode, kw = ("wc", {"reference_filename": str(reference)}) if cram else ("wb", {})
    with pysam.AlignmentFile(str(path), mode, header=header, **kw) as out:
        for i, (contig, pos) in enumerate(reads):
            seg = pysam.AlignedSegment(out.header)
            seg.query_name = f"read{i:05d}"
            if contig is None:
                seg.flag = 4
                seg.reference_id = -1
                seg.reference_start = -1
                seg.query_sequence = "A" * read_length
            else:
                seg.reference_name = contig
                seg.reference_start = pos - 1
                seg.cigarstring = f"{read_length}M"
                seg.mapping_quality = 60
                ref = seqs.get(contig)
                seg.query_sequence = (ref[pos - 1:pos - 1 + read_length] if ref else "A" * read_length)
            seg.query_qualities = pysam.qualitystring_to_array("I" * read_length)
            if samples:
                seg.set_tag("RG", f"rg{i % len(samples)}")
            out.write(seg)
    if index:
        pysam.index(str(path))
    return path
