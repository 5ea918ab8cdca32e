"""Declarative base, naming convention and portable column types.

The naming convention gives every constraint and index a stable name, so Alembic migrations (batch
mode on SQLite included) can drop and alter them by name on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    """Timezone-aware now in UTC (every stored timestamp is UTC)."""
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(sa.types.TypeDecorator):
    """A timestamp stored in UTC and always returned timezone-aware.

    PostgreSQL keeps ``timestamptz``; SQLite keeps no zone, so values are normalised to UTC on the way
    in and marked UTC on the way out.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use services.db.base.utcnow() or an aware datetime")
        return value.astimezone(dt.timezone.utc)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


#: 64-bit integer primary key that still autoincrements on SQLite (which only does for INTEGER).
BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

#: JSON everywhere, JSONB on PostgreSQL.
PortableJSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dt.datetime: UTCDateTime(),
        dict[str, Any]: PortableJSON,
        list[str]: PortableJSON,
    }


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float, or ``None`` for NaN, infinities and non-numbers: SQL columns store
    no NaN/inf portably, and JSON has neither (the row's status says why there is no number)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
