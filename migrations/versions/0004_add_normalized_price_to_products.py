"""add normalized_price to products

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 09:15:00

The guide's "Complex Schema Changes": a new column, filled from the free-text price, then made
NOT NULL. The fill is the guide's "Data Migrations" done in batches (opslib.batch): one UPDATE per
range of ids, each committed, so a large table is never locked whole and a run stopped part-way
resumes after the last range. Prices that are not plain decimals ("N/A", "1.2.3") cannot be
converted: the revision then fails naming those rows, before the NOT NULL, and the database stays
at 0003 (with the column added and the good prices converted). Fix those rows, then upgrade again.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from opslib.batch import forget, require_filled, update_in_batches

# opslib-accept: adding-not-nullable-field -- the column is filled in this same revision; SET NOT NULL scans products under its lock, acceptable for this table's size

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


BATCH = "0004 products.normalized_price"


def upgrade() -> None:
    """Add products.normalized_price, convert the text prices in batches, then require a value."""
    # Repeatable: the batches commit on their own, so a run stopped among them finds the column there.
    op.execute("ALTER TABLE products ADD COLUMN IF NOT EXISTS normalized_price NUMERIC(10, 2)")
    # The guide's pattern was '^[0-9.]+$', which lets "1.2.3" through to a failing CAST.
    update_in_batches(
        "products",
        "normalized_price = CAST(price AS NUMERIC)",
        where=r"price ~ '^[0-9]+(\.[0-9]+)?$' AND normalized_price IS NULL",
        name=BATCH,
    )
    require_filled("products", "normalized_price", show=("id", "price"))
    op.alter_column("products", "normalized_price", existing_type=sa.Numeric(10, 2), nullable=False)


def downgrade() -> None:
    """Drop products.normalized_price; the text price was never changed."""
    op.drop_column("products", "normalized_price")
    forget(BATCH)
