"""Upgrade steps of the ``default`` profile (registered in configure.zcml)."""
