"""Validated ingest of genomic files into a region's protected area."""

from .register import ingest_dataset, plan_ingest

__all__ = ["ingest_dataset", "plan_ingest"]
