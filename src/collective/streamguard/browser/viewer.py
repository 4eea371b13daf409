"""``@@stream-log-viewer``: follow a log in the browser, in Plone's look."""

import os

from collective.streamguard.browser.stream_log import LogAccessView


class LogViewerView(LogAccessView):
    def __call__(self):
        denied = self.check_access()
        if denied is not None:
            return denied
        return self.index()

    def log_choices(self):
        """[{name, size}] of the logs this site can stream."""
        choices = []
        # Zope's event log first: it is what a site manager looks for.
        order = {"event": 0, "access": 1}
        for name, path in sorted(self.logs().items(), key=lambda i: (order.get(i[0], 2), i[0])):
            try:
                size = os.stat(path).st_size
            except OSError:
                size = None
            choices.append({"name": name, "size": size})
        return choices

    def stream_url(self):
        return f"{self.context.absolute_url()}/@@stream-log"
