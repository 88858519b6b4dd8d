"""Image ids: the one grammar, built and parsed here only.

- A whole file's id is its URI (local: absolute path) with ``%`` and ``#`` percent-encoded (``%25``, ``%23``),
  so it never contains ``#``.
- A shard member's id is its shard's file id, ``#``, and the member: the tar member name, or ``row=N`` for a
  Parquet row. The member itself may contain ``#``: only the first ``#`` separates.
- ``shard#`` (member `SHARD_ITSELF`, the empty string) is the id of what of a shard could not be read.
- A Parquet shard read with ``--id-column`` uses that column's values as ids verbatim: those follow no grammar,
  so a reader finds such an image by its row's ``source`` and ``member`` columns, never by parsing its id.

Every images row also stores ``source`` (the object read, verbatim) and ``member`` (null for a whole file), so
the id is never the only way back to the input.
"""

from __future__ import annotations

from typing import NamedTuple

SHARD_ITSELF = ""  # the member of a shard-level row: the shard cannot be read, or the rest of a truncated tar
SEPARATOR = "#"


def file_id(uri: str) -> str:
    """The image id of a whole file: its URI with ``%`` and ``#`` percent-encoded (so it has no ``#``)."""
    return uri.replace("%", "%25").replace("#", "%23") if ("%" in uri or "#" in uri) else uri


def member_id(shard: str, member: str) -> str:
    """The image id of a shard member (or, with ``member == SHARD_ITSELF``, of the shard itself)."""
    return f"{file_id(shard)}{SEPARATOR}{member}"


def unescape_file_id(escaped: str) -> str:
    """`file_id` undone: the URI of a whole file (or of a shard) from its id."""
    return escaped.replace("%23", "#").replace("%25", "%") if "%" in escaped else escaped


class ParsedId(NamedTuple):
    source: str  # the object's URI, verbatim
    member: str | None  # None for a whole file; `SHARD_ITSELF` for a shard-level row


def parse_image_id(image_id: str) -> ParsedId:
    """The (source, member) a generated id names: `file_id` / `member_id` undone.

    Ids taken from an ``--id-column`` follow no grammar and cannot be parsed: use the row's ``source`` and
    ``member`` columns for them (every images row has both).
    """
    escaped, separator, member = image_id.partition(SEPARATOR)
    return ParsedId(unescape_file_id(escaped), member if separator else None)


def last_part(image_id: str) -> str:
    """What follows an id's last ``#`` (a member's name), or the whole id: the part whose base name names the
    image to people (COCO file names, matching ground-truth file names). Works on any id, ``--id-column`` values
    included, since it parses nothing."""
    return image_id.rsplit(SEPARATOR, 1)[-1]


def member_of_old_row(image_id: str, source: str) -> str | None:
    """The member of a row written before the ``member`` column existed (its id was ``source#member``, with
    ``source`` not escaped then): None for a whole file."""
    if image_id == source:
        return None
    return image_id[len(source) + 1 :] if image_id.startswith(source + SEPARATOR) else image_id
