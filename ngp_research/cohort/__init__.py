"""The researcher's API inside a workspace: the project's tagged cohort, analysed by Hail on Dask.

- :class:`Cohort` joins the tagged variant datasets of the workspace manifest
  (regions kept traceable, harmonised phenotypes as sample columns) and runs
  QC, allele frequencies, Hardy-Weinberg, association and PCA.
- :func:`clinical_variants` finds the candidate clinically relevant variants
  of a gene panel, per carrier, ready for review.
- :mod:`.statistics` holds the numpy kernels and their PLINK 2 conventions;
  :mod:`.engine` the Hail and Dask tasks.
"""

from .analysis import Cohort, PCAResult
from .inputs import CohortDataset, CohortError

__all__ = ["Cohort", "PCAResult", "CohortDataset", "CohortError"]
