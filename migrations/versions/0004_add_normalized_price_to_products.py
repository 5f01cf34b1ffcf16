"""add normalized_price to products

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 09:15:00

The guide's "Complex Schema Changes": a new column, filled from the free-text price, then made
NOT NULL. Prices that are not plain decimals ("N/A", "1.2.3") cannot be converted; the NOT NULL
step then fails and, with one transaction per revision, the database stays at 0003. Fix those
rows first, then upgrade again.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# opslib-accept: adding-not-nullable-field -- the column is filled in this same revision; SET NOT NULL scans products under its lock, acceptable for this table's size

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Add products.normalized_price, convert the text prices, then require a value."""
    op.add_column("products", sa.Column("normalized_price", sa.Numeric(10, 2), nullable=True))
    # The guide's pattern was '^[0-9.]+$', which lets "1.2.3" through to a failing CAST.
    op.execute(
        sa.text(
            "UPDATE products SET normalized_price = CAST(price AS NUMERIC) "
            r"WHERE price ~ '^[0-9]+(\.[0-9]+)?$'"
        )
    )
    op.alter_column("products", "normalized_price", existing_type=sa.Numeric(10, 2), nullable=False)


def downgrade() -> None:
    """Drop products.normalized_price; the text price was never changed."""
    op.drop_column("products", "normalized_price")
