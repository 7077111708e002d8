"""The papermill report templates of notebooks/reports, run on small simulated cohorts.

One simulated project per module: three regions of 12 samples and 300 variants, with the ``syd``
dataset cut down to 3 samples so that one group is smaller than the masking threshold. Each template
runs twice with the same inputs (a plain ``python3`` kernel, one Dask worker, the workspace given
by ``NGP_WORKSPACE_MANIFEST`` and ``NGP_COHORT_CACHE`` as outside a workspace); the first run
converts the data, the second reuses the cache, and both must write the same TSVs.
"""

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pysam
import pytest
from bs4 import BeautifulSoup

from ngp_research.demo.annotation import DEMO_MAX_AF, write_demo_reference
from ngp_research.demo.simulate import simulate_cohorts
from ngp_research.reports.masking import MASK_NOTE, SUPPRESSED

pytestmark = pytest.mark.skipif(not shutil.which("java"), reason="the cohort engine needs Java (make test installs it)")

REPORTS = Path(__file__).parents[1] / "notebooks" / "reports"
REGIONS = ("norr", "uppsala", "syd")
SMALL_REGION, SMALL_SIZE = "syd", 3
MIN_COUNT = 5
SMALL_COUNTS = {str(n) for n in range(1, MIN_COUNT)}

EXPECTED_PARAMETERS = {
    "variant-review": {
        "samples": ("list", "[]"),
        "panel": ("str", '"/reference/demo-panel.bed"'),
        "annotations": ("str", '"/reference/demo-annotations.tsv"'),
        "max_af": ("float", "0.95"),
        "min_count": ("int", "5"),
        "workers": ("int", "2"),
    },
    "cohort-summary": {
        "phenotype": ("str", '"cholesterol"'),
        "covariates": ("list", '["sex"]'),
        "pcs": ("int", "2"),
        "min_count": ("int", "5"),
        "workers": ("int", "2"),
    },
}


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _keep_first_samples(src: Path, dst: Path, n: int) -> None:
    """A copy of a VCF with only its first ``n`` samples (bgzipped and indexed)."""
    with pysam.VariantFile(str(src)) as vcf:
        header = str(vcf.header).splitlines()
        body = [str(rec).rstrip("\n").split("\t") for rec in vcf]
    header[-1] = "\t".join(header[-1].split("\t")[: 9 + n])
    plain = dst.with_suffix("")
    plain.write_text("\n".join(header) + "\n" + "".join("\t".join(fields[: 9 + n]) + "\n" for fields in body))
    pysam.tabix_compress(str(plain), str(dst), force=True)
    pysam.tabix_index(str(dst), preset="vcf", force=True)


@dataclasses.dataclass
class Project:
    root: Path
    cohorts: list
    planted: list
    reference: Path

    def run(self, template: str, name: str, **parameters) -> tuple[Path, nbformat.NotebookNode]:
        run_dir = self.root / "runs" / name
        run_dir.mkdir(parents=True)
        output = run_dir / f"{template}.ipynb"
        papermill.execute_notebook(str(REPORTS / f"{template}.ipynb"), str(output), parameters=parameters,
                                   kernel_name="python3", cwd=str(run_dir), progress_bar=False)
        return run_dir, nbformat.read(str(output), as_version=4)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-templates")
    cohorts, planted = simulate_cohorts(root / "sim", regions=REGIONS, samples_per_region=12, variants=300, seed=23)
    small = next(c for c in cohorts if c.region == SMALL_REGION)
    cut = root / "small" / f"{SMALL_REGION}-cohort.vcf.gz"
    cut.parent.mkdir()
    _keep_first_samples(small.vcf, cut, SMALL_SIZE)
    cohorts = [dataclasses.replace(c, vcf=cut, index=Path(f"{cut}.tbi"), samples=c.samples[:SMALL_SIZE])
               if c is small else c for c in cohorts]
    reference = write_demo_reference(root / "reference", cohorts, planted)
    manifest = {"project": "cardio-gwas", "user": "rita", "datasets": []}
    for c in cohorts:
        manifest["datasets"].append({
            "name": f"{c.region}-cohort", "region": c.region, "kind": "vcf", "samples": len(c.samples),
            "genome_build": None,
            "files": [{"name": c.vcf.name, "path": str(c.vcf), "role": "data", "sha256": _sha256(c.vcf)},
                      {"name": c.index.name, "path": str(c.index), "role": "index", "sha256": _sha256(c.index)},
                      {"name": c.metadata.name, "path": str(c.metadata), "role": "metadata",
                       "sha256": _sha256(c.metadata)}]})
    (root / "workspace.json").write_text(json.dumps(manifest))
    with pytest.MonkeyPatch.context() as env:  # the kernels papermill starts inherit this environment
        env.setenv("NGP_WORKSPACE_MANIFEST", str(root / "workspace.json"))
        env.setenv("NGP_COHORT_CACHE", str(root / "cache"))
        env.delenv("NGP_DASK_GATEWAY", raising=False)
        yield Project(root, cohorts, planted, reference)


@pytest.fixture(scope="module")
def review(project):
    parameters = dict(panel=str(project.reference / "demo-panel.bed"),
                      annotations=str(project.reference / "demo-annotations.tsv"), max_af=DEMO_MAX_AF,
                      min_count=MIN_COUNT, workers=1)
    return [project.run("variant-review", f"review-{i}", **parameters) for i in (1, 2)]


@pytest.fixture(scope="module")
def summary(project):
    parameters = dict(phenotype="cholesterol", covariates=["sex"], pcs=2, min_count=MIN_COUNT, workers=1)
    return [project.run("cohort-summary", f"summary-{i}", **parameters) for i in (1, 2)]


def _errors(notebook):
    return [output for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.get("outputs", []) if output.output_type == "error"]


def _text(notebook) -> str:
    """Everything the report shows: its markdown cells and its cells' text, markdown and HTML outputs."""
    parts = [cell.source for cell in notebook.cells if cell.cell_type == "markdown"]
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            for kind in ("text/markdown", "text/plain", "text/html"):
                parts.append(output.get("data", {}).get(kind, ""))
    return "\n".join(parts)


def _aggregate_tables(notebook):
    """The HTML tables displayed by the cells tagged ``aggregate``, as lists of rows of cell texts."""
    tables = []
    for cell in notebook.cells:
        if "aggregate" not in cell.metadata.get("tags", []):
            continue
        for output in cell.get("outputs", []):
            html = output.get("data", {}).get("text/html")
            if html:
                for table in BeautifulSoup(html, "html.parser").find_all("table"):
                    tables.append([[c.get_text(strip=True) for c in row.find_all(["th", "td"])]
                                   for row in table.find_all("tr")])
    return tables


def _data_cells(table):
    """The data cells (``td``) of a parsed table: the row labels of the index are ``th``."""
    return [cell for row in table[1:] for cell in row[1:]]


@pytest.mark.parametrize("template", sorted(EXPECTED_PARAMETERS))
def test_parameters_are_inferred_and_documented(template):
    path = REPORTS / f"{template}.ipynb"
    inferred = papermill.inspect_notebook(str(path))
    expected = EXPECTED_PARAMETERS[template]
    assert {name: (p["inferred_type_name"], p["default"]) for name, p in inferred.items()} == expected
    assert all(p["help"] for p in inferred.values())
    notebook = nbformat.read(str(path), as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and notebook.cells[1] is tagged[0]
    # The first cell documents every parameter: name, type, meaning, default.
    doc = notebook.cells[0]
    assert doc.cell_type == "markdown" and "| name | type | meaning | default |" in doc.source
    rows = {m.group(1): (m.group(2).strip(), m.group(3).strip())
            for m in re.finditer(r"^\| `(\w+)` \|([^|]*)\|[^|]*\| `(.*)` \|$", doc.source, re.M)}
    assert set(rows) == set(expected)
    for name, (kind, default) in expected.items():
        assert rows[name][0].startswith(kind), name
        assert rows[name][1] == default, name


def test_variant_review_lists_exactly_the_planted_variants_for_exactly_their_carriers(project, review):
    run_dir, notebook = review[0]
    assert not _errors(notebook)
    table = pd.read_csv(run_dir / "results" / "candidates.tsv", sep="\t", dtype={"af_region": str})
    planted = {f"{p.contig}_{p.pos}_{p.ref}_{p.alt}": p for p in project.planted}
    assert set(table.variant_id) == set(planted)
    assert set(planted) == {p["id"] for p in json.loads((project.root / "sim" / "planted.json").read_text())["planted"]}
    carriers = {}
    for c in project.cohorts:
        with pysam.VariantFile(str(c.vcf)) as vcf:
            for rec in vcf:
                variant_id = f"{rec.contig}_{rec.pos}_{rec.ref}_{rec.alts[0]}"
                if variant_id in planted:
                    for sample, call in rec.samples.items():
                        dosage = sum(a for a in call["GT"] if a)
                        if dosage:
                            carriers[(sample, variant_id)] = ("het", "hom_alt")[dosage - 1]
    assert len(table) == len(carriers)
    assert dict(zip(zip(table["sample"], table.variant_id), table.genotype)) == carriers
    assert set(table.genotype_quality) == {"not recorded"}  # the simulated VCFs carry no GQ
    # the small region's own frequency is an aggregate of fewer than min_count people
    assert set(table.af_region[table.region == SMALL_REGION]) <= {"masked"}
    assert (table.af_region[table.region != SMALL_REGION] != "masked").all()
    text = _text(notebook)
    assert MASK_NOTE.format(threshold=MIN_COUNT) in text
    assert "Reviewed by:" in text and "Date:" in text and "Conclusion:" in text
    for sample in set(table["sample"]):
        assert f"### {sample}" in text
    for table_rows in _aggregate_tables(notebook):
        assert not SMALL_COUNTS & set(_data_cells(table_rows))


def test_cohort_summary_masks_the_small_region(project, summary):
    run_dir, notebook = summary[0]
    assert not _errors(notebook)
    by_region = pd.read_csv(run_dir / "results" / "samples_by_region.tsv", sep="\t", dtype=str)
    assert list(by_region.region) == sorted(REGIONS)
    assert not SMALL_COUNTS & set(by_region.drop(columns="region").to_numpy().ravel())
    small = by_region.set_index("region").loc[SMALL_REGION]
    assert small["samples"] == f"<{MIN_COUNT}" and set(small.drop("samples")) == {"masked"}
    # A lone small group: the next smallest is suppressed and no total is shown, so neither gives it away.
    others = by_region.set_index("region").drop(index=SMALL_REGION)["samples"]
    assert sorted(others) == ["12", SUPPRESSED]
    assert "all regions" not in set(by_region.region)
    tables = _aggregate_tables(notebook)
    assert len(tables) >= 4
    for table in tables:
        assert not SMALL_COUNTS & set(_data_cells(table)), table
        for row in table[1:]:
            if row[0] == SMALL_REGION:
                assert row[1] == f"<{MIN_COUNT}" and set(row[2:]) == {"masked"}, row
    text = _text(notebook)
    assert MASK_NOTE.format(threshold=MIN_COUNT) in text
    assert f"({SMALL_REGION}) are left out of this plot" in text
    hits = pd.read_csv(run_dir / "results" / "top_hits.tsv", sep="\t")
    assert 0 < len(hits) <= 10 and hits.p_value.is_monotonic_increasing
    assert (hits.carriers >= MIN_COUNT).all()


@pytest.mark.parametrize("which", ["review", "summary"])
def test_same_inputs_give_the_same_results(request, which):
    (first, _), (second, _) = request.getfixturevalue(which)
    names = sorted(p.name for p in (first / "results").iterdir())
    assert names == sorted(p.name for p in (second / "results").iterdir())
    assert names == (["candidates.tsv"] if which == "review" else ["samples_by_region.tsv", "top_hits.tsv"])
    for name in names:
        assert (first / "results" / name).read_bytes() == (second / "results" / name).read_bytes(), name
