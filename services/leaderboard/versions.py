"""The protocol versions of a test set, and a test set seen under one of them.

A test set is imported with one protocol (``TestSet.protocol_key`` / ``protocol_json``: its
*current* version, what every reader gets by default). Re-scoring (:mod:`services.rescoring`)
adds others (:class:`services.db.models.TestSetProtocol`). Scores, aggregates and the comparative
statistics are all keyed by ``protocol_key``, so the write side (:mod:`.compute`) and the read side
(:mod:`.queries`) work on any version when handed :func:`under_protocol`'s view of the test set:
the same object with the ``protocol_*`` attributes of the chosen version.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.db.models import TestSet, TestSetProtocol


class UnknownProtocolVersion(LookupError):
    """A protocol key the test set has no scores under (the message lists the ones it has)."""


class TestSetUnderProtocol:
    """``testset`` with the ``protocol_name``, ``protocol_version``, ``protocol_key`` and
    ``protocol_json`` of another of its protocol versions; every other attribute is the test set's
    (read through). Read-only: change the test set itself, not the view."""

    __test__ = False  # not a pytest class

    def __init__(self, testset: TestSet, protocol_key: str, protocol_json: dict[str, Any]) -> None:
        name, _, version = protocol_key.partition("@")
        object.__setattr__(self, "_testset", testset)
        object.__setattr__(self, "protocol_key", protocol_key)
        object.__setattr__(self, "protocol_name", name)
        object.__setattr__(self, "protocol_version", version)
        object.__setattr__(self, "protocol_json", dict(protocol_json or {}))

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_testset"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the view of test set {self.name!r} under {self.protocol_key} is read-only")

    @property
    def testset(self) -> TestSet:
        return object.__getattribute__(self, "_testset")


def _unwrapped(testset: TestSet | TestSetUnderProtocol) -> TestSet:
    return testset.testset if isinstance(testset, TestSetUnderProtocol) else testset


def other_protocols(session: Session, testset: TestSet) -> list[TestSetProtocol]:
    """The test set's protocol versions besides its current one (oldest first; of a view: those of
    the test set it shows)."""
    testset = _unwrapped(testset)
    return list(session.scalars(
        sa.select(TestSetProtocol).where(TestSetProtocol.testset_id == testset.id,
                                         TestSetProtocol.protocol_key != testset.protocol_key)
        .order_by(TestSetProtocol.id)))


def protocol_keys(session: Session, testset: TestSet) -> list[str]:
    """Every protocol key of the test set, the current one first."""
    testset = _unwrapped(testset)
    return [testset.protocol_key, *(p.protocol_key for p in other_protocols(session, testset))]


def under_protocol(session: Session, testset: TestSet, protocol_key: str | None) -> TestSet | TestSetUnderProtocol:
    """``testset`` itself for its current key (or ``None``), else its view under ``protocol_key``;
    :class:`UnknownProtocolVersion` for a key the test set has no protocol of."""
    testset = _unwrapped(testset)
    if protocol_key is None or protocol_key == testset.protocol_key:
        return testset
    row = session.scalar(sa.select(TestSetProtocol).where(TestSetProtocol.testset_id == testset.id,
                                                          TestSetProtocol.protocol_key == str(protocol_key)))
    if row is None:
        shown = str(protocol_key)
        shown = shown if len(shown) <= 100 else shown[:100] + "..."
        raise UnknownProtocolVersion(
            f"test set {testset.name!r} has no scores under protocol {shown!r}; its protocol versions: "
            f"{', '.join(protocol_keys(session, testset))} (give one as protocol=NAME@VERSION, or none for "
            f"the current {testset.protocol_key})")
    return TestSetUnderProtocol(testset, row.protocol_key, row.protocol_json)
