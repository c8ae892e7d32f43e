"""users, API tokens, sessions, tenants

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 15:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'tenants',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('display_name', sa.String(length=200), nullable=True),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )
    op.create_table(
        'users',
        sa.Column('tenant', sa.String(length=64), nullable=False),
        sa.Column('username', sa.String(length=200), nullable=False),
        sa.Column('password_hash', sa.String(length=300), nullable=False),
        sa.Column('roles', sa.Text(), nullable=False),
        sa.Column('groups', sa.Text(), nullable=False),
        sa.Column('disabled', sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('tenant', 'username'),
    )
    op.create_table(
        'api_tokens',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('token_hash', sa.String(length=64), nullable=False),
        sa.Column('tenant', sa.String(length=64), nullable=False),
        sa.Column('subject', sa.String(length=200), nullable=False),
        sa.Column('roles', sa.Text(), nullable=False),
        sa.Column('groups', sa.Text(), nullable=False),
        sa.Column('scopes', sa.Text(), nullable=False),
        sa.Column('description', sa.String(length=200), nullable=True),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('expires_at', sa.Float(), nullable=False),
        sa.Column('revoked_at', sa.Float(), nullable=True),
        sa.Column('last_used_at', sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('token_hash', name='uq_api_tokens_hash'),
    )
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.create_index('ix_api_tokens_tenant', ['tenant', 'created_at'], unique=False)
    op.create_table(
        'sessions',
        sa.Column('id_hash', sa.String(length=64), nullable=False),
        sa.Column('tenant', sa.String(length=64), nullable=False),
        sa.Column('subject', sa.String(length=200), nullable=False),
        sa.Column('roles', sa.Text(), nullable=False),
        sa.Column('groups', sa.Text(), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('expires_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('id_hash'),
    )
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.create_index('ix_sessions_expiry', ['expires_at'], unique=False)
    op.create_table(
        'workflow_owners',
        sa.Column('workflow', sa.String(length=100), nullable=False),
        sa.Column('tenant', sa.String(length=64), nullable=False),
        sa.Column('owner', sa.String(length=200), nullable=True),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('workflow'),
    )
    with op.batch_alter_table('workflow_owners', schema=None) as batch_op:
        batch_op.create_index('ix_workflow_owners_tenant', ['tenant'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('workflow_owners', schema=None) as batch_op:
        batch_op.drop_index('ix_workflow_owners_tenant')
    op.drop_table('workflow_owners')
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.drop_index('ix_sessions_expiry')
    op.drop_table('sessions')
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.drop_index('ix_api_tokens_tenant')
    op.drop_table('api_tokens')
    op.drop_table('users')
    op.drop_table('tenants')
