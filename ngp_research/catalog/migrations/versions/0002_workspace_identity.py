"""workspace identities and profiles: a host uid per user, a host gid and a profile per project

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade():
    # Plain ADD COLUMN and unique indexes: no table rebuild, so SQLite's foreign keys stay intact.
    op.add_column('users', sa.Column('workspace_uid', sa.Integer(), nullable=True))
    op.create_index('ix_users_workspace_uid', 'users', ['workspace_uid'], unique=True)
    op.add_column('projects', sa.Column('workspace_gid', sa.Integer(), nullable=True))
    op.add_column('projects', sa.Column('workspace_cpu', sa.Float(), nullable=False, server_default='1.0'))
    op.add_column('projects', sa.Column('workspace_memory', sa.String(length=16), nullable=False,
                                        server_default='2G'))
    op.add_column('projects', sa.Column('workspace_idle_timeout', sa.Integer(), nullable=False,
                                        server_default='3600'))
    op.create_index('ix_projects_workspace_gid', 'projects', ['workspace_gid'], unique=True)


def downgrade():
    op.drop_index('ix_projects_workspace_gid', table_name='projects')
    with op.batch_alter_table('projects') as batch:
        batch.drop_column('workspace_idle_timeout')
        batch.drop_column('workspace_memory')
        batch.drop_column('workspace_cpu')
        batch.drop_column('workspace_gid')
    op.drop_index('ix_users_workspace_uid', table_name='users')
    with op.batch_alter_table('users') as batch:
        batch.drop_column('workspace_uid')
