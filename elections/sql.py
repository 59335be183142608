"""Set-based writes the ORM does not offer, portable between PostgreSQL and SQLite.

``bulk_create``/``bulk_update`` cover most needs, but ``bulk_update`` builds one ``CASE`` arm
per row (quadratic on a 5,000-row lease flush) and ``bulk_create`` cannot say which rows a
conflict skipped. These helpers write one statement for any number of rows:

- ``update_from_values``: ``WITH v(...) AS (VALUES ...) UPDATE t SET ... FROM v WHERE ...``
- ``insert_ignore_returning``: ``INSERT ... ON CONFLICT (...) DO NOTHING RETURNING ...``

Both forms run on SQLite 3.35+ (Python 3.11 ships 3.40). On PostgreSQL the rows travel as
one array per column (``unnest(%s::bigint[], ...)``), as Django's own ``bulk_create`` does:
a statement of a few placeholders instead of thousands is converted, sent and planned
several times faster. Values go through each field's ``get_db_prep_value`` (datetimes and
JSON are stored as the ORM stores them) and are cast to the column's type.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from django.db import connection, models

#: Rows per statement: keeps the parameter count under SQLite's limit (32,766) and each
#: statement's text to a few hundred kilobytes.
CHUNK_PARAMS = 30_000


def _column(model: type[models.Model], name: str) -> tuple[models.Field, str]:
    field = model._meta.get_field(name)
    assert isinstance(field, models.Field)
    return field, field.column


#: Values psycopg adapts as they are: on PostgreSQL they skip the fields' preparation, the
#: larger part of the Python time of a big batch.
_NATIVE = (int, str, float, bool, datetime)


def _prep(fields: Sequence[models.Field], row: Sequence[Any]) -> list[Any]:
    native = connection.vendor == "postgresql"
    return [
        value
        if value is None or (native and isinstance(value, _NATIVE))
        else field.get_db_prep_value(value, connection, prepared=False)
        for field, value in zip(fields, row, strict=True)
    ]


def _cast(expr: str, field: models.Field) -> str:
    if connection.vendor != "postgresql":
        return expr  # SQLite is dynamically typed: the bound value is stored as given
    return f"CAST({expr} AS {field.cast_db_type(connection)})"


def _arrays(fields: Sequence[models.Field]) -> bool:
    """Whether rows can travel as one array per column (PostgreSQL, no JSON columns)."""
    return connection.vendor == "postgresql" and not any(
        isinstance(f, models.JSONField) for f in fields
    )


def _unnest(fields: Sequence[models.Field], rows: Sequence[Sequence[Any]]) -> tuple[str, list]:
    """``unnest(%s::type[], ...)`` and its parameters: one list per column."""
    columns = [list(column) for column in zip(*(_prep(fields, row) for row in rows), strict=True)]
    sql = ", ".join(f"%s::{f.cast_db_type(connection)}[]" for f in fields)
    return f"unnest({sql})", columns


def _values(
    fields: Sequence[models.Field], rows: Sequence[Sequence[Any]]
) -> Iterable[tuple[str, list[Any]]]:
    """The rows a chunk at a time: the placeholders of a ``VALUES`` list and its parameters."""
    width = len(fields)
    size = max(1, CHUNK_PARAMS // max(width, 1))
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        placeholders = ", ".join("(" + ", ".join(["%s"] * width) + ")" for _ in chunk)
        yield placeholders, [value for row in chunk for value in _prep(fields, row)]


def update_from_values(
    model: type[models.Model],
    keys: Sequence[str],
    fields: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    where: str = "",
) -> int:
    """Set ``fields`` from each row, matched on ``keys``; rows are ``(*keys, *fields)``.

    ``where`` adds a condition on the target table (``t``) or the values (``v``), e.g. a
    compare-and-set guard. Returns the number of rows updated.
    """
    if not rows:
        return 0
    names = [*keys, *fields]
    columns = [_column(model, name) for name in names]
    model_fields = [field for field, _ in columns]
    table = connection.ops.quote_name(model._meta.db_table)
    q = connection.ops.quote_name
    aliases = [f"c{i}" for i in range(len(names))]
    arrays = _arrays(model_fields)
    # unnest() already typed the arrays' values; VALUES rows are cast column by column.
    equals = [
        f"{q(column)} = {f'v.{alias}' if arrays else _cast(f'v.{alias}', field)}"
        for (field, column), alias in zip(columns, aliases, strict=True)
    ]
    sets = ", ".join(equals[len(keys) :])
    match = " AND ".join(f"t.{eq}" for eq in equals[: len(keys)])
    updated = 0
    if arrays:
        source, params = _unnest(model_fields, rows)
        sql = (
            f"UPDATE {table} AS t SET {sets} FROM {source} AS v({', '.join(aliases)}) "
            f"WHERE {match}" + (f" AND ({where})" if where else "")
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.rowcount
    with connection.cursor() as cursor:
        for placeholders, params in _values(model_fields, rows):
            sql = (
                f"WITH v({', '.join(aliases)}) AS (VALUES {placeholders}) "
                f"UPDATE {table} AS t SET {sets} FROM v WHERE {match}"
                + (f" AND ({where})" if where else "")
            )
            cursor.execute(sql, params)
            updated += cursor.rowcount
    return updated


def insert_ignore_returning(
    model: type[models.Model],
    fields: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    conflict: Sequence[str],
    returning: Sequence[str],
) -> list[tuple[Any, ...]]:
    """Insert rows, skip those that clash on ``conflict``; return ``returning`` of the new."""
    if not rows:
        return []
    columns = [_column(model, name) for name in fields]
    model_fields = [field for field, _ in columns]
    q = connection.ops.quote_name
    table = q(model._meta.db_table)
    target = ", ".join(q(_column(model, name)[1]) for name in conflict)
    back = ", ".join(q(_column(model, name)[1]) for name in returning)
    inserted: list[tuple[Any, ...]] = []
    names = ", ".join(q(c) for _, c in columns)
    if _arrays(model_fields):
        source, params = _unnest(model_fields, rows)
        sql = (
            f"INSERT INTO {table} ({names}) SELECT * FROM {source} "
            f"ON CONFLICT ({target}) DO NOTHING RETURNING {back}"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()
    with connection.cursor() as cursor:
        for placeholders, params in _values(model_fields, rows):
            sql = (
                f"INSERT INTO {table} ({names}) "
                f"VALUES {placeholders} ON CONFLICT ({target}) DO NOTHING RETURNING {back}"
            )
            cursor.execute(sql, params)
            inserted += cursor.fetchall()
    return inserted
