"""Every Python and ZCML block of README.rst is code of this package, and
every example of this package is in the README: what a newcomer copies is
what these tests run.

A block is named by its first line (``# example: NAME`` in Python,
``<!-- example: NAME -->`` in ZCML) and equals the package's code from that
marker to ``# end example`` (``</configure>`` in ZCML), with ``# noqa``
comments left out.  Shell, JavaScript and configuration-file blocks are
outside this rule: ``make run``/``make test`` run in CI, the buildout route
in ``make test-buildout``, the JavaScript clients in the Chromium tests.
"""

import os
import re
import unittest

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(PACKAGE, os.pardir, os.pardir, "README.rst")
SOURCES = ("views.py", "configure.zcml", "testing.py", os.path.join("tests", "test_progress.py"))
PYTHON = re.compile(r"^(import |from \S+ import |def |class |\s*return stream_response)", re.M)


def literal_blocks(text):
    """The literal blocks (after ``::``) of a reStructuredText file."""
    for match in re.finditer(r"::\n\n((?:    .*\n|\n)+)", text):
        lines = [line[4:] for line in match.group(1).splitlines()]
        yield "\n".join(lines).strip()


def without_noqa(code):
    return re.sub(r"  # noqa: [A-Z0-9, ]+$", "", code, flags=re.M)


def package_examples():
    examples = {}
    for name in SOURCES:
        with open(os.path.join(PACKAGE, name)) as f:
            text = f.read()
        for found, body in re.findall(r"# example: (\S+)\n(.*?)# end example", text, re.S):
            examples[found] = without_noqa(f"# example: {found}\n{body}").strip()
        for found, body in re.findall(r"<!-- example: (\S+) -->\n(.*?</configure>)", text, re.S):
            examples[found] = f"<!-- example: {found} -->\n{body}".strip()
    return examples


def readme_examples():
    with open(README) as f:
        text = f.read()
    named, unnamed = {}, []
    for block in literal_blocks(text):
        first = block.splitlines()[0]
        name = re.match(r"(?:# example: (\S+)|<!-- example: (\S+) -->)$", first)
        if name:
            named[name.group(1) or name.group(2)] = block
        elif PYTHON.search(block) or "<configure" in block:
            unnamed.append(block)
    return named, unnamed


class TestReadmeShowsTheTestedCode(unittest.TestCase):
    def test_every_python_and_zcml_block_is_a_named_example(self):
        _, unnamed = readme_examples()
        self.assertEqual(unnamed, [])

    def test_the_readme_and_the_package_hold_the_same_examples(self):
        in_readme, _ = readme_examples()
        in_package = package_examples()
        self.assertEqual(sorted(in_readme), sorted(in_package))
        for name, code in in_package.items():
            self.assertEqual(in_readme[name], code, name)
