"""add email_new to users (email change, step 1 of 3)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 09:20:00

The guide's multi-step process for an unsafe change: widen users.email by adding a new column,
copying into it, then switching. Step 1 adds the nullable column (always safe).
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Add the nullable users.email_new column."""
    op.add_column("users", sa.Column("email_new", sa.String(255), nullable=True))


def downgrade() -> None:
    """Drop users.email_new."""
    op.drop_column("users", "email_new")
