Plone 6.1 (Zope 5) is supported beside Plone 6.2 (Zope 6): ``install_requires``
asks for Zope 5.14 or later and the ``plone`` extra for Products.CMFPlone 6.1
or later, with classifiers for Plone 6.1 and 6.2, Zope 5 and 6.  Each release
has its own pins (``constraints-6.1.txt`` and ``versions-6.1.cfg``: Plone
6.1.5, Zope 5.14.2, waitress 3.0.2; ``make pins PLONE=6.1``), and ``make test
PLONE=6.1`` and ``make run PLONE=6.1`` test and serve it in ``.venv-6.1``; CI
runs the whole suite on both, one after the other.  ``make lint`` checks with
ruff and vermin that the code needs no Python newer than 3.10 (``@@stream-status``
no longer uses ``datetime.UTC``).
