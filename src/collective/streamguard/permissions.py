"""Permissions of collective.streamguard (declared in permissions.zcml)."""

VIEW_LOG_STREAMS = "collective.streamguard: View log streams"
