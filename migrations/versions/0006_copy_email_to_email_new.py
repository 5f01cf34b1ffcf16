"""copy email to email_new (email change, step 2 of 3)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 09:25:00

Step 2 is a data migration of its own, so it can be run, checked and rolled back separately.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: Union[str, Sequence[str], None] = "0005"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Copy every user's email into email_new."""
    op.execute(sa.text("UPDATE users SET email_new = email"))


def downgrade() -> None:
    """Empty email_new again; users.email was never touched."""
    op.execute(sa.text("UPDATE users SET email_new = NULL"))
