"""add profile_image to users

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 09:05:00

The guide's "Adding New Database Fields": a nullable column, always safe.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Add the nullable users.profile_image column."""
    op.add_column("users", sa.Column("profile_image", sa.String(), nullable=True))


def downgrade() -> None:
    """Drop users.profile_image."""
    op.drop_column("users", "profile_image")
