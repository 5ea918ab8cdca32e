"""Bounded integer path and query parameters, shared by every router.

A number in a URL beyond what the column holds (``/submissions/9223372036854775808``; on PostgreSQL
already ``/submissions/2147483648``) used to reach the database and fail there (500). These types stop it at validation: 422 naming the
parameter and the range.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

#: the largest signed 64-bit integer (PostgreSQL BIGINT, SQLite INTEGER)
INT64_MAX = 2**63 - 1
#: the largest signed 32-bit integer (PostgreSQL INTEGER columns)
INT32_MAX = 2**31 - 1

#: a row id in a path (``/submissions/{submission_id}``). Users, tokens, algorithms and submissions
#: have INTEGER (32-bit) keys in PostgreSQL: a larger id cannot exist and must not reach the query
IdPath = Annotated[int, Path(ge=1, le=INT32_MAX, description="a positive id (at most 2^31-1)")]
#: the offset of a page
Offset = Annotated[int, Query(ge=0, le=INT64_MAX, description="rows to skip (0 to 2^63-1)")]


#: page sizes of the list endpoints
PageLimit1000 = Annotated[int, Query(ge=1, le=1000, description="rows per page (1 to 1000)")]
PageLimit10000 = Annotated[int, Query(ge=1, le=10000, description="rows per page (1 to 10000)")]
