"""Library notices that are not for the user, left out: a logger's records with a given text dropped
while a block runs (model loading here, the job's embedded Ray start in ``diffcut.job.ray_session``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def records_left_out(logger_name: str, text: str) -> Iterator[None]:
    """Drop the records of the logger ``logger_name`` whose message contains ``text`` inside the block."""

    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    logger = logging.getLogger(logger_name)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
