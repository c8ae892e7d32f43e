"""trigger state (webhook deliveries, cron ticks)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 15:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'webhook_deliveries',
        sa.Column('tenant', sa.String(length=64), nullable=False),
        sa.Column('workflow', sa.String(length=100), nullable=False),
        sa.Column('delivery_id', sa.String(length=200), nullable=False),
        sa.Column('body_digest', sa.String(length=64), nullable=False),
        sa.Column('run_id', sa.String(length=40), nullable=False),
        sa.Column('received_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('tenant', 'workflow', 'delivery_id'),
    )
    op.create_table(
        'cron_ticks',
        sa.Column('tenant', sa.String(length=64), nullable=False),
        sa.Column('workflow', sa.String(length=100), nullable=False),
        sa.Column('trigger', sa.String(length=64), nullable=False),
        sa.Column('tick_at', sa.Float(), nullable=False),
        sa.Column('run_id', sa.String(length=40), nullable=True),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('tenant', 'workflow', 'trigger', 'tick_at'),
    )


def downgrade() -> None:
    op.drop_table('cron_ticks')
    op.drop_table('webhook_deliveries')
