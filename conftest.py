"""Doctest namespace: ``cohort`` (a small demo cohort, built on first use) and ``reference``.

The cohort API's examples run on the tiny demo data: three simulated regions of 8 samples and 120
variants, with the demo's synthetic panel and annotations in ``reference``. The cohort (one Dask
worker with its Hail context) is created only when an example first touches it, once per session.
"""

import shutil
import tempfile
from pathlib import Path

import pytest


class _DemoCohort:
    """Builds the demo cohort on first attribute access."""

    def __init__(self):
        self._cohort = None
        self.folder = Path(tempfile.mkdtemp(prefix="ngp-doctest-cohort-"))

    def _build(self):
        import hashlib

        from ngp_research.cohort import Cohort, CohortDataset
        from ngp_research.demo.annotation import write_demo_reference
        from ngp_research.demo.simulate import simulate_cohorts

        cohorts, planted = simulate_cohorts(self.folder / "data", regions=("norr", "syd", "uppsala"),
                                            samples_per_region=8, variants=120, seed=42)
        write_demo_reference(self.folder / "reference", cohorts, planted)
        datasets = [CohortDataset(f"{c.region}-cohort", c.region, str(c.vcf),
                                  hashlib.sha256(c.vcf.read_bytes()).hexdigest(), str(c.metadata)) for c in cohorts]
        self._cohort = Cohort(datasets, workers=1, cache_dir=str(self.folder / "cache"), progress=False,
                              hail_memory="1g")

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if self._cohort is None:
            self._build()
        return getattr(self._cohort, name)

    def close(self):
        if self._cohort is not None:
            self._cohort.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def _demo_cohort():
    cohort = _DemoCohort()
    yield cohort
    cohort.close()


@pytest.fixture(autouse=True)
def _cohort_doctest_namespace(request, doctest_namespace):
    if isinstance(request.node, pytest.Item) and request.node.__class__.__name__ == "DoctestItem" \
            and "ngp_research/cohort/" in str(getattr(request.node, "path", "")):
        cohort = request.getfixturevalue("_demo_cohort")
        doctest_namespace["cohort"] = cohort
        doctest_namespace["reference"] = cohort.folder / "reference"
