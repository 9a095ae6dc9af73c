"""Both engines have the same migrations, under the same names, in the same order
(an operator reads one list; the PostgreSQL files are also what an installed
package must carry: tests/deploy/test_compose.py migrates a database from the image)."""

from __future__ import annotations

from server.storage.postgres import schema
from server.storage.sqlite.connection import known_migrations


def test_both_engines_have_the_same_migrations_in_the_same_order() -> None:
    assert schema.known_migrations() == known_migrations()
    assert len(known_migrations()) >= 5
