"""Tests of ngp_research.ingest.checks (validation of files offered for ingest)."""

import gzip
import json
import shutil

import pysam
import pytest

from ngp_research.errors import IngestError
from ngp_research.ingest.checks import (
    BGZF_EOF,
    FileFacts,
    check_bgzf,
    detect_kind,
    expected_index_names,
    inspect_alignment_file,
    inspect_variant_file,
    validate_metadata,
)
from ngp_research.testing import (
    write_bam,
    write_cohort_metadata,
    write_reference_fasta,
    write_vcf,
)

SAMPLES = ["S1", "S2", "S3"]
GTS = ["0/1", "1/1", "0/0"]


def records(n=40, contig="chr1", start=100, step=10):
    return [(contig, start + i * step, "A", "G", GTS) for i in range(n)]


def raw_record(pos, gts=GTS, contig="chr1"):
    return "\t".join([contig, str(pos), ".", "A", "G", ".", "PASS", ".", "GT", *gts])


def errtext(excinfo):
    return str(excinfo.value)


@pytest.fixture
def good_vcf(tmp_path):
    return write_vcf(tmp_path / "good.vcf.gz", SAMPLES, records())


# ---------------------------------------------------------------- good files

def test_good_vcf_with_tbi(good_vcf):
    assert detect_kind(good_vcf) == "vcf"
    index = expected_index_names(good_vcf, "vcf")[0]
    assert index == str(good_vcf) + ".tbi"
    facts = inspect_variant_file(good_vcf, index)
    assert facts == FileFacts("vcf", tuple(SAMPLES), ("chr1",), 40, None)


def test_good_vcf_with_csi_and_two_contigs(tmp_path):
    recs = records(20) + records(5, contig="chr2", start=7)
    path = write_vcf(tmp_path / "two.vcf.gz", SAMPLES, recs,
                     contigs=(("chr1", 100000), ("chr2", 50000)), csi=True,
                     header_extra=["##reference=file:///refs/GRCh38_full_analysis_set.fa"])
    index = str(path) + ".csi"
    assert index in expected_index_names(path, "vcf")
    facts = inspect_variant_file(path, index)
    assert facts.contigs == ("chr1", "chr2")
    assert facts.records == 25
    assert facts.genome_build == "GRCh38"


def test_good_bcf(tmp_path):
    path = write_vcf(tmp_path / "good.bcf", SAMPLES, records())
    assert detect_kind(path) == "bcf"
    assert expected_index_names(path, "bcf") == [str(path) + ".csi"]
    facts = inspect_variant_file(path, str(path) + ".csi")
    assert (facts.kind, facts.samples, facts.records) == ("bcf", tuple(SAMPLES), 40)


def test_good_bam(tmp_path):
    reads = [("chr1", 1 + 7 * i) for i in range(30)] + [("chr2", 5 + i) for i in range(5)] + [(None, 0)] * 2
    path = write_bam(tmp_path / "x.bam", ["S1", "S2"], reads, contigs=(("chr1", 1000), ("chr2", 500)))
    assert detect_kind(path) == "bam"
    names = expected_index_names(path, "bam")
    assert names[:2] == [str(path) + ".bai", str(tmp_path / "x.bai")]
    facts = inspect_alignment_file(path, names[0])
    assert facts == FileFacts("bam", ("S1", "S2"), ("chr1", "chr2"), 37, None)


@pytest.fixture
def cram(tmp_path):
    contigs = (("chr1", 600), ("chr2", 300))
    ref = write_reference_fasta(tmp_path / "ref.fa", contigs)
    reads = [("chr1", 1 + 11 * i) for i in range(20)] + [("chr2", 3 + 9 * i) for i in range(6)]
    path = write_bam(tmp_path / "x.cram", ["S9"], reads, contigs=contigs, reference=ref)
    return path, ref


def test_good_cram_with_reference(cram):
    path, ref = cram
    assert detect_kind(path) == "cram"
    index = expected_index_names(path, "cram")[0]
    assert index == str(path) + ".crai"
    facts = inspect_alignment_file(path, index, reference=ref)
    assert facts == FileFacts("cram", ("S9",), ("chr1", "chr2"), 26, None)


def test_cram_without_reference(cram):
    path, _ = cram
    with pytest.raises(IngestError) as ei:
        inspect_alignment_file(path, str(path) + ".crai")
    assert str(path) in errtext(ei) and "reference FASTA" in errtext(ei)


def test_cram_with_wrong_reference(cram, tmp_path):
    path, _ = cram
    other = tmp_path / "other.fa"  # same names and lengths, different sequence
    other.write_text(">chr1\n" + "T" * 600 + "\n>chr2\n" + "T" * 300 + "\n")
    pysam.faidx(str(other))
    with pytest.raises(IngestError) as ei:
        inspect_alignment_file(path, str(path) + ".crai", reference=other)
    assert str(path) in errtext(ei) and "alignment" in errtext(ei)


# ---------------------------------------------------------------- compression

def test_truncated_half(good_vcf, tmp_path):
    data = good_vcf.read_bytes()
    cut = tmp_path / "cut.vcf.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(IngestError) as ei:
        check_bgzf(cut)
    assert str(cut) in errtext(ei) and "truncated" in errtext(ei)
    assert ei.value.location == "BGZF block at byte 0"


def test_truncated_no_eof_block(good_vcf, tmp_path):
    data = good_vcf.read_bytes()
    assert data.endswith(BGZF_EOF)
    cut = tmp_path / "noeof.vcf.gz"
    cut.write_bytes(data[:-28])
    with pytest.raises(IngestError) as ei:
        inspect_variant_file(cut, str(good_vcf) + ".tbi")
    assert str(cut) in errtext(ei) and "truncated: missing BGZF EOF block" in errtext(ei)


def test_flipped_byte_crc(good_vcf, tmp_path):
    bad = tmp_path / "flip.vcf.gz"
    # flip the stored CRC32 of the first block: always (and only) a CRC mismatch
    data = bytearray(good_vcf.read_bytes())
    bsize = int.from_bytes(data[16:18], "little") + 1
    data[bsize - 8] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(IngestError) as ei:
        check_bgzf(bad)
    assert str(bad) in errtext(ei) and "CRC mismatch" in errtext(ei)
    assert "BGZF block at byte 0" in errtext(ei)


def test_flipped_byte_in_deflate_data(good_vcf, tmp_path):
    data = bytearray(good_vcf.read_bytes())
    data[40] ^= 0x10
    bad = tmp_path / "flip2.vcf.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(IngestError) as ei:
        check_bgzf(bad)
    assert str(bad) in errtext(ei) and "corrupt BGZF block" in errtext(ei)


def test_plain_gzip_not_bgzf(tmp_path, good_vcf):
    text = gzip.decompress(good_vcf.read_bytes())
    plain_gz = tmp_path / "plain.vcf.gz"
    plain_gz.write_bytes(gzip.compress(text))
    assert detect_kind(plain_gz) == "vcf"
    with pytest.raises(IngestError) as ei:
        inspect_variant_file(plain_gz, str(good_vcf) + ".tbi")
    assert str(plain_gz) in errtext(ei) and "not BGZF-compressed (plain gzip?)" in errtext(ei)


def test_plain_text_vcf(tmp_path):
    path = write_vcf(tmp_path / "plain.vcf", SAMPLES, records(), compress=False, index=False)
    for fn in (detect_kind, check_bgzf):
        with pytest.raises(IngestError) as ei:
            fn(path)
        assert str(path) in errtext(ei) and "must be bgzip-compressed" in errtext(ei)


def test_not_genomic(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    with pytest.raises(IngestError, match="not a supported genomic file"):
        detect_kind(path)


# ---------------------------------------------------------------- records

@pytest.mark.parametrize("bad_line, problem", [
    (raw_record("1x5"), "non-numeric POS '1x5'"),
    ("\t".join(raw_record(295).split("\t")[:-1]), "wrong number of columns (11, the header has 12)"),
    (raw_record(295) + "\t0/1", "wrong number of columns (13, the header has 12)"),
    ("\t".join(raw_record(295).split("\t")[:6]), "wrong number of columns (6, the header has 12)"),
    (raw_record(295, gts=["0/3", "0/1", "0/0"]), "genotype '0/3' refers to allele 3"),
])
def test_corrupt_record_in_middle(tmp_path, bad_line, problem):
    recs = records()
    recs[19] = bad_line  # record 20
    path = write_vcf(tmp_path / "bad.vcf.gz", SAMPLES, recs, index=False)
    good = write_vcf(tmp_path / "ok.vcf.gz", SAMPLES, records())
    with pytest.raises(IngestError) as ei:
        inspect_variant_file(path, str(good) + ".tbi")
    # 4 header lines (fileformat, contig, FORMAT, #CHROM) + 20
    assert ei.value.location == "record 20 (line 24)"
    assert str(path) in errtext(ei) and problem in errtext(ei)


def test_bad_genotype_in_bcf(tmp_path):
    recs = records()
    recs[19] = raw_record(295, gts=["0/1", "2/2", "0/0"])
    path = write_vcf(tmp_path / "bad.bcf", SAMPLES, recs)
    with pytest.raises(IngestError) as ei:
        inspect_variant_file(path, str(path) + ".csi")
    assert ei.value.location == "record 20"
    assert "genotype '2/2' refers to allele 2" in errtext(ei)


def test_unsorted_positions(tmp_path):
    recs = records()
    recs[19] = raw_record(150)
    path = write_vcf(tmp_path / "unsorted.vcf.gz", SAMPLES, recs, index=False)
    good = write_vcf(tmp_path / "ok.vcf.gz", SAMPLES, records())
    with pytest.raises(IngestError) as ei:
        inspect_variant_file(path, str(good) + ".tbi")
    assert str(path) in errtext(ei) and "not sorted" in errtext(ei)
    assert ei.value.location == "record 20 (line 24)"


def test_unsorted_contig_blocks(tmp_path):
    recs = records(5) + records(3, contig="chr2") + records(2, start=1000)
    path = write_vcf(tmp_path / "blocks.vcf.gz", SAMPLES, recs,
                     contigs=(("chr1", 100000), ("chr2", 100000)), index=False)
    good = write_vcf(tmp_path / "ok.vcf.gz", SAMPLES, records())
    with pytest.raises(IngestError) as ei:
        inspect_variant_file(path, str(good) + ".tbi")
    assert "contig chr1 appears again after chr2" in errtext(ei)
    assert ei.value.location == "record 9 (line 14)"


def test_duplicate_sample_ids(tmp_path):
    path = write_vcf(tmp_path / "dup.vcf.gz", ["S1", "S2", "S1"], records(3))
    with pytest.raises(IngestError) as ei:
        inspect_variant_file(path, str(path) + ".tbi")
    assert str(path) in errtext(ei) and "duplicate sample IDs in header: S1" in errtext(ei)


# ---------------------------------------------------------------- indexes

def test_missing_index(good_vcf):
    with pytest.raises(IngestError) as ei:
        inspect_variant_file(good_vcf, None)
    assert str(good_vcf) in errtext(ei) and "no index" in errtext(ei)
    assert "good.vcf.gz.tbi" in errtext(ei)


def test_missing_bam_index(tmp_path):
    path = write_bam(tmp_path / "x.bam", ["S1"], [("chr1", 5)], index=False)
    with pytest.raises(IngestError, match="no index"):
        inspect_alignment_file(path, None)


def test_index_of_another_file(tmp_path):
    path = write_vcf(tmp_path / "mine.vcf.gz", SAMPLES, records(),
                     contigs=(("chr1", 100000), ("chr2", 100000)), index=False)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = write_vcf(other_dir / "mine.vcf.gz", SAMPLES, records(7, contig="chr2", start=5000, step=3),
                      contigs=(("chr1", 100000), ("chr2", 100000)))
    shutil.copy(str(other) + ".tbi", str(path) + ".tbi")
    with pytest.raises(IngestError) as ei:
        inspect_variant_file(path, str(path) + ".tbi")
    assert errtext(ei).startswith(str(path) + ".tbi: index does not belong to " + str(path))


def test_index_of_another_file_same_contig(tmp_path):
    path = write_vcf(tmp_path / "mine.vcf.gz", SAMPLES, records(40), index=False)
    other = write_vcf(tmp_path / "other.vcf.gz", SAMPLES, records(30, start=5000))
    shutil.copy(str(other) + ".tbi", str(path) + ".tbi")
    with pytest.raises(IngestError) as ei:
        inspect_variant_file(path, str(path) + ".tbi")
    assert "index does not belong to" in errtext(ei)


def test_bam_index_of_another_file(tmp_path):
    path = write_bam(tmp_path / "x.bam", ["S1"], [("chr1", 1 + i) for i in range(10)], index=False)
    other = write_bam(tmp_path / "y.bam", ["S1"], [("chr1", 1 + i) for i in range(4)])
    shutil.copy(str(other) + ".bai", str(path) + ".bai")
    with pytest.raises(IngestError) as ei:
        inspect_alignment_file(path, str(path) + ".bai")
    assert errtext(ei).startswith(str(path) + ".bai: index does not belong to " + str(path))


def test_unsorted_bam(tmp_path):
    path = write_bam(tmp_path / "u.bam", ["S1"], [("chr1", 50), ("chr1", 10)], index=False)
    other = write_bam(tmp_path / "s.bam", ["S1"], [("chr1", 10), ("chr1", 50)])
    shutil.copy(str(other) + ".bai", str(path) + ".bai")
    with pytest.raises(IngestError) as ei:
        inspect_alignment_file(path, str(path) + ".bai")
    assert "not coordinate-sorted" in errtext(ei) and ei.value.location == "alignment 2"


# ---------------------------------------------------------------- metadata

def test_good_metadata(tmp_path):
    path = write_cohort_metadata(tmp_path / "meta.json", SAMPLES)
    facts = validate_metadata(path, SAMPLES)
    assert facts.individuals == 3
    assert facts.sexes == {s: "FEMALE" for s in SAMPLES}
    assert facts.hpo_terms["S1"] == ("HP:0001250",)
    assert facts.document["id"] == "cohort-1"


def test_metadata_for_samples_not_in_file(tmp_path):
    extra = [f"X{i}" for i in range(7)]
    path = write_cohort_metadata(tmp_path / "meta.json", SAMPLES, extra_subjects=extra)
    with pytest.raises(IngestError) as ei:
        validate_metadata(path, SAMPLES)
    text = errtext(ei)
    assert str(path) in text and "not in the genomic file" in text
    assert "X0, X1, X2, X3, X4 and 2 more" in text and "X5" not in text


def test_samples_missing_from_metadata(tmp_path):
    path = write_cohort_metadata(tmp_path / "meta.json", SAMPLES[:1])
    with pytest.raises(IngestError) as ei:
        validate_metadata(path, SAMPLES)
    assert str(path) in errtext(ei) and "have no metadata: S2, S3" in errtext(ei)


def _mutate(tmp_path, fn):
    path = write_cohort_metadata(tmp_path / "meta.json", SAMPLES)
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc, indent=2))
    return path


@pytest.mark.parametrize("mutation, problem", [
    (lambda d: d["members"][1]["subject"].update(favouriteColour="blue"),
     'has no field named "favouriteColour"'),
    (lambda d: d["members"][0]["subject"].update(id=42), "Failed to parse id field"),
    (lambda d: d["members"][0]["subject"].update(sex="WOMAN"), "Invalid enum value WOMAN"),
    (lambda d: d["members"][2]["phenotypicFeatures"][0]["type"].update(id="HP:12"),
     "'HP:12' is not an HPO id"),
    (lambda d: d["members"][2]["diseases"][0]["term"].update(id="epilepsy"), "is not a CURIE"),
    (lambda d: d["members"][0]["subject"].pop("sex"), "subject.sex must be given"),
    (lambda d: d["members"][1]["subject"].update(id="S1"), "duplicate subject id S1"),
    (lambda d: d["metaData"].update(phenopacketSchemaVersion="1.0"), "phenopacketSchemaVersion"),
    (lambda d: d["members"][0].pop("id"), "phenopacket has no id"),
])
def test_malformed_phenopackets(tmp_path, mutation, problem):
    path = _mutate(tmp_path, mutation)
    with pytest.raises(IngestError) as ei:
        validate_metadata(path, SAMPLES)
    assert str(path) in errtext(ei) and problem in errtext(ei)


def test_metadata_invalid_json(tmp_path):
    path = write_cohort_metadata(tmp_path / "meta.json", SAMPLES)
    text = path.read_text().replace('"subject": {', '"subject": {,', 1)
    path.write_text(text)
    with pytest.raises(IngestError) as ei:
        validate_metadata(path, SAMPLES)
    assert str(path) in errtext(ei) and "malformed JSON" in errtext(ei)
    assert ei.value.location.startswith("line 6, column")
