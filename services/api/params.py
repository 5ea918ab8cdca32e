"""Bounded integer path and query parameters, shared by every router.

Ids are stored as 64-bit integers; a larger number in a URL (``/submissions/9223372036854775808``)
used to reach the database and fail there (500). These types stop it at validation: 422 naming the
parameter and the range.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

#: the largest signed 64-bit integer (PostgreSQL BIGINT, SQLite INTEGER)
INT64_MAX = 2**63 - 1
#: the largest signed 32-bit integer (PostgreSQL INTEGER columns)
INT32_MAX = 2**31 - 1

#: a row id in a path (``/submissions/{submission_id}``)
IdPath = Annotated[int, Path(ge=1, le=INT64_MAX, description="a positive id (at most 2^63-1)")]
#: the offset of a page
Offset = Annotated[int, Query(ge=0, le=INT64_MAX, description="rows to skip (0 to 2^63-1)")]


#: page sizes of the list endpoints
PageLimit1000 = Annotated[int, Query(ge=1, le=1000, description="rows per page (1 to 1000)")]
PageLimit10000 = Annotated[int, Query(ge=1, le=10000, description="rows per page (1 to 10000)")]
