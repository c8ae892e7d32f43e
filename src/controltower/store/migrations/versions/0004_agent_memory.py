"""long-term agent memory

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 15:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'memory_entries',
        sa.Column('tenant', sa.String(length=64), nullable=False),
        sa.Column('workflow', sa.String(length=100), nullable=False),
        sa.Column('namespace', sa.String(length=100), nullable=False),
        sa.Column('key', sa.String(length=300), nullable=False),
        sa.Column('value', sa.Text(), nullable=False),
        sa.Column('text', sa.Text(), nullable=True),
        sa.Column('subjects', sa.Text(), nullable=True),
        sa.Column('digest', sa.String(length=64), nullable=False),
        sa.Column('embedder', sa.String(length=100), nullable=True),
        sa.Column('vector', sa.LargeBinary(), nullable=True),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('updated_at', sa.Float(), nullable=False),
        sa.Column('expires_at', sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint('tenant', 'workflow', 'namespace', 'key'),
    )
    with op.batch_alter_table('memory_entries', schema=None) as batch_op:
        batch_op.create_index('ix_memory_entries_expiry', ['expires_at'], unique=False)

    op.create_table(
        'memory_subjects',
        sa.Column('tenant', sa.String(length=64), nullable=False),
        sa.Column('subject', sa.String(length=200), nullable=False),
        sa.Column('workflow', sa.String(length=100), nullable=False),
        sa.Column('namespace', sa.String(length=100), nullable=False),
        sa.Column('key', sa.String(length=300), nullable=False),
        sa.PrimaryKeyConstraint('tenant', 'subject', 'workflow', 'namespace', 'key'),
    )
    with op.batch_alter_table('memory_subjects', schema=None) as batch_op:
        batch_op.create_index(
            'ix_memory_subjects_entry', ['tenant', 'workflow', 'namespace', 'key'], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table('memory_subjects', schema=None) as batch_op:
        batch_op.drop_index('ix_memory_subjects_entry')
    op.drop_table('memory_subjects')
    with op.batch_alter_table('memory_entries', schema=None) as batch_op:
        batch_op.drop_index('ix_memory_entries_expiry')
    op.drop_table('memory_entries')
