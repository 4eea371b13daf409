"""UTF-8 checking for ``LogFollower``: the file's own bytes go out only once checked.

``check_utf8`` uses the optional C extension ``_utf8`` (built where there
is a compiler, like zope.interface's C optimizations; ``PURE_PYTHON=1``
turns it off) and otherwise CPython's decoder; both give exactly the
answers of ``codecs.utf_8_decode(data, "strict", final)``.

Standard library only.
"""

import codecs
import os

try:  # the optional C check (_utf8.c); PURE_PYTHON=1 turns it off
    from collective.streamguard.logs._utf8 import check as _c_check_utf8
except ImportError:
    _c_check_utf8 = None
if os.environ.get("PURE_PYTHON"):
    _c_check_utf8 = None

# The decoder checks in slices of this size: its output then stays in the
# CPU's cache, and after a non-ASCII character it decodes only the rest of
# its slice the slow way (benchmarks/README.rst has the slice sizes tried).
_CHECK_SLICE = 8192


class InvalidUTF8(ValueError):
    """Raised by the UTF-8 checks: the bytes are not (all) valid UTF-8."""


def check_utf8(data, view, final):
    """(text or None, bytes taken) for ``view``, the start of ``data``, when
    it is valid UTF-8; raise ``InvalidUTF8`` when it is not.

    An incomplete sequence at the end is not taken unless ``final``.  The
    text is returned when a decoder call made it anyway; otherwise it is
    left to ``Piece.text`` to decode if it is ever asked for.
    """
    if _c_check_utf8 is None:
        return check_utf8_with_decoder(data, view, final)
    taken, valid = _c_check_utf8(view, final)
    if not valid:
        raise InvalidUTF8(f"invalid UTF-8 at byte {taken}")
    return None, taken


def check_utf8_with_decoder(data, view, final):
    """``check_utf8`` with CPython's decoder: where _utf8.c is not built."""
    size = len(view)
    if size == len(data) and data.isascii():  # stops at the first byte >= 0x80
        return None, size
    try:
        if size <= _CHECK_SLICE:
            return codecs.utf_8_decode(view, "strict", final)
        position = 0
        while position < size:
            stop = min(position + _CHECK_SLICE, size)
            last = stop == size
            # Not final inside the piece: a sequence cut by the slice's end
            # is left for the next slice.
            _text, used = codecs.utf_8_decode(view[position:stop], "strict", final and last)
            position += used
            if last or not used:
                break
        return None, position
    except UnicodeDecodeError as error:
        raise InvalidUTF8(str(error)) from None
