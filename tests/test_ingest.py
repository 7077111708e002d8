"""Validated ingest through the catalog: good datasets land whole, bad ones leave no trace.

Each refusal asserts the error text and that the catalog, the audit log and
the region's storage are exactly as before.
"""

import gzip
import hashlib
import json
import os
import shutil
import stat

import pytest

from ngp_research.errors import IngestError, InvalidInputError, NotFoundError, RefusedError
from ngp_research.ingest import ingest_dataset
from ngp_research.testing import write_bam, write_cohort_metadata, write_reference_fasta, write_vcf

SAMPLES = ["SYD-0001", "SYD-0002", "SYD-0003"]
GTS = ["0/1", "1/1", "0/0"]


def recs(n=40, contig="chr1", start=100):
    return [(contig, start + 10 * i, "A", "G", GTS) for i in range(n)]


def state(catalog):
    """Catalog rows, audit records and every path under the regions' areas."""
    root = catalog.platform.regions_dir
    tree = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    return (
        [(d.name, len(d.files), len(d.samples)) for d in catalog.datasets()],
        len(catalog.audit.records()),
        tree,
    )


@pytest.fixture
def inbox(tmp_path):
    d = tmp_path / "inbox"
    d.mkdir()
    return d


@pytest.fixture
def good(inbox):
    vcf = write_vcf(inbox / "syd.vcf.gz", SAMPLES, recs())
    meta = write_cohort_metadata(inbox / "syd-phenopackets.json", SAMPLES)
    return vcf, meta


def test_good_vcf_is_registered_read_only_with_checksums(people, good):
    vcf, meta = good
    ds = ingest_dataset(people, "syd", "syd-cohort", [vcf], "admin-syd", metadata=meta)
    assert (ds.kind, ds.region.name, ds.registered_by.username) == ("vcf", "syd", "admin-syd")
    assert [s.sample_id for s in ds.samples] == SAMPLES and ds.samples[0].sex == "FEMALE"
    folder = people.platform.dataset_dir("syd", "syd-cohort")
    assert sorted(f.name for f in ds.files) == sorted(p.name for p in folder.iterdir())
    roles = {f.name: (f.role, f.index_for.name if f.index_for else None) for f in ds.files}
    assert roles == {"syd.vcf.gz": ("data", None), "syd.vcf.gz.tbi": ("index", "syd.vcf.gz"),
                     "syd-phenopackets.json": ("metadata", None)}
    for f in ds.files:
        stored = folder / f.name
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == f.sha256
        assert stored.stat().st_size == f.size
        assert stat.S_IMODE(stored.stat().st_mode) == 0o444
    assert stat.S_IMODE(folder.stat().st_mode) == 0o555
    assert not people.platform.staging_dir("syd").exists()
    (rec,) = people.audit.records(action="dataset.ingest")
    assert (rec.actor, rec.region, rec.dataset) == ("admin-syd", "syd", "syd-cohort")
    assert rec.detail["files"]["syd.vcf.gz"]["sha256"] == next(f.sha256 for f in ds.files if f.name == "syd.vcf.gz")
    assert json.loads(people.dataset("syd-cohort").individual_metadata)["members"][0]["subject"]["id"] == SAMPLES[0]


def test_index_may_be_given_explicitly_and_as_csi(people, inbox):
    vcf = write_vcf(inbox / "a.vcf.gz", SAMPLES, recs(), csi=True)
    ds = ingest_dataset(people, "syd", "a", [vcf, str(vcf) + ".csi"], "admin-syd")
    assert {f.name for f in ds.files} == {"a.vcf.gz", "a.vcf.gz.csi"}


def test_bcf_bam_and_cram(people, inbox):
    bcf = write_vcf(inbox / "b.bcf", SAMPLES, recs())
    assert ingest_dataset(people, "syd", "b", [bcf], "admin-syd").kind == "bcf"
    ref = write_reference_fasta(inbox / "ref.fa", [("chr1", 2000)])
    reads = [("chr1", 100 + i) for i in range(30)]
    bam = write_bam(inbox / "r.bam", ["SYD-0001"], reads, contigs=(("chr1", 2000),), reference=ref)
    assert ingest_dataset(people, "syd", "r-bam", [bam], "admin-syd").kind == "bam"
    cram = write_bam(inbox / "r.cram", ["SYD-0001"], reads, contigs=(("chr1", 2000),), reference=ref)
    before = state(people)
    with pytest.raises(IngestError, match="needs its reference"):
        ingest_dataset(people, "syd", "r-cram", [cram], "admin-syd")
    assert state(people) == before
    ds = ingest_dataset(people, "syd", "r-cram", [cram], "admin-syd", reference=ref)
    assert ds.kind == "cram"
    assert {f.name: f.role for f in ds.files} == {"r.cram": "data", "r.cram.crai": "index", "ref.fa": "reference",
                                                  "ref.fa.fai": "index"}


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


BAD_CASES = {}


def case(fn):
    BAD_CASES[fn.__name__] = fn
    return fn


@case
def truncated_bgzip(inbox):
    vcf = write_vcf(inbox / "t.vcf.gz", SAMPLES, recs(400))
    truncate(vcf)
    return dict(files=[vcf]), IngestError, r"t\.vcf\.gz: truncated"


@case
def missing_eof_block(inbox):
    vcf = write_vcf(inbox / "t.vcf.gz", SAMPLES, recs())
    vcf.write_bytes(vcf.read_bytes()[:-28])
    return dict(files=[vcf]), IngestError, r"t\.vcf\.gz: truncated: missing BGZF EOF block"


@case
def corrupt_record_in_the_middle(inbox):
    vcf = write_vcf(inbox / "c.vcf.gz", SAMPLES, recs())
    # rewrite with a bad POS on record 20, then re-index so only the content is wrong
    lines = gzip.decompress(vcf.read_bytes()).decode().splitlines()
    header = [x for x in lines if x.startswith("#")]
    body = [x for x in lines if not x.startswith("#")]
    f = body[19].split("\t")
    f[1] = "12x4"
    body[19] = "\t".join(f)
    plain = inbox / "c.vcf"
    plain.write_text("\n".join(header + body) + "\n")
    import pysam

    vcf.unlink()
    pysam.tabix_compress(str(plain), str(vcf))
    plain.unlink()
    return dict(files=[vcf]), IngestError, rf"c\.vcf\.gz: .*record 20 \(line {len(header) + 20}\)"


@case
def gzip_not_bgzf(inbox):
    vcf = write_vcf(inbox / "g.vcf.gz", SAMPLES, recs())
    text = gzip.decompress(vcf.read_bytes())
    vcf.write_bytes(gzip.compress(text))
    return dict(files=[vcf]), IngestError, r"g\.vcf\.gz: .*not BGZF"


@case
def missing_index(inbox):
    vcf = write_vcf(inbox / "m.vcf.gz", SAMPLES, recs(), index=False)
    return dict(files=[vcf]), IngestError, r"m\.vcf\.gz: no index found; expected m\.vcf\.gz\.tbi or m\.vcf\.gz\.csi"


@case
def index_of_another_file(inbox):
    vcf = write_vcf(inbox / "x.vcf.gz", SAMPLES, recs(40), index=False)
    other = write_vcf(inbox / "other.vcf.gz", SAMPLES, recs(7, start=5000))
    shutil.copy(str(other) + ".tbi", str(vcf) + ".tbi")
    return dict(files=[vcf]), IngestError, r"x\.vcf\.gz\.tbi: index does not belong to"


@case
def duplicate_sample_ids(inbox):
    vcf = write_vcf(inbox / "d.vcf.gz", ["S1", "S2", "S1"], recs())
    return dict(files=[vcf]), IngestError, r"d\.vcf\.gz: .*duplicate sample ID.*S1"


@case
def metadata_for_samples_not_in_the_file(inbox):
    vcf = write_vcf(inbox / "s.vcf.gz", SAMPLES, recs())
    meta = write_cohort_metadata(inbox / "meta.json", SAMPLES, extra_subjects=["GHOST-1"])
    return dict(files=[vcf], metadata=meta), IngestError, r"meta\.json: .*not in the genomic file.*GHOST-1"


@case
def samples_without_metadata(inbox):
    vcf = write_vcf(inbox / "s.vcf.gz", SAMPLES, recs())
    meta = write_cohort_metadata(inbox / "meta.json", SAMPLES[:2])
    return dict(files=[vcf], metadata=meta), IngestError, r"meta\.json: .*SYD-0003"


@case
def malformed_phenopackets_unknown_field(inbox):
    vcf = write_vcf(inbox / "s.vcf.gz", SAMPLES, recs())
    meta = write_cohort_metadata(inbox / "meta.json", SAMPLES)
    doc = json.loads(meta.read_text())
    doc["members"][1]["subject"]["favouriteColour"] = "blue"
    meta.write_text(json.dumps(doc))
    return dict(files=[vcf], metadata=meta), IngestError, r"meta\.json: .*favouriteColour"


@case
def malformed_phenopackets_bad_hpo(inbox):
    vcf = write_vcf(inbox / "s.vcf.gz", SAMPLES, recs())
    meta = write_cohort_metadata(inbox / "meta.json", SAMPLES)
    doc = json.loads(meta.read_text())
    doc["members"][0]["phenotypicFeatures"] = [{"type": {"id": "HPO:12", "label": "x"}}]
    meta.write_text(json.dumps(doc))
    return dict(files=[vcf], metadata=meta), IngestError, r"meta\.json: .*HPO:12"


@case
def malformed_json(inbox):
    vcf = write_vcf(inbox / "s.vcf.gz", SAMPLES, recs())
    meta = inbox / "meta.json"
    meta.write_text('{"id": "x", "members": [\n')
    return dict(files=[vcf], metadata=meta), IngestError, r"meta\.json: .*line"


@case
def unknown_region(inbox):
    vcf = write_vcf(inbox / "s.vcf.gz", SAMPLES, recs())
    return dict(files=[vcf], region="atlantis"), NotFoundError, r"unknown region 'atlantis'"


@case
def non_admin_ingesting(inbox):
    vcf = write_vcf(inbox / "s.vcf.gz", SAMPLES, recs())
    return dict(files=[vcf], actor="alice"), RefusedError, r"alice is not an admin of region 'syd'"


@case
def other_regions_admin_ingesting(inbox):
    vcf = write_vcf(inbox / "s.vcf.gz", SAMPLES, recs())
    return dict(files=[vcf], actor="admin-norr"), RefusedError, r"admin-norr is not an admin of region 'syd'"


@case
def dataset_name_with_dotdot(inbox):
    vcf = write_vcf(inbox / "s.vcf.gz", SAMPLES, recs())
    return dict(files=[vcf], name="../norr/x"), InvalidInputError, r"dataset name '\.\./norr/x' is not allowed"


@case
def file_path_with_dotdot(inbox):
    write_vcf(inbox / "s.vcf.gz", SAMPLES, recs())
    return dict(files=[str(inbox / ".." / "inbox" / "s.vcf.gz")]), IngestError, r"contains '\.\.'"


@case
def symlink_pointing_outside(inbox):
    secret = inbox.parent / "secret"
    secret.mkdir()
    target = write_vcf(secret / "s.vcf.gz", SAMPLES, recs())
    link = inbox / "s.vcf.gz"
    link.symlink_to(target)
    os.symlink(str(target) + ".tbi", str(link) + ".tbi")
    return dict(files=[link]), IngestError, r"symlink pointing outside its folder"


@case
def plain_text_vcf(inbox):
    vcf = write_vcf(inbox / "p.vcf", SAMPLES, recs(), compress=False)
    return dict(files=[vcf]), IngestError, r"p\.vcf: .*bgzip"


@case
def unsorted_records(inbox):
    body = recs(10)
    body[3], body[6] = body[6], body[3]
    vcf = write_vcf(inbox / "u.vcf.gz", SAMPLES, body, index=False)
    # index a sorted twin, as a careless pipeline might
    write_vcf(inbox / "sorted.vcf.gz", SAMPLES, recs(10))
    shutil.copy(inbox / "sorted.vcf.gz.tbi", str(vcf) + ".tbi")
    return dict(files=[vcf]), IngestError, r"u\.vcf\.gz"


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_input_is_refused_whole(people, inbox, name):
    kwargs, error, pattern = BAD_CASES[name](inbox)
    args = dict(region="syd", name="syd-cohort", actor="admin-syd")
    args.update(kwargs)
    before = state(people)
    with pytest.raises(error, match=pattern):
        ingest_dataset(people, **args)
    assert state(people) == before


def test_existing_dataset_is_never_overwritten(people, good, inbox):
    vcf, meta = good
    ingest_dataset(people, "syd", "syd-cohort", [vcf], "admin-syd", metadata=meta)
    stored = people.platform.dataset_dir("syd", "syd-cohort") / "syd.vcf.gz"
    digest = hashlib.sha256(stored.read_bytes()).hexdigest()
    other = write_vcf(inbox / "other.vcf.gz", SAMPLES, recs(5))
    before = state(people)
    with pytest.raises(InvalidInputError, match="dataset 'syd-cohort' already exists"):
        ingest_dataset(people, "syd", "syd-cohort", [other], "admin-syd")
    assert state(people) == before
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest


def test_failure_after_validation_leaves_nothing(people, good, monkeypatch):
    """A crash between validation and commit (here: the audit store failing) rolls everything back."""
    vcf, meta = good
    before = state(people)

    def broken(records):
        raise OSError("disk full")

    monkeypatch.setattr(people.audit, "append_many", broken)
    with pytest.raises(OSError, match="disk full"):
        ingest_dataset(people, "syd", "syd-cohort", [vcf], "admin-syd", metadata=meta)
    monkeypatch.undo()
    assert state(people) == before


# -- attacks: a region admin trying to pull other data into their dataset ------------------------


@pytest.fixture
def seeded(people, good):
    """syd has a stored dataset; the attacker is norr's admin."""
    vcf, meta = good
    ingest_dataset(people, "syd", "syd-cohort", [vcf], "admin-syd", metadata=meta)
    return people


def attack(catalog, **kwargs):
    args = dict(region="norr", name="loot", actor="admin-norr")
    args.update(kwargs)
    before = state(catalog)
    with pytest.raises((IngestError, InvalidInputError)) as info:
        ingest_dataset(catalog, **args)
    assert state(catalog) == before
    return str(info.value)


def test_the_signing_key_cannot_be_ingested_as_a_reference(seeded, inbox):
    key = seeded.platform.keys_dir / "audit-signing.key"
    vcf = write_vcf(inbox / "n.vcf.gz", ["NOR-1"], [("chr1", 5, "A", "G", ["0/1"])])
    assert "a reference is declared only for CRAM" in attack(seeded, files=[vcf], reference=key)
    ref = write_reference_fasta(inbox / "ref.fa", [("chr1", 2000)])
    cram = write_bam(inbox / "r.cram", ["NOR-1"], [("chr1", 100)], contigs=(("chr1", 2000),), reference=ref)
    shutil.copy(key, inbox / "key.fa")
    assert "no .fai index" in attack(seeded, files=[cram], reference=inbox / "key.fa")
    shutil.copy(str(ref) + ".fai", inbox / "key.fa.fai")
    assert "not a FASTA file" in attack(seeded, files=[cram], reference=inbox / "key.fa")


def test_files_inside_the_platform_home_are_refused(seeded, inbox):
    stored = seeded.platform.dataset_dir("syd", "syd-cohort")
    assert "which ingest never reads from" in attack(seeded, files=[stored / "syd.vcf.gz"])
    assert "which ingest never reads from" in attack(
        seeded, files=[write_vcf(inbox / "n.vcf.gz", SAMPLES, recs())],
        metadata=stored / "syd-phenopackets.json")
    # through a symlinked folder: only the real path counts
    (inbox / "link").symlink_to(stored)
    assert "which ingest never reads from" in attack(seeded, files=[inbox / "link" / "syd.vcf.gz"])
    # the state folder, with the keys and databases
    assert "which ingest never reads from" in attack(
        seeded, files=[write_vcf(inbox / "m.vcf.gz", SAMPLES, recs())],
        metadata=seeded.platform.keys_dir / "audit-signing.key")


def test_hard_links_and_proc_files_are_refused(seeded, inbox, tmp_path):
    vcf = write_vcf(inbox / "h.vcf.gz", SAMPLES, recs())
    os.link(vcf, tmp_path / "elsewhere.vcf.gz")
    assert "has 2 hard links" in attack(seeded, files=[vcf])
    vcf2 = write_vcf(inbox / "p.vcf.gz", SAMPLES, recs())
    assert "which ingest never reads from" in attack(seeded, files=[vcf2], metadata="/proc/self/environ")


def test_a_file_swapped_after_planning_is_refused(people, inbox, monkeypatch):
    from ngp_research.ingest import register

    vcf = write_vcf(inbox / "s.vcf.gz", SAMPLES, recs())
    real_plan = register.plan_ingest

    def plan_then_swap(*a, **kw):
        plan = real_plan(*a, **kw)
        os.rename(vcf, inbox / "moved.vcf.gz")
        shutil.copy(inbox / "moved.vcf.gz", vcf)  # same name, another inode
        return plan

    monkeypatch.setattr(register, "plan_ingest", plan_then_swap)
    before = state(people)
    with pytest.raises(IngestError, match="changed while being ingested"):
        ingest_dataset(people, "syd", "syd-cohort", [vcf], "admin-syd")
    assert state(people) == before


def test_staging_left_by_a_killed_ingest_is_cleaned_up(people, good):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = people.platform.staging_dir("syd") / f"old.{dead.pid}.abc"
    stale.mkdir(parents=True)
    (stale / "half-copied.vcf.gz").write_bytes(b"x")
    vcf, meta = good
    ingest_dataset(people, "syd", "syd-cohort", [vcf], "admin-syd", metadata=meta)
    assert not stale.exists() and not people.platform.staging_dir("syd").exists()


def test_a_folder_without_a_catalog_entry_is_never_overwritten(people, good):
    vcf, meta = good
    orphan = people.platform.dataset_dir("syd", "syd-cohort")
    orphan.mkdir(parents=True)
    (orphan / "keep.txt").write_text("left by a crash")
    with pytest.raises(InvalidInputError, match="the catalog has no such dataset"):
        ingest_dataset(people, "syd", "syd-cohort", [vcf], "admin-syd", metadata=meta)
    assert (orphan / "keep.txt").read_text() == "left by a crash"


def test_deeply_nested_metadata_is_refused_cleanly(people, inbox):
    vcf = write_vcf(inbox / "s.vcf.gz", SAMPLES, recs())
    meta = inbox / "deep.json"
    meta.write_text("[" * 200_000 + "]" * 200_000)
    before = state(people)
    with pytest.raises(IngestError, match="nested too deeply"):
        ingest_dataset(people, "syd", "syd-cohort", [vcf], "admin-syd", metadata=meta)
    assert state(people) == before
