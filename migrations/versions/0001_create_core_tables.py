"""create core tables: users, products, settings, cms_pages, email_templates

Revision ID: 0001
Revises:
Create Date: 2026-11-26 09:00:00

With ``-x dev_data=true`` it also loads development sample data (the guide's
environment-specific migrations); the schema is created either way.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from migrations import dev_data

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Create the application's tables, then sample rows in development only."""
    users = op.create_table(
        "users",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("email", sa.String(255), nullable=False, unique=True),
        sa.Column("username", sa.String(100), nullable=False),
        sa.Column("hashed_password", sa.String(255), nullable=False),
        sa.Column("is_active", sa.Boolean(), nullable=False, server_default=sa.text("true")),
        sa.Column("is_admin", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    products = op.create_table(
        "products",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("marketplace", sa.String(100), nullable=False),
        sa.Column("shop_name", sa.String(200), nullable=False),
        sa.Column("title", sa.String(500), nullable=False),
        # Free text as entered by shops ("19.99", "N/A"); normalized_price comes later.
        sa.Column("price", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "settings",
        sa.Column("key", sa.String(100), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
    )
    op.create_table(
        "cms_pages",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("slug", sa.String(200), nullable=False, unique=True),
        sa.Column("title", sa.String(500), nullable=False),
        sa.Column("body", sa.Text(), nullable=False, server_default=""),
        sa.Column("is_published", sa.Boolean(), nullable=False, server_default=sa.text("false")),
    )
    op.create_table(
        "email_templates",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        sa.Column("subject", sa.String(500), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
    )

    if dev_data.requested():
        op.bulk_insert(
            users,
            [
                {"email": "alice@example.com", "username": "alice", "hashed_password": "!"},
                {"email": "bob@example.com", "username": "bob", "hashed_password": "!"},
            ],
        )
        op.bulk_insert(
            products,
            [
                {"marketplace": "amazon", "shop_name": "demo-shop", "title": "Mug", "price": "9.50"},
                {"marketplace": "ebay", "shop_name": "demo-shop", "title": "Lamp", "price": "24"},
            ],
        )


def downgrade() -> None:
    """Drop every table this revision created (and with them any sample data)."""
    op.drop_table("email_templates")
    op.drop_table("cms_pages")
    op.drop_table("settings")
    op.drop_table("products")
    op.drop_table("users")
