"""add performance indexes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 09:10:00

The guide's "Adding Database Indexes", written by hand (make migrate-create-manual). The indexes
are built CONCURRENTLY, outside the revision's transaction (Alembic's autocommit_block), so writes
to the tables go on while they are built.
"""

from typing import Sequence, Union

from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Index products by marketplace and shop, users by email and activity, without blocking writes."""
    with op.get_context().autocommit_block():
        op.create_index(
            "idx_products_marketplace_shop",
            "products",
            ["marketplace", "shop_name"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.create_index(
            "idx_users_email_active",
            "users",
            ["email", "is_active"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    """Drop both indexes, in reverse order, without blocking the tables."""
    with op.get_context().autocommit_block():
        op.drop_index(
            "idx_users_email_active", table_name="users", postgresql_concurrently=True, if_exists=True
        )
        op.drop_index(
            "idx_products_marketplace_shop",
            table_name="products",
            postgresql_concurrently=True,
            if_exists=True,
        )
