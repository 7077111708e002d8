"""Audit: the record model, the hash-chained store and its verification."""

from .records import ACTIONS, AuditRecord, StoredRecord
from .store import AuditStore, Checkpoint, VerificationReport

__all__ = ["ACTIONS", "AuditRecord", "AuditStore", "Checkpoint", "StoredRecord", "VerificationReport"]
