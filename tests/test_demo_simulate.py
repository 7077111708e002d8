"""Tests for ngp_research.demo.simulate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pysam
import pytest
from google.protobuf import json_format
from phenopackets import Cohort

from ngp_research.demo.simulate import (
    DEFAULT_REGIONS,
    PlantedVariant,
    SimulatedCohort,
    simulate_cohorts,
)

BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default")
    cohorts, planted = simulate_cohorts(out)
    return out, cohorts, planted


def _read_vcf(path: Path):
    """Return (samples, list of (contig, pos, ref, alts), dosage matrix variants x samples)."""
    with pysam.VariantFile(str(path)) as vcf:
        samples = list(vcf.header.samples)
        sites, rows = [], []
        for rec in vcf:
            sites.append((rec.contig, rec.pos, rec.ref, rec.alts))
            rows.append([sum(rec.samples[s]["GT"]) for s in samples])
    return samples, sites, np.asarray(rows, dtype=float)


def _file_bytes(cohorts, out: Path) -> dict[str, bytes]:
    files = {}
    for c in cohorts:
        for p in (c.vcf, c.index, c.metadata):
            files[str(p.relative_to(out))] = p.read_bytes()
    files["planted.json"] = (out / "planted.json").read_bytes()
    return files


def test_layout_and_types(default_run):
    out, cohorts, planted = default_run
    assert [c.region for c in cohorts] == list(DEFAULT_REGIONS)
    for c in cohorts:
        assert isinstance(c, SimulatedCohort)
        assert c.vcf == out / c.region / f"{c.region}-cohort.vcf.gz"
        assert c.index == Path(str(c.vcf) + ".tbi")
        assert c.metadata == out / c.region / f"{c.region}-phenopackets.json"
        assert c.index.exists() and c.metadata.exists()
        assert len(c.samples) == 40
        # real BGZF: gzip magic with the BC extra field, and the EOF block
        data = c.vcf.read_bytes()
        assert data[:4] == b"\x1f\x8b\x08\x04" and data[12:14] == b"BC"
        assert data.endswith(BGZF_EOF)
        assert not list(c.vcf.parent.glob("*.tmp"))
    assert cohorts[1].samples[0] == "UPP-0001"
    assert cohorts[0].samples[-1] == "NOR-0040"
    assert 1 <= len(planted) <= 5
    assert all(isinstance(p, PlantedVariant) for p in planted)
    doc = json.loads((out / "planted.json").read_text())
    assert doc["traits"]["quantitative"]["name"] and doc["traits"]["binary"]["name"]
    assert [(v["contig"], v["pos"], v["ref"], v["alt"]) for v in doc["planted"]] == [
        (p.contig, p.pos, p.ref, p.alt) for p in planted
    ]


def test_reproducible_and_seed_dependent(tmp_path):
    kwargs = dict(regions=("norr", "stockholm", "syd"), samples_per_region=8, variants=150)
    a, _ = simulate_cohorts(tmp_path / "a", seed=7, **kwargs)
    b, _ = simulate_cohorts(tmp_path / "b", seed=7, **kwargs)
    c, _ = simulate_cohorts(tmp_path / "c", seed=8, **kwargs)
    fa, fb, fc = (_file_bytes(x, tmp_path / n) for x, n in ((a, "a"), (b, "b"), (c, "c")))
    assert fa == fb
    for c_ in a:
        rel = str(c_.vcf.relative_to(tmp_path / "a"))
        meta = str(c_.metadata.relative_to(tmp_path / "a"))
        assert fa[rel] != fc[rel]
        assert fa[meta] != fc[meta]


def test_vcf_records_index_and_alleles(default_run):
    _, cohorts, _ = default_run
    all_samples = []
    site_lists = []
    for c in cohorts:
        samples, sites, dos = _read_vcf(c.vcf)
        assert tuple(samples) == c.samples
        all_samples += samples
        assert len(sites) == 2000
        assert dos.shape == (2000, 40)
        for contig, pos, ref, alts in sites:
            assert ref in {"A", "C", "G", "T"}
            assert alts is not None and len(alts) == 1 and alts[0] in {"A", "C", "G", "T"}
            assert alts[0] != ref
        with pysam.VariantFile(str(c.vcf)) as vcf:
            header_contigs = dict(vcf.header.contigs.items())
            assert set(header_contigs) == {"chr1", "chr2"}
            fetched = []
            for contig in ("chr1", "chr2"):
                positions = [s[1] for s in sites if s[0] == contig]
                assert positions == sorted(set(positions)), "positions must be strictly increasing"
                assert 1 <= positions[0] and positions[-1] <= header_contigs[contig].length
                fetched += [(r.contig, r.pos, r.ref, r.alts) for r in vcf.fetch(contig)]
            assert fetched == sites
            # a region query through the index returns exactly the matching records
            pos_lo, pos_hi = sites[100][1], sites[200][1]
            window = [(r.contig, r.pos) for r in vcf.fetch("chr1", pos_lo - 1, pos_hi)]
            assert window == [(s[0], s[1]) for s in sites if s[0] == "chr1" and pos_lo <= s[1] <= pos_hi]
        with pysam.TabixFile(str(c.vcf)) as tbx:
            assert set(tbx.contigs) == {"chr1", "chr2"}
        site_lists.append([s[:2] for s in sites])
    assert len(set(all_samples)) == len(all_samples) == 280
    assert all(s == site_lists[0] for s in site_lists), "all regions share the same sites"


def test_phenopackets_cohort(default_run):
    out, cohorts, _ = default_run
    n_cases = 0
    for c in cohorts:
        text = c.metadata.read_text()
        message = json_format.Parse(text, Cohort())
        assert message.id == f"{c.region}-cohort"
        assert message.meta_data.created_by == "ngp demo seed"
        assert message.meta_data.phenopacket_schema_version == "2.0"
        prefixes = {r.namespace_prefix for r in message.meta_data.resources}
        assert {"HP", "LOINC", "UCUM", "MONDO"} <= prefixes
        subjects = [m.subject.id for m in message.members]
        assert subjects == list(c.samples)
        for member in message.members:
            assert member.subject.sex in (1, 2)  # FEMALE, MALE
            hcm = [f for f in member.phenotypic_features if f.type.id == "HP:0001639"]
            assert len(hcm) == 1 and hcm[0].type.label == "Hypertrophic cardiomyopathy"
            if not hcm[0].excluded:
                n_cases += 1
                assert member.diseases and member.diseases[0].term.id.startswith("MONDO:")
            for f in member.phenotypic_features:
                assert f.type.id.split(":")[0] in prefixes and f.type.label
            assert len(member.phenotypic_features) <= 3
            (measurement,) = member.measurements
            assert measurement.assay.id == "LOINC:2093-3"
            assert measurement.value.quantity.unit.id == "UCUM:mg/dL"
            assert 0 < measurement.value.quantity.value < 1000
        # the JSON round-trips through protobuf without losing fields
        assert json_format.MessageToDict(message) == json.loads(text)
    assert 0.25 <= n_cases / 280 <= 0.35


def _trait_values(cohorts):
    quant, binary, samples = [], [], []
    for c in cohorts:
        for m in json.loads(c.metadata.read_text())["members"]:
            samples.append(m["subject"]["id"])
            quant.append(m["measurements"][0]["value"]["quantity"]["value"])
            hcm = [f for f in m["phenotypicFeatures"] if f["type"]["id"] == "HP:0001639"][0]
            binary.append(0.0 if hcm.get("excluded") else 1.0)
    return samples, np.asarray(quant), np.asarray(binary)


def _regression_t(dosage: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-variant simple linear regression t statistics (variants x samples)."""
    n = y.shape[0]
    x = dosage - dosage.mean(axis=1, keepdims=True)
    yc = y - y.mean()
    sxx = (x * x).sum(axis=1)
    ok = sxx > 0
    r = np.zeros(x.shape[0])
    r[ok] = (x[ok] @ yc) / np.sqrt(sxx[ok] * (yc @ yc))
    r = np.clip(r, -0.999999, 0.999999)
    return r * math.sqrt(n - 2) / np.sqrt(1 - r * r)


def test_association_signal(default_run):
    out, cohorts, planted = default_run
    blocks, sites = [], None
    for c in cohorts:
        _, s, dos = _read_vcf(c.vcf)
        sites = sites or [(x[0], x[1]) for x in s]
        blocks.append(dos)
    dosage = np.hstack(blocks)  # variants x 280
    samples, quant, binary = _trait_values(cohorts)
    assert samples == [s for c in cohorts for s in c.samples]
    doc = json.loads((out / "planted.json").read_text())
    strongest = max(doc["planted"], key=lambda v: v["variance_explained_quantitative"])
    idx = sites.index((strongest["contig"], strongest["pos"]))
    # quantitative trait: strict; binary trait (30 % cases, thresholded): a bit looser
    for y, max_rank, max_p in ((quant, 5, 1e-5), (binary, 10, 1e-4)):
        t = _regression_t(dosage, y)
        rank = 1 + int(np.sum(np.abs(t) > abs(t[idx])))
        p_value = math.erfc(abs(t[idx]) / math.sqrt(2))  # normal approximation, df = 278
        assert rank <= max_rank, (rank, t[idx])
        assert p_value < max_p, p_value
    # planted variants are common in the whole cohort
    for v in doc["planted"]:
        assert 0.1 <= v["alt_frequency"] <= 0.9


def _hudson_fst(p1, p2, n1, n2):
    num = (p1 - p2) ** 2 - p1 * (1 - p1) / (n1 - 1) - p2 * (1 - p2) / (n2 - 1)
    den = p1 * (1 - p2) + p2 * (1 - p1)
    return float(num.sum() / den.sum())


def test_population_structure(default_run):
    _, cohorts, _ = default_run
    first = _read_vcf(cohorts[0].vcf)[2]
    last = _read_vcf(cohorts[-1].vcf)[2]
    fst_far = _hudson_fst(first.mean(1) / 2, last.mean(1) / 2, 80, 80)
    rng = np.random.default_rng(0)
    cols = rng.permutation(40)
    a, b = first[:, cols[:20]], first[:, cols[20:]]
    fst_within = _hudson_fst(a.mean(1) / 2, b.mean(1) / 2, 40, 40)
    assert fst_far > 0.02
    assert fst_far > fst_within + 0.01


def test_small_and_custom_regions(tmp_path):
    cohorts, planted = simulate_cohorts(
        tmp_path, regions=("gotland", "Gothenburg", "got"), samples_per_region=2, variants=10,
        seed=3, contigs=("1", "2", "3"),
    )
    prefixes = [c.samples[0].split("-")[0] for c in cohorts]
    assert len(set(prefixes)) == 3 and all(len(p) == 3 and p.isupper() for p in prefixes)
    total = 0
    for c in cohorts:
        _, sites, _ = _read_vcf(c.vcf)
        total = len(sites)
        assert [s[0] for s in sites] == ["1"] * 4 + ["2"] * 3 + ["3"] * 3
    assert total == 10
    assert len(planted) == 5


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(samples_per_region=1), "samples_per_region"),
        (dict(samples_per_region=2.5), "samples_per_region"),
        (dict(variants=9), "variants"),
        (dict(regions=()), "regions"),
        (dict(regions=("norr", "norr")), "regions"),
        (dict(regions="norr"), "regions"),
        (dict(regions=("../evil",)), "regions"),
        (dict(seed=-1), "seed"),
        (dict(contigs=()), "contigs"),
        (dict(contigs=("chr1", "chr1")), "contigs"),
    ],
)
def test_argument_errors(tmp_path, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        simulate_cohorts(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
