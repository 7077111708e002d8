"""Alembic environment for the catalog. Called by :func:`ngp_research.catalog.database.upgrade`."""

from alembic import context
from sqlalchemy import engine_from_config, pool

from ngp_research.catalog.migrations_filter import catalog_tables_only
from ngp_research.catalog.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online():
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                          include_name=catalog_tables_only)
        with context.begin_transaction():
            context.run_migrations()
        return
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                          include_name=catalog_tables_only)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
