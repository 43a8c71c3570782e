"""Alembic's environment for radlens: migrations run on the connection ``radlens.db.migrate``
hands over (inside its locked transaction), never from an alembic.ini."""

from __future__ import annotations

from alembic import context

from radlens.db import metadata

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("radlens migrates through radlens.db.migrate (radlens serve, or "
                       "`radlens db upgrade`), with a connection; offline SQL is not supported")
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
