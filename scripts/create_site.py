"""Create (or update) the Plone site of `make run`.

Run by `make run` as ``zconsole run instance/etc/zope.conf scripts/create_site.py``;
zconsole provides ``app``.  Idempotent: a second run reuses the site, makes sure
the add-on is installed and the admin login matches the make variables.
"""

import os

import transaction
from plone.base.utils import get_installer
from Products.CMFPlone.factory import addPloneSite
from zope.component.hooks import setSite

site_id = os.environ.get("SITE_ID", "Plone")
user = os.environ.get("ADMIN_USER", "admin")
password = os.environ.get("ADMIN_PASSWORD", "admin")

# The Zope root user: created, or its password reset to what make was given.
acl_users = app.acl_users  # noqa: F821 - provided by zconsole
if acl_users.getUserById(user) is None:
    acl_users._doAddUser(user, password, ["Manager"], [])
elif "users" in acl_users.objectIds():
    # PlonePAS replaces the Zope root's user folder with a PluggableAuthService
    # at startup: its ZODB user manager keeps the password.
    acl_users.users.updateUserPassword(user, password)
else:
    acl_users._doChangeUser(user, password, ["Manager"], [])

if site_id not in app.objectIds():  # noqa: F821
    site = addPloneSite(
        app,  # noqa: F821
        site_id,
        title="Plone with collective.streamguard",
        # Plone's look: the classic distribution applies the Barceloneta
        # theme; a bare addPloneSite does not.
        extension_ids=(
            "plone.app.contenttypes:default",
            "plonetheme.barceloneta:default",
            "collective.streamguard:default",
        ),
        setup_content=False,
    )
    print(f"Created the Plone site /{site_id} with collective.streamguard installed.")
else:
    site = app[site_id]  # noqa: F821
    setSite(site)
    installer = get_installer(site)
    if not installer.is_product_installed("collective.streamguard"):
        installer.install_product("collective.streamguard")
        print(f"Installed collective.streamguard in /{site_id}.")
    else:
        print(f"Reusing the Plone site /{site_id}.")
    if site.portal_setup.getLastVersionForProfile("plonetheme.barceloneta:default") == "unknown":
        site.portal_setup.runAllImportStepsFromProfile("profile-plonetheme.barceloneta:default")
        print("Applied Plone's Barceloneta theme.")
# Plone leaves requests to 127.0.0.1 unthemed by default ("Unthemed host
# names"); the URL make run prints is exactly that host.
registry = site.portal_registry
record = "plone.app.theming.interfaces.IThemeSettings.hostnameBlacklist"
if registry.get(record):
    registry[record] = []
transaction.commit()
