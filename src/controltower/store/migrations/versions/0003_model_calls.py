"""model calls (durable LLM requests)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 15:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('model_calls',
    sa.Column('run_id', sa.String(length=40), nullable=False),
    sa.Column('step_key', sa.String(length=500), nullable=False),
    sa.Column('call_index', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('workflow', sa.String(length=100), nullable=False),
    sa.Column('agent', sa.String(length=100), nullable=True),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('request', sa.Text(), nullable=False),
    sa.Column('response', sa.Text(), nullable=False),
    sa.Column('input_tokens', sa.BigInteger(), nullable=False),
    sa.Column('output_tokens', sa.BigInteger(), nullable=False),
    sa.Column('cost_micros', sa.BigInteger(), nullable=False),
    sa.Column('attempts', sa.Text(), nullable=True),
    sa.Column('started_at', sa.Float(), nullable=False),
    sa.Column('finished_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('run_id', 'step_key', 'call_index')
    )
    op.create_index('ix_model_calls_tenant', 'model_calls', ['tenant', 'workflow', 'finished_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_model_calls_tenant', table_name='model_calls')
    op.drop_table('model_calls')
