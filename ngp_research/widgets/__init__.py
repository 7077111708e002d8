"""Notebook widgets (ipywidgets) for exploring the cohort and reviewing candidate variants.

- :class:`CohortExplorer`: how many samples match a region, sex and phenotype term, per region and
  as a histogram of a measurement, with small counts masked (:mod:`ngp_research.reports.masking`).
- :class:`VariantReview`: the candidates of :meth:`Cohort.clinical_variants
  <ngp_research.cohort.Cohort.clinical_variants>` as a sortable, filterable table; a reviewer marks
  a (sample, variant) reviewed with a comment, appended to a JSON-lines store in the project and
  recorded by the audited kernel (``review.mark``).

Examples
--------
>>> from ngp_research.widgets import CohortExplorer, VariantReview
>>> explorer = CohortExplorer(cohort.samples)                                    # doctest: +SKIP
>>> explorer                                                                     # doctest: +SKIP
>>> VariantReview(cohort.clinical_variants("/reference/demo-panel.bed",
...                                        "/reference/demo-annotations.tsv"))   # doctest: +SKIP
"""

from .explorer import CohortExplorer
from .review import DEFAULT_STORE, VariantReview, load_reviews

__all__ = ["CohortExplorer", "VariantReview", "load_reviews", "DEFAULT_STORE"]
