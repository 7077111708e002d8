"""Which tables Alembic manages: the catalog's, not the audit store's (which may share a PostgreSQL database)."""


def catalog_tables_only(name, type_, parent_names) -> bool:
    return not (type_ == "table" and name is not None and name.startswith("audit_"))
