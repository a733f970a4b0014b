"""Prebuilt SQL for the few reads every job makes on its way to its GPU.

Django's ORM compiles a queryset into SQL anew on every call: 0.4-1.1 ms of CPU a query here
(listing the enabled ComfyUI servers 0.66 ms, the live vast.ai instances 1.2 ms even with none),
against a 0.1 ms round trip to PostgreSQL. A scheduling pass makes a dozen such reads on every
job's way to its GPU. Django has no cache of compiled queries, so the hottest simple reads keep
their SQL here, built once per database vendor from the models' own table and column names, and
hand the rows to `Model.objects.raw()`, which builds the instances through the ORM's converters
(datetimes and UUIDs come back as from any queryset). Everything else stays plain ORM."""

from django.db import connection

_built = {}


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


def columns(model, quote) -> str:
    """Every column of the model, for a SELECT that raw() turns into whole instances."""
    return ", ".join(quote(model, f.name) for f in model._meta.concrete_fields)


def marks(n: int) -> str:
    """`%s, %s, …`: n parameters for an IN list."""
    return ", ".join(["%s"] * n)
