"""The cohort API against PLINK 2 and bcftools on msprime data, with and without missing genotypes.

One Dask cluster of two workers (each with its Hail context) serves every test in the module; a
second cluster of one worker reruns the pipeline to show the worker count does not change a bit.

Tolerances (PLINK 2 prints 6 significant digits, so its rounding alone is up to 5e-6 relative):
- Hardy-Weinberg p, linear beta/se/t/p, PCA eigenvalues: 1e-6 relative beyond that, i.e. rtol 6e-6.
- Logistic: the Debian plink2 fits in single precision (float32: 6e-8 relative per operation, a few
  hundred samples summed per iteration, stopping once the change is below its tolerance). We allow
  |beta - plink| <= 1e-3 * se (a thousandth of a standard error: no inference changes), se within
  1e-3 relative, and p within 1e-3 relative, on the variants PLINK did not hand to Firth regression.
"""

import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pysam
import pytest

from ngp_research.cohort import Cohort, CohortDataset, CohortError
from ngp_research.cohort.clinical import read_annotations
from ngp_research.demo.annotation import DEMO_MAX_AF, write_demo_reference
from ngp_research.demo.simulate import simulate_cohorts

pytestmark = pytest.mark.skipif(not (shutil.which("plink2") and shutil.which("bcftools") and shutil.which("java")),
                                reason="needs plink2, bcftools and Java (make test installs them)")

REGIONS = ("norr", "uppsala", "syd")
PRINTED = 6e-6  # PLINK's 6 significant digits (5e-6) plus 1e-6


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _with_missing(src: Path, dst: Path, rate: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with pysam.VariantFile(str(src)) as vin, pysam.VariantFile(str(dst), "wz", header=vin.header) as vout:
        for rec in vin:
            for sample in rec.samples.values():
                if rng.random() < rate:
                    sample["GT"] = (None, None)
            vout.write(rec)
    pysam.tabix_index(str(dst), preset="vcf", force=True)


class Reference:
    """Region datasets plus what plink2 and bcftools say of their merge."""

    def __init__(self, root: Path, cohorts, kind: str):
        self.root = root / kind
        self.root.mkdir()
        self.datasets = []
        for i, c in enumerate(cohorts):
            vcf = c.vcf
            if kind == "missing":
                vcf = self.root / c.vcf.name
                _with_missing(c.vcf, vcf, 0.06, seed=i)
            self.datasets.append(CohortDataset(f"{c.region}-cohort", c.region, str(vcf), _sha256(vcf),
                                               str(c.metadata)))

    def run(self, samples: pd.DataFrame) -> None:
        r = self.root
        subprocess.run(["bcftools", "merge", "-Oz", "-o", str(r / "all.vcf.gz")] + [d.vcf for d in self.datasets],
                       check=True, capture_output=True)
        (r / "groups.txt").write_text("".join(f"{s}\t{g}\n" for s, g in zip(samples.index, samples.region)))
        subprocess.run(["bcftools", "+fill-tags", str(r / "all.vcf.gz"), "-Oz", "-o", str(r / "tags.vcf.gz"), "--",
                        "-S", str(r / "groups.txt"), "-t", "AF,AC,AN"], check=True, capture_output=True)
        pheno = pd.DataFrame({"#IID": samples.index, "chol": samples.cholesterol,
                              "hcm": samples.hypertrophic_cardiomyopathy.astype(int) + 1})
        pheno.to_csv(r / "pheno.tsv", sep="\t", index=False)
        covar = pd.DataFrame({"#IID": samples.index, "sexc": (samples.sex == "MALE").astype(int),
                              "age": samples.age})
        covar.to_csv(r / "covar.tsv", sep="\t", index=False)
        plink = ["plink2", "--threads", "1", "--allow-extra-chr"]
        subprocess.run(plink + ["--vcf", str(r / "all.vcf.gz"), "--make-pgen", "--out", str(r / "all")],
                       check=True, capture_output=True)
        subprocess.run(plink + ["--pfile", str(r / "all"), "--hardy", "--glm", "hide-covar", "omit-ref",
                                "--pheno", str(r / "pheno.tsv"), "--covar", str(r / "covar.tsv"),
                                "--out", str(r / "all")], check=True, capture_output=True)
        subprocess.run(plink + ["--pfile", str(r / "all"), "--maf", "0.01", "--pca", "4", "--out", str(r / "pca")],
                       check=True, capture_output=True)

    def table(self, name: str) -> pd.DataFrame:
        return pd.read_csv(self.root / name, sep="\t")


@pytest.fixture(scope="module")
def workdir():
    path = Path(tempfile.mkdtemp(prefix="ngp-cohort-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def simulated(workdir):
    return simulate_cohorts(workdir / "sim", regions=REGIONS, samples_per_region=60, variants=1200, seed=11)


@pytest.fixture(scope="module")
def cluster(workdir):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0", local_directory=str(workdir / "dask"), memory_limit=0)
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


def _cohort(reference, client, workdir, **kw):
    cohort = Cohort(reference.datasets, client=client, cache_dir=str(workdir / "cache"), progress=False,
                    hail_memory="1g", **kw)
    ages = np.random.default_rng(5).integers(20, 80, len(cohort.samples)).astype(float)
    cohort.samples["age"] = ages
    return cohort


@pytest.fixture(scope="module", params=["complete", "missing"])
def case(request, simulated, workdir, cluster):
    reference = Reference(workdir, simulated[0], request.param)
    cohort = _cohort(reference, cluster, workdir)
    reference.run(cohort.samples)
    return reference, cohort


def _ids(table):
    return (table.contig + "_" + table.position.astype(str) + "_" + table.ref + "_" + table.alt).to_numpy()


def test_allele_frequencies_equal_bcftools_fill_tags(case):
    reference, cohort = case
    ours = cohort.allele_frequencies(by="region").set_index("variant_id")
    with pysam.VariantFile(str(reference.root / "tags.vcf.gz")) as vcf:
        rows = [(rec.id, rec.info["AC"][0], rec.info["AN"], rec.info["AF"][0],
                 *[(rec.info[f"AC_{g}"][0], rec.info[f"AN_{g}"], rec.info[f"AF_{g}"][0]) for g in REGIONS])
                for rec in vcf]
    assert len(rows) == len(ours) == 1200

    def as_bcftools(value):  # bcftools computes AF as a float32 and writes it with 6 significant digits
        return np.float32(float(f"{np.float32(value):.6g}"))

    for variant_id, ac, an, af, *groups in rows:
        mine = ours.loc[variant_id]
        assert (mine.ac, mine.an) == (ac, an)
        assert as_bcftools(mine.af) == np.float32(af)
        for g, (gac, gan, gaf) in zip(REGIONS, groups):
            assert (mine[f"ac_{g}"], mine[f"an_{g}"]) == (gac, gan)
            assert as_bcftools(mine[f"af_{g}"]) == np.float32(gaf)


def test_hardy_weinberg_equals_plink2_hardy(case):
    reference, cohort = case
    ours = cohort.hardy_weinberg().set_index("variant_id")
    plink = reference.table("all.hardy").set_index("ID")
    ours = ours.loc[plink.index]
    np.testing.assert_allclose(ours.p_value, plink.P, rtol=PRINTED, atol=0)
    # PLINK's A1 is REF here: its HOM_A1 count is our hom-ref count.
    np.testing.assert_array_equal(ours.n_hom_ref, plink.HOM_A1_CT)
    np.testing.assert_array_equal(ours.n_het, plink.HET_A1_CT)


def test_linear_association_with_covariates_equals_plink2_glm(case):
    reference, cohort = case
    ours = cohort.association("cholesterol", covariates=["sex", "age"]).set_index("variant_id")
    plink = reference.table("all.chol.glm.linear").set_index("ID")
    plink = plink[plink.ERRCODE == "."]
    assert len(plink) > 1000
    ours = ours.loc[plink.index]
    np.testing.assert_array_equal(ours.n, plink.OBS_CT)
    for mine, theirs in (("beta", "BETA"), ("se", "SE"), ("t_stat", "T_STAT"), ("p_value", "P")):
        np.testing.assert_allclose(ours[mine], plink[theirs], rtol=PRINTED, atol=0, err_msg=mine)


def test_logistic_association_within_single_precision_envelope(case):
    reference, cohort = case
    ours = cohort.association("hypertrophic_cardiomyopathy", covariates=["sex", "age"]).set_index("variant_id")
    plink = reference.table("all.hcm.glm.logistic.hybrid").set_index("ID")
    plink = plink[(plink["FIRTH?"] == "N") & (plink.ERRCODE == ".")]
    assert len(plink) > 500
    ours = ours.loc[plink.index]
    assert ours.converged.all()
    np.testing.assert_array_equal(ours.n, plink.OBS_CT)
    assert (np.abs(ours.beta - np.log(plink.OR)) <= 1e-3 * ours.se + 1e-6).all()
    np.testing.assert_allclose(ours.se, plink["LOG(OR)_SE"], rtol=1e-3)
    np.testing.assert_allclose(ours.p_value, plink.P, rtol=1e-3)


def test_pca_equals_plink2_exact_pca(case):
    reference, cohort = case
    result = cohort.pca(k=4, min_maf=0.01)
    eigenvalues = np.loadtxt(reference.root / "pca.eigenval")
    np.testing.assert_allclose(result.eigenvalues, eigenvalues, rtol=PRINTED)
    vectors = reference.table("pca.eigenvec").set_index("#IID").loc[cohort.samples.index]
    for i in range(4):
        ours, theirs = result.scores[f"PC{i + 1}"].to_numpy(), vectors[f"PC{i + 1}"].to_numpy()
        sign = np.sign(ours @ theirs)
        np.testing.assert_allclose(sign * ours, theirs, atol=2e-6)
    assert list(result.scores.region.unique()) == list(REGIONS)


def test_sample_qc_counts_agree_with_plink2_missing(case, workdir):
    reference, cohort = case
    qc = cohort.sample_qc()
    r = reference.root
    subprocess.run(["plink2", "--threads", "1", "--allow-extra-chr", "--pfile", str(r / "all"), "--missing",
                    "--out", str(r / "qc")], check=True, capture_output=True)
    smiss = reference.table("qc.smiss").set_index("#IID").loc[qc.index]
    np.testing.assert_array_equal(qc.n_not_called, smiss.MISSING_CT)
    assert (qc.n_called + qc.n_not_called == 1200).all()
    if reference.root.name == "complete":
        assert (qc.call_rate == 1).all()


def test_worker_count_does_not_change_a_single_bit(case, workdir):
    reference, cohort = case
    if reference.root.name != "missing":
        pytest.skip("checked once, on the data with missing calls")
    # its own cache: one worker also converts and exports the shards again
    alone = Cohort(reference.datasets, workers=1, cache_dir=str(workdir / "cache-one-worker"), progress=False,
                   hail_memory="1g")
    try:
        alone.samples["age"] = cohort.samples["age"]
        assert len(alone.client.scheduler_info()["workers"]) == 1
        pd.testing.assert_frame_equal(alone.variant_qc(), cohort.variant_qc(), check_exact=True)
        pd.testing.assert_frame_equal(alone.sample_qc(), cohort.sample_qc(), check_exact=True)
        for phenotype in ("cholesterol", "hypertrophic_cardiomyopathy"):
            pd.testing.assert_frame_equal(alone.association(phenotype, covariates=["sex", "age"], pcs=2),
                                          cohort.association(phenotype, covariates=["sex", "age"], pcs=2),
                                          check_exact=True)
        a, b = alone.pca(k=4), cohort.pca(k=4)
        assert np.array_equal(a.eigenvalues, b.eigenvalues)
        pd.testing.assert_frame_equal(a.scores, b.scores, check_exact=True)
    finally:
        alone.close()


def test_hail_mean_imputation_is_the_documented_alternative(case):
    reference, cohort = case
    plink_style = cohort.association("cholesterol", covariates=["sex"])
    hail_style = cohort.association("cholesterol", covariates=["sex"], missing="mean")
    assert hail_style.variant_id.tolist() == plink_style.variant_id.tolist()
    both = plink_style.beta.notna() & hail_style.beta.notna()
    assert both.sum() > 1000
    if reference.root.name == "complete":  # no missing call: the two conventions agree
        np.testing.assert_allclose(hail_style.beta[both], plink_style.beta[both], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(hail_style.p_value[both], plink_style.p_value[both], rtol=1e-5)
    else:  # with missing calls they differ, as documented
        assert not np.allclose(hail_style.beta[both], plink_style.beta[both], rtol=1e-6)


def test_conversion_happens_once_per_dataset_version(case, workdir):
    reference, cohort = case
    cohort.prepare()
    tables = sorted((workdir / "cache" / "datasets").glob("*.mt"))
    stamps = {t.name: (t / "_SUCCESS").stat().st_mtime_ns for t in tables}
    for d in reference.datasets:
        assert f"{d.sha256}-v1.mt" in stamps
    again = _cohort(reference, cohort.client, workdir)
    again.prepare()
    assert {t.name: (t / "_SUCCESS").stat().st_mtime_ns
            for t in (workdir / "cache" / "datasets").glob("*.mt") if t.name in stamps} == stamps
    assert again.key == cohort.key


def test_clinical_filter_returns_exactly_the_planted_variants(simulated, workdir, cluster):
    cohorts, planted = simulated
    reference = write_demo_reference(workdir / "reference", cohorts, planted)
    datasets = [CohortDataset(f"{c.region}-cohort", c.region, str(c.vcf), _sha256(c.vcf), str(c.metadata))
                for c in cohorts]
    cohort = Cohort(datasets, client=cluster, cache_dir=str(workdir / "cache"), progress=False, hail_memory="1g")
    hits = cohort.clinical_variants(reference / "demo-panel.bed", reference / "demo-annotations.tsv",
                                    max_af=DEMO_MAX_AF)
    wanted = {f"{p.contig}_{p.pos}_{p.ref}_{p.alt}" for p in planted}
    assert set(hits.variant_id) == wanted
    # exactly the carriers, with their genotypes and their region's frequency
    rows = cohort.variants().reset_index().set_index("variant_id").loc[sorted(wanted), "index"].to_numpy()
    dosages = cohort.genotypes(rows)
    for k, variant_id in enumerate(sorted(wanted)):
        carriers = set(cohort.samples.index[dosages[k] > 0])
        mine = hits[hits.variant_id == variant_id]
        assert set(mine["sample"]) == carriers
        assert (mine.genotype == np.where(mine.alt_dosage == 2, "hom_alt", "het")).all()
    annotations = read_annotations(reference / "demo-annotations.tsv")
    assert {"Benign", "Pathogenic"} <= set(annotations.clinical_significance)
    assert len(annotations) > len(wanted)  # decoys the filter had to leave out
    assert set(hits.region) <= set(REGIONS)
    # A gene list works as a panel too
    genes = sorted(set(hits.gene))
    by_list = cohort.clinical_variants(genes, reference / "demo-annotations.tsv", max_af=DEMO_MAX_AF)
    assert set(by_list.variant_id) == wanted


def test_argument_errors_name_the_argument(case, workdir):
    reference, cohort = case
    with pytest.raises(ValueError, match="phenotype: 'ldl'"):
        cohort.association("ldl")
    with pytest.raises(ValueError, match="covariates: 'height'"):
        cohort.association("cholesterol", covariates=["height"])
    with pytest.raises(ValueError, match="model:"):
        cohort.association("cholesterol", model="probit")
    with pytest.raises(ValueError, match="missing:"):
        cohort.association("cholesterol", missing="zero")
    with pytest.raises(ValueError, match="k:"):
        cohort.pca(k=0)
    with pytest.raises(ValueError, match="by: 'ancestry'"):
        cohort.allele_frequencies(by="ancestry")
    with pytest.raises(ValueError, match="max_af:"):
        cohort.clinical_variants(["NGPD1"], workdir / "missing.tsv", max_af=2)
    with pytest.raises(ValueError, match="workers:"):
        Cohort(reference.datasets, workers=0)


def test_from_workspace_reads_the_manifest_and_refuses_mixed_builds(simulated, workdir, cluster, tmp_path):
    cohorts, _ = simulated
    manifest = {"project": "cardio-gwas", "user": "rita", "datasets": []}
    for c in cohorts:
        manifest["datasets"].append({
            "name": f"{c.region}-cohort", "region": c.region, "kind": "vcf", "samples": 60, "genome_build": None,
            "files": [{"name": c.vcf.name, "path": str(c.vcf), "role": "data", "sha256": _sha256(c.vcf)},
                      {"name": c.index.name, "path": str(c.index), "role": "index", "sha256": "x"},
                      {"name": c.metadata.name, "path": str(c.metadata), "role": "metadata", "sha256": "y"}]})
    path = tmp_path / "workspace.json"
    path.write_text(json.dumps(manifest))
    cohort = Cohort.from_workspace(str(path), datasets=["norr-cohort", "syd-cohort"], client=cluster,
                                   cache_dir=str(workdir / "cache"), progress=False)
    assert sorted(cohort.samples.region.unique()) == ["norr", "syd"]
    assert cohort.samples.loc["SYD-0001", "dataset"] == "syd-cohort"
    assert cohort.samples.cholesterol.notna().all()
    assert cohort.samples.hypertrophic_cardiomyopathy.dtype == bool

    with pytest.raises(CohortError, match="not tagged"):
        Cohort.from_workspace(manifest, datasets=["ost-cohort"], client=cluster)
    with pytest.raises(CohortError, match="no tagged variant dataset"):
        Cohort.from_workspace({"project": "p", "datasets": []}, client=cluster)
    with pytest.raises(CohortError, match="no workspace manifest"):
        Cohort.from_workspace(str(tmp_path / "absent.json"), client=cluster)

    # Another genome build: same contig names, other lengths.
    other = tmp_path / "other.vcf"
    text = pysam.VariantFile(str(cohorts[0].vcf)).header
    lines = str(text).replace("##contig=<ID=chr1,length=", "##contig=<ID=chr1,length=9")
    other.write_text(lines)
    pysam.tabix_compress(str(other), str(other) + ".gz")
    mixed = json.loads(json.dumps(manifest))
    mixed["datasets"][1]["files"][0]["path"] = str(other) + ".gz"
    with pytest.raises(CohortError, match="different genome builds"):
        Cohort.from_workspace(mixed, client=cluster)
    mixed = json.loads(json.dumps(manifest))
    mixed["datasets"][0]["genome_build"], mixed["datasets"][1]["genome_build"] = "GRCh37", "GRCh38"
    with pytest.raises(CohortError, match="genome builds differ"):
        Cohort.from_workspace(mixed, client=cluster)


def test_same_sample_id_in_two_regions_stays_distinct(workdir, cluster, tmp_path):
    cohorts, _ = simulate_cohorts(tmp_path / "twin", regions=("norr", "syd"), samples_per_region=5, variants=40,
                                  seed=3)
    # Rename syd's samples to norr's IDs: two regions, the same IDs.
    renamed = tmp_path / "syd.vcf.gz"
    with pysam.VariantFile(str(cohorts[1].vcf)) as vin:
        header = str(vin.header).replace("SYD-", "NOR-")
        body = "".join(str(rec) for rec in vin)
    (tmp_path / "syd.vcf").write_text(header + body)
    pysam.tabix_compress(str(tmp_path / "syd.vcf"), str(renamed))
    datasets = [CohortDataset("norr-cohort", "norr", str(cohorts[0].vcf), _sha256(cohorts[0].vcf), None),
                CohortDataset("syd-cohort", "syd", str(renamed), _sha256(renamed), None)]
    cohort = Cohort(datasets, client=cluster, cache_dir=str(workdir / "cache"), progress=False)
    assert len(cohort.samples) == 10 and cohort.samples.index.is_unique
    assert cohort.samples.loc["syd/NOR-0001", "region"] == "syd"
    assert cohort.samples.loc["syd/NOR-0001", "original_id"] == "NOR-0001"
    qc = cohort.sample_qc()
    assert len(qc) == 10 and (qc.n_called == 40).all()
