"""Where a client of ``@@stream-log`` is: a file and a byte offset, as an SSE id.

A byte offset alone is not a place: behind a balancer a reconnecting
EventSource lands on another instance, whose log of the same name is
another file, and after a rotation the same name is another file too.  An
id names the file as well::

    <fingerprint>-<offset>      e.g.  9f2c61d0a4b7e358-18324

``offset`` is the byte offset just after the event's data (decimal).
``fingerprint`` is 16 hex digits: the first 8 bytes of BLAKE2b over the
file's ``st_dev`` and ``st_ino``, its first ``min(HEAD, offset)`` bytes and
the ``TAIL`` bytes just before ``offset``.  Two instances' files never
share it (their inode numbers may coincide on two hosts; their first bytes,
timestamps included, and the bytes before the offset do not), and a rotated
file does not keep it: renamed away, the name is another inode; truncated
and written again (copytruncate), its first bytes and the bytes before the
offset are others.  Everything in it is derived from the file at the
offset, so any instance can check an id against the file it follows
without keeping state.

Ids of plain digits are what earlier versions sent (a bare offset); they
are honoured where they can be right: within the file, at the start of a
line.

Standard library only.
"""

import dataclasses
import hashlib
import os
import re
import struct

#: Bytes at the start of the file that the fingerprint covers.
HEAD = 64
#: Bytes just before the offset that the fingerprint covers.
TAIL = 32

_ID = re.compile(r"(?:([0-9a-f]{16})-)?([0-9]{1,15})")


class Switch:
    """Why a resume point was not honoured: the ``reason`` of the switch event."""

    #: The id is none this stream sends (garbage, or too long).
    UNKNOWN_ID = "unknown id"
    #: The file here is not the one the id names: another instance's
    #: file, a rotated one, or one rewritten since.
    OTHER_FILE = "other file"
    #: A plain offset (an id of earlier versions) past the end of the file
    #: here or not at the start of a line.
    NOT_A_LINE_START = "offset not at a line start"
    #: The name has no file now.
    NO_FILE = "no file"


def fingerprint(ident, head, tail):
    """The 16 hex digits naming the file ``ident`` (st_dev, st_ino) whose
    first bytes are ``head`` and whose bytes before the offset are ``tail``."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(struct.pack("<QQHH", ident[0], ident[1], len(head), len(tail)))
    digest.update(head)
    digest.update(tail)
    return digest.hexdigest()


def event_id(ident, head, tail, offset):
    """The SSE id (bytes) of ``offset`` in the file ``ident``; ``head`` is
    its first ``min(HEAD, offset)`` bytes and ``tail`` the ``min(TAIL,
    offset)`` bytes before ``offset``."""
    return b"%s-%d" % (fingerprint(ident, head, tail).encode("ascii"), offset)


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """A place to resume at, as a client sent it back: ``offset`` and the
    ``fingerprint`` of its file (None for a plain offset of earlier
    versions).  ``offset`` None: the client sent something that is no id
    of this stream; it is a place in no file."""

    offset: int | None
    fingerprint: str | None = None

    @classmethod
    def parse(cls, text):
        """The point an SSE id names.  Never raises: whatever the client
        sent that is no id of ours is ``ResumePoint(None)``."""
        match = _ID.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            return cls(None)
        return cls(int(match.group(2)), match.group(1))

    def check(self, fd, ident, size):
        """None when this point is a place in the open file ``fd`` (``ident``:
        its st_dev and st_ino, ``size`` its size) where a stream may go on
        with nothing lost or repeated; else a ``Switch`` reason."""
        offset = self.offset
        if offset is None:
            return Switch.UNKNOWN_ID
        if offset > size:
            return Switch.OTHER_FILE if self.fingerprint else Switch.NOT_A_LINE_START
        if self.fingerprint is None:
            if offset == 0 or os.pread(fd, 1, offset - 1) == b"\n":
                return None
            return Switch.NOT_A_LINE_START
        head = os.pread(fd, min(HEAD, offset), 0)
        tail_start = max(0, offset - TAIL)
        tail = os.pread(fd, offset - tail_start, tail_start)
        if fingerprint(ident, head, tail) != self.fingerprint:
            return Switch.OTHER_FILE
        return None
