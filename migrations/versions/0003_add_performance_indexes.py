"""add performance indexes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 09:10:00

The guide's "Adding Database Indexes", written by hand (make migrate-create-manual).
"""

from typing import Sequence, Union

from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Index products by marketplace and shop, users by email and activity."""
    op.create_index("idx_products_marketplace_shop", "products", ["marketplace", "shop_name"])
    op.create_index("idx_users_email_active", "users", ["email", "is_active"])


def downgrade() -> None:
    """Drop both indexes, in reverse order."""
    op.drop_index("idx_users_email_active", table_name="users")
    op.drop_index("idx_products_marketplace_shop", table_name="products")
