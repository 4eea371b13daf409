"""``@@stream-log-viewer``: follow a log in the browser, in Plone's look."""
import os

from collective.streamguard.browser.logstream import LogAccessView


class LogViewerView(LogAccessView):
    def __call__(self):
        denied = self.check_access()
        if denied is not None:
            return denied
        return self.index()

    def log_choices(self):
        """[{name, size}] of the logs this site can stream."""
        choices = []
        for name, path in sorted(self.logs().items()):
            try:
                size = os.stat(path).st_size
            except OSError:
                size = None
            choices.append({"name": name, "size": size})
        return choices

    def stream_url(self):
        return f"{self.context.absolute_url()}/@@stream-log"
