"""Prebuilt SQL for the few reads and writes every job makes on its way to its GPU.

Django's ORM compiles a queryset into SQL anew on every call: 0.4-1.1 ms of CPU a query here
(listing the enabled ComfyUI servers 0.66 ms, the live vast.ai instances 1.2 ms even with none),
against a 0.1 ms round trip to PostgreSQL. A scheduling pass makes a dozen such reads on every
job's way to its GPU. Django has no cache of compiled queries, so the hottest simple statements
keep their SQL here, built once per database vendor from the models' own table and column names.
Their rows become instances through from_row() (or `Model.objects.raw()`), values through
convert(): the ORM's own converters, so datetimes and UUIDs come back as from any queryset.
read_ahead() reads several of them in one round trip on PostgreSQL. Everything else stays plain
ORM."""

import contextlib
import threading

from django.db import connection
from django.db.models.sql import Query

_built = {}
_converters = {}
_ahead = threading.local()  # read_ahead()'s rows, per thread (each has its own connection)


def prebuilt(key: str, build) -> str:
    """The SQL `build(quote)` returns for this connection's database, built once per vendor.
    `quote(model, field=None)` quotes a model's table name, or one of its columns."""
    found = _built.get((key, connection.vendor))
    if found is None:
        def quote(model, field=None):
            meta = model._meta
            return connection.ops.quote_name(meta.get_field(field).column if field else meta.db_table)

        found = _built[(key, connection.vendor)] = build(quote)
    return found


def columns(model, quote, alias: str = "") -> str:
    """Every column of the model (as `alias.column` with an alias), in the order from_row() and
    raw() take them for whole instances."""
    prefix = f"{alias}." if alias else ""
    return ", ".join(prefix + quote(model, f.name) for f in model._meta.concrete_fields)


def marks(n: int) -> str:
    """`%s, %s, …`: n parameters for an IN list."""
    return ", ".join(["%s"] * n)


def _converters_of(model, names: tuple) -> list:
    """[(position, (functions, expression))] converting these columns of the model as a queryset
    converts them; built once per model, columns and database."""
    key = (model, names, connection.alias, connection.vendor)
    found = _converters.get(key)
    if found is None:
        table = model._meta.db_table
        compiler = connection.ops.compiler("SQLCompiler")(Query(model), connection, connection.alias)
        found = _converters[key] = list(compiler.get_converters(
            [model._meta.get_field(name).get_col(table) for name in names]).items())
    return found


def convert(model, names: tuple, values) -> list:
    """One row of these columns of the model (field names, in order), its values converted as a
    queryset's values_list() converts them (SQLite hands back UUIDs as hex text, datetimes as text)."""
    values = list(values)
    for pos, (functions, expression) in _converters_of(model, names):
        value = values[pos]
        for function in functions:
            value = function(value, expression, connection)
        values[pos] = value
    return values


def from_row(model, values):
    """An instance of `model` from its concrete fields' values in column order (columns()),
    converted as any queryset converts them; None when every value is NULL (a LEFT JOIN that found
    nothing)."""
    if all(value is None for value in values):
        return None
    names = tuple(f.name for f in model._meta.concrete_fields)
    return model.from_db(connection.alias, None, convert(model, names, values))


def fetch(sql: str, params=()) -> list[tuple]:
    """The rows of a prebuilt SELECT: those read_ahead() read for it in this block, else read now."""
    ahead = getattr(_ahead, "rows", None)
    if ahead:
        rows = ahead.pop((sql, tuple(params)), None)
        if rows is not None:
            return rows
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


@contextlib.contextmanager
def read_ahead(*reads):
    """Within the block, fetch() of any of these prebuilt SELECTs ((sql, params) each) takes rows
    read here. On PostgreSQL they are read in one round trip: one execute of the statements
    joined, whose results psycopg's client-side binding (Django's default) hands back in turn
    (nextset()). A scheduling pass reads half a dozen small tables after taking its lock; each
    round trip costs 0.3-0.8 ms on a busy two-core machine, more than the query. Elsewhere (SQLite,
    in-process) there is no round trip to save, and fetch() reads as it goes."""
    if connection.vendor != "postgresql" or len(reads) < 2:
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("; ".join(sql for sql, _ in reads), [value for _, params in reads for value in params])
        results = [cursor.fetchall()]
        while cursor.nextset():
            results.append(cursor.fetchall())
    outer = getattr(_ahead, "rows", None)
    _ahead.rows = {(sql, tuple(params)): rows for (sql, params), rows in zip(reads, results)}
    try:
        yield
    finally:
        _ahead.rows = outer
