"""The UTF-8 checks of LogFollower give CPython's decoder's answers.

``_utf8.check`` (C) and ``check_utf8_with_decoder`` (its fallback) are both
compared with ``codecs.utf_8_decode(data, "strict", final)``: every one- and
two-byte string, every lead byte with every second byte and its possible
ends, and random strings built from the bytes where UTF-8 has its edges.
"""

import codecs
import itertools
import os
import random
import subprocess
import sys
import unittest

from collective.streamguard.logs import utf8
from collective.streamguard.logs.utf8 import InvalidUTF8
from collective.streamguard.logs.utf8 import check_utf8
from collective.streamguard.logs.utf8 import check_utf8_with_decoder

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(utf8.__file__))))
# The edges of UTF-8: ASCII, continuation bytes at both ends, every kind of
# lead byte and the bytes that are never valid.
EDGES = [
    0x00, 0x0A, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2,
    0xDF, 0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF,
]  # fmt: skip


def expected(data, final):
    """(taken, valid) as CPython's strict decoder sees ``data``."""
    try:
        return codecs.utf_8_decode(data, "strict", final)[1], True
    except UnicodeDecodeError as error:
        return error.start, False


def with_decoder(data, final):
    try:
        return check_utf8_with_decoder(data, memoryview(data), final)[1], True
    except InvalidUTF8:
        return None, False


def samples():
    for size in (1, 2):
        for combination in itertools.product(range(256), repeat=size):
            yield bytes(combination)
    for lead in range(0xC0, 0x100):
        for second in range(0x80, 0xC0, 3):
            for rest in (b"", b"\x80", b"\xbf", b"\x80\x80", b"A", b"\x80A"):
                yield bytes([lead, second]) + rest
    rng = random.Random(2583)
    for _ in range(20_000):
        body = bytes(rng.choice(EDGES) for _ in range(rng.randint(1, 12)))
        yield b"x" * rng.choice((0, 7, 8, 9, 15, 16)) + body + b"y" * rng.randint(0, 9)


class CheckTests(unittest.TestCase):
    def test_the_c_check_is_built_here(self):
        # setup.py builds it when a compiler is there, as on our machines;
        # PURE_PYTHON=1 (set by nobody in the suite) would turn it off.
        from collective.streamguard.logs import _utf8  # noqa: F401

        self.assertIsNotNone(utf8._c_check_utf8)

    def test_c_check_answers_as_the_decoder(self):
        from collective.streamguard.logs._utf8 import check

        count = 0
        for data in samples():
            for final in (False, True):
                self.assertEqual(check(data, final), expected(data, final), (data, final))
                count += 1
        self.assertGreater(count, 150_000)

    def test_decoder_check_answers_as_the_decoder(self):
        for data in samples():
            for final in (False, True):
                taken, valid = expected(data, final)
                self.assertEqual(with_decoder(data, final), (taken if valid else None, valid), data)

    def test_long_input_across_slices_and_words(self):
        from collective.streamguard.logs._utf8 import check

        rng = random.Random(5)
        pieces = ["a" * 100, "größe ", "€", "😀", "日本語\n", "\x7f"]
        text = "".join(rng.choice(pieces) for _ in range(40_000))
        data = text.encode()
        self.assertEqual(check(data, True), (len(data), True))
        self.assertEqual(check_utf8(data, memoryview(data), True), (None, len(data)))
        broken = data[: len(data) // 2] + b"\xed\xa0\x80" + data[len(data) // 2 :]
        self.assertEqual(check(broken, False), (len(data) // 2, False))
        with self.assertRaises(InvalidUTF8):
            check_utf8(broken, memoryview(broken), False)
        cut = data + "😀".encode()[:3]
        self.assertEqual(check(cut, False), (len(data), True))
        self.assertEqual(check(cut, True), (len(data), False))

    def test_pure_python_turns_the_c_check_off(self):
        script = "from collective.streamguard.logs import utf8; print(utf8._c_check_utf8)"
        result = subprocess.run(
            [sys.executable, "-c", script],
            env=dict(os.environ, PYTHONPATH=SRC, PURE_PYTHON="1"),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        self.assertEqual(result.stdout.strip(), "None")
