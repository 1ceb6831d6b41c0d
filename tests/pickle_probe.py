"""A pickle payload that records being unpickled, so a test can prove nothing unpickled it."""

from __future__ import annotations

UNPICKLED: list[int] = []


def _record_unpickling() -> None:
    UNPICKLED.append(1)


class Payload:
    """Unpickling this calls ``_record_unpickling`` (appends to ``UNPICKLED``)."""

    def __reduce__(self) -> tuple:
        return (_record_unpickling, ())
