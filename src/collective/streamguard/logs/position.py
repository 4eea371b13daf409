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

After a switch to another file, the id also carries the places the
client had reached in the files it followed before (at most
``MAX_CARRIED``, most recent first), each ``.<fingerprint>-<offset>``::

    0a1b2c3d4e5f6071-2048.9f2c61d0a4b7e358-18324

so that a reconnect that lands on one of those files again (a balancer's
round robin between two instances) goes on where the client left it
instead of sending lines it already has.

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

#: Places in other files an id carries along, at most.
MAX_CARRIED = 3

_PLACE = r"[0-9a-f]{16}-[0-9]{1,15}"
_ID = re.compile(rf"(?:([0-9a-f]{{16}})-)?([0-9]{{1,15}})((?:\.{_PLACE}){{0,{MAX_CARRIED}}})")


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
    #: Not the id's own file, but one it carries: the client was here
    #: before, and the stream goes on where it left this file.
    RETURNED = "returned"


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
    #: The places in other files the id carries (``ResumePoint`` objects).
    carried: tuple = ()

    @classmethod
    def parse(cls, text):
        """The point an SSE id names.  Never raises: whatever the client
        sent that is no id of ours is ``ResumePoint(None)``."""
        match = _ID.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None or (match.group(3) and not match.group(1)):
            return cls(None)
        carried = tuple(
            cls(int(offset), fingerprint)
            for fingerprint, _, offset in (
                place.partition("-") for place in match.group(3).split(".")[1:]
            )
        )
        return cls(int(match.group(2)), match.group(1), carried)

    @property
    def place(self):
        """``<fingerprint>-<offset>`` (bytes), or None for a plain offset."""
        if self.fingerprint is None or self.offset is None:
            return None
        return b"%s-%d" % (self.fingerprint.encode("ascii"), self.offset)

    def choose(self, fd, ident, size):
        """Where to start in the open file ``fd``: ``(offset, switch,
        carried)``.  ``offset`` is None where no place the id names is in
        this file (start as ``lines=`` says); ``switch`` is None for the
        id's own place, else a ``Switch`` reason; ``carried`` is what the
        stream's ids carry along (bytes: ``.<place>`` each, or b"")."""
        switch = self.check(fd, ident, size)
        if switch is None:
            return self.offset, None, carry(self.carried)
        for index, other in enumerate(self.carried):
            if other.check(fd, ident, size) is None:
                rest = (self, *self.carried[:index], *self.carried[index + 1 :])
                return other.offset, Switch.RETURNED, carry(rest)
        return None, switch, carry((self, *self.carried))

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


def carry(points):
    """What ids carry along of ``points`` (bytes, ``.<place>`` each): the
    first ``MAX_CARRIED`` that name a file."""
    places = [point.place for point in points if point.place is not None]
    return b"".join(b"." + place for place in places[:MAX_CARRIED])
