"""Prebuilt SQL for the few reads and writes every job makes on its way to its GPU.

Django's ORM compiles a queryset into SQL anew on every call: 0.4-1.1 ms of CPU a query here
(listing the enabled ComfyUI servers 0.66 ms, the live vast.ai instances 1.2 ms even with none),
against a 0.1 ms round trip to PostgreSQL. A scheduling pass makes a dozen such reads on every
job's way to its GPU. Django has no cache of compiled queries, so the hottest simple statements
keep their SQL here, built once per database vendor from the models' own table and column names.
Their rows become instances through from_row() (or `Model.objects.raw()`), values through
convert(): the ORM's own converters, so datetimes and UUIDs come back as from any queryset.
read_ahead() reads several of them in one round trip on PostgreSQL. Everything else stays plain
ORM.

On PostgreSQL they also skip what Django's client-side binding costs every query: psycopg merging
the parameters into the text (in Python, and uncached for a statement over 4 KB) and PostgreSQL
parsing and planning it anew. They bind their parameters on the server as prepared statements,
each parsed and planned once per connection (execute()). Measured on this machine: the lease with
the three reads a worker makes after it, 1.26-1.57 ms as one client-bound text, 0.71-0.86 ms
prepared and pipelined. Behind a pooler that does not keep prepared statements (PgBouncer in
transaction mode before 1.21), I2V_DB_PREPARED=0 turns preparing off (i2v/settings.py)."""

import contextlib
import threading
import time

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


def save_values(model, fields: dict) -> list:
    """These fields' values (names or attnames) as a prebuilt write's parameters, prepared as
    QuerySet.update() prepares them: a related row becomes its key, then each field's database
    preparation (datetimes and UUIDs as SQLite stores them, JSON as the driver takes it)."""
    meta = model._meta
    params = []
    for name, value in fields.items():
        field = meta.get_field(name)
        if field.remote_field is not None and hasattr(value, "prepare_database_save"):
            value = value.prepare_database_save(field)
        params.append(field.get_db_prep_save(value, connection))
    return params


def from_row(model, values):
    """An instance of `model` from its concrete fields' values in column order (columns()),
    converted as any queryset converts them; None when every value is NULL (a LEFT JOIN that found
    nothing)."""
    if all(value is None for value in values):
        return None
    names = tuple(f.name for f in model._meta.concrete_fields)
    return model.from_db(connection.alias, None, convert(model, names, values))


def execute(*statements) -> list:
    """Run prebuilt statements ((sql, params) each), in order; for each, its rows (a SELECT, or a
    write with RETURNING) or its row count. On PostgreSQL: bound on the server, prepared, and all
    in one round trip (psycopg's pipeline mode), on Django's connection for this thread, with
    Django's checks and error wrapping, and logged where Django logs queries (DEBUG, tests
    capturing them). Elsewhere: through Django's cursor, one after another."""
    if connection.vendor != "postgresql":
        results = []
        with connection.cursor() as cursor:
            for sql, params in statements:
                cursor.execute(sql, params)
                results.append(cursor.fetchall() if cursor.description is not None else cursor.rowcount)
        return results
    import psycopg  # noqa: PLC0415 -- PostgreSQL's driver, present only where it is used

    TUPLES_OK = psycopg.pq.ExecStatus.TUPLES_OK

    connection.close_if_health_check_failed()
    connection.ensure_connection()
    connection.validate_thread_sharing()
    connection.validate_no_broken_transaction()
    raw = connection.connection
    prepare = raw.prepare_threshold is not None or None  # (None: psycopg decides, and never prepares)
    started = time.monotonic()
    with connection.wrap_database_errors:
        cursors = [psycopg.Cursor(raw) for _ in statements]
        try:
            with raw.pipeline() if len(statements) > 1 else contextlib.nullcontext():
                for cursor, (sql, params) in zip(cursors, statements):
                    cursor.execute(sql, params, prepare=prepare)
            # (Rows, as their result's status says: `description` builds every column's details.)
            results = [cursor.fetchall() if cursor.pgresult.status == TUPLES_OK else cursor.rowcount for cursor in cursors]
        finally:
            for cursor in cursors:
                cursor.close()
    if connection.queries_logged:
        took = f"{(time.monotonic() - started) / len(statements):.3f}"
        connection.queries_log.extend({"sql": sql, "time": took} for sql, _ in statements)
    return results


def write(sql: str, params=()) -> int:
    """A prebuilt INSERT, UPDATE or DELETE; the rows it changed."""
    return execute((sql, params))[0]


def fetch(sql: str, params=()) -> list[tuple]:
    """The rows of a prebuilt SELECT: those read_ahead() read for it in this block, else read now."""
    ahead = getattr(_ahead, "rows", None)
    if ahead:
        rows = ahead.pop((sql, tuple(params)), None)
        if rows is not None:
            return rows
    return execute((sql, params))[0]


@contextlib.contextmanager
def read_ahead(*reads):
    """Within the block, fetch() of any of these prebuilt statements ((sql, params) each: SELECTs,
    or a write with RETURNING first) takes rows read here. On PostgreSQL they are read in one round
    trip (execute()). A scheduling pass reads half a dozen small tables after taking its lock; each
    round trip costs 0.3-0.8 ms on a busy two-core machine, more than the query. Elsewhere (SQLite,
    in-process) there is no round trip to save, and fetch() reads as it goes."""
    if connection.vendor != "postgresql" or len(reads) < 2:
        yield
        return
    results = execute(*reads)
    outer = getattr(_ahead, "rows", None)
    _ahead.rows = {(sql, tuple(params)): rows for (sql, params), rows in zip(reads, results)}
    try:
        yield
    finally:
        _ahead.rows = outer
