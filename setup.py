import os
from pathlib import Path

from setuptools import Extension
from setuptools import find_namespace_packages
from setuptools import setup

version = "1.0.0a1.dev0"

long_description = "\n\n".join(
    Path(name).read_text(encoding="utf-8") for name in ("README.rst", "CHANGES.rst")
)

# The C UTF-8 check is optional, as zope.interface's C optimizations are: a
# machine without a compiler (or PURE_PYTHON=1) installs the add-on without
# it, and LogFollower checks with CPython's decoder.
ext_modules = []
if not os.environ.get("PURE_PYTHON"):
    ext_modules.append(
        Extension(
            "collective.streamguard.logs._utf8",
            ["src/collective/streamguard/logs/_utf8.c"],
            optional=True,
        )
    )

setup(
    name="collective.streamguard",
    version=version,
    description=(
        "Streamed responses for Zope and Plone that stop the moment the "
        "browser leaves: disconnect detection, guarded streaming, live logs."
    ),
    long_description=long_description,
    long_description_content_type="text/x-rst",
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Environment :: Web Environment",
        "Framework :: Plone",
        "Framework :: Plone :: 6.1",
        "Framework :: Plone :: 6.2",
        "Framework :: Plone :: Addon",
        "Framework :: Zope",
        "Framework :: Zope :: 5",
        "Framework :: Zope :: 6",
        "License :: OSI Approved :: GNU General Public License v2 (GPLv2)",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Topic :: Internet :: WWW/HTTP :: WSGI",
    ],
    keywords="Plone Zope streaming disconnect waitress log",
    author="collective.streamguard developers",
    author_email="plone-developers@lists.sourceforge.net",
    url="https://github.com/collective/collective.streamguard",
    license="GPL version 2",
    # src layout with a native (PEP 420) ``collective`` namespace (no
    # namespace_packages).  Named here because setuptools' own discovery
    # stops once ext_modules is given.
    package_dir={"": "src"},
    packages=find_namespace_packages("src", include=["collective.*"]),
    include_package_data=True,
    ext_modules=ext_modules,
    zip_safe=False,
    python_requires=">=3.11",
    install_requires=[
        # The core (collective.streamguard.connection and friends) needs only
        # the standard library; the Zope integration needs Zope itself: Zope 5
        # (5.14, Plone 6.1's) or Zope 6 (Plone 6.2's), both tested.
        "Zope>=5.14",
    ],
    extras_require={
        # Plone integration (browser layer, control panel, profiles).  Its ZCML
        # is conditional on Products.CMFPlone being installed.
        "plone": [
            "Products.CMFPlone>=6.1",
            "plone.app.registry",
        ],
        # `make cluster`: the ZEO server (runzeo) and the instances' ZEO
        # client storage.
        "cluster": [
            "ZEO",
        ],
        # Busy producers in worker processes (run_on="worker"): huey over
        # Redis, and the `streamguard-worker` command (a ZEO client).
        "workers": [
            "huey>=2.5",
            "redis>=4",
            "ZEO",
        ],
        "test": [
            # The [workers] extra's.
            "huey>=2.5",
            "redis>=4",
            "Products.CMFPlone>=6.1",
            "plone.app.contenttypes",
            "plone.app.registry",
            "plone.app.testing",
            # What the `Plone` distribution brings along, which integrators
            # install: the REST API (Volto) and the caching rules.
            "plone.restapi",
            # plone.restapi 9 (Plone 6.1) imports plone.api without declaring
            # it; the `Plone` distribution brings it along.
            "plone.api",
            "plone.app.caching",
            "plone.testing>=9",
            "zope.testrunner",
            "waitress>=3.0.1",
            "gunicorn",
            "uwsgi",
            "ZEO",
            "SQLAlchemy",
            "zope.sqlalchemy",
            "selenium",
            # ZServer 4.0.2 (the real classic server of the ZServer tests)
            # imports six but does not declare it; ZServer itself is
            # installed apart by `make install-test` (see the Makefile).
            "six",
        ],
    },
    # Plone loads the add-on's ZCML by itself.  plone.autoinclude's own entry
    # point, with the module named: Plone 6.1's plone.autoinclude 1 guesses
    # the module of a z3c.autoinclude.plugin entry point from the normalized
    # distribution name (collective_streamguard) and fails to start.
    entry_points={
        "plone.autoinclude.plugin": [
            "target = plone",
            "module = collective.streamguard",
        ],
        "console_scripts": [
            "streamguard-worker = collective.streamguard.worker:main",
        ],
    },
)
