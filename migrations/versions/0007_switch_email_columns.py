"""switch email columns (email change, step 3 of 3)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26 09:30:00

Step 3 drops the old column and renames the new one. Dropping users.email also drops what was
built on it (its unique constraint and idx_users_email_active), so both are made again on the
renamed column. The downgrade rebuilds the old layout with the data.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# The guide's step 3 is unsafe by nature; steps 1 and 2 prepared it, so its findings are accepted:
# opslib-accept: ban-drop-column -- every address was copied into email_new by 0006 (and again here)
# opslib-accept: renaming-column -- email_new takes the old name, so clients keep reading users.email
# opslib-accept: require-concurrent-index-deletion -- the index goes with the column swap, in one transaction
# opslib-accept: require-concurrent-index-creation -- rebuilt in the swap's transaction so the revision stays atomic
# opslib-accept: disallowed-unique-constraint -- uniqueness must hold the moment the renamed column is live
# opslib-accept: constraint-missing-not-valid -- the copied addresses were unique under the old constraint
# opslib-accept: adding-not-nullable-field -- every row has an address: 0006 copied them, this revision fills the rest

revision: str = "0007"
down_revision: Union[str, Sequence[str], None] = "0006"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Replace users.email with users.email_new, keeping uniqueness and the index."""
    # Rows added after step 2 ran have no copy yet.
    op.execute(sa.text("UPDATE users SET email_new = email WHERE email_new IS NULL"))
    op.drop_index("idx_users_email_active", table_name="users")
    op.drop_column("users", "email")
    op.alter_column(
        "users", "email_new", new_column_name="email", existing_type=sa.String(255), nullable=False
    )
    op.create_unique_constraint("users_email_key", "users", ["email"])
    op.create_index("idx_users_email_active", "users", ["email", "is_active"])


def downgrade() -> None:
    """Rename email back to email_new and rebuild the original email column from it."""
    op.drop_index("idx_users_email_active", table_name="users")
    op.drop_constraint("users_email_key", "users", type_="unique")
    op.alter_column(
        "users", "email", new_column_name="email_new", existing_type=sa.String(255), nullable=True
    )
    op.add_column("users", sa.Column("email", sa.String(255), nullable=True))
    op.execute(sa.text("UPDATE users SET email = email_new"))
    op.alter_column("users", "email", existing_type=sa.String(255), nullable=False)
    op.create_unique_constraint("users_email_key", "users", ["email"])
    op.create_index("idx_users_email_active", "users", ["email", "is_active"])
