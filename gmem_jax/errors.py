"""The one exception type for problems a user can cause (bad config, missing file, wrong shape...).

CLIs catch it and print its message on one line without a traceback, then exit non-zero.
"""


class GmemError(Exception):
    """A user-facing error. The message is one line: what is wrong and how to fix it."""
