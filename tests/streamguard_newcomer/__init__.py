"""A newcomer's add-on: views written only from README.rst.

Every Python and ZCML block of the README is code of this package (the
``example:`` markers; ``tests/test_readme.py`` checks that they are the
same), and its tests use only what the README documents, with a layer of
its own on the add-on's integrator fixture.  It is not installed: ``make
test`` puts ``tests/`` on the test path.
"""
