"""The one error type the CLI shows as a single clear line instead of a traceback."""


class SmartSplitError(Exception):
    """A problem the user can fix: bad config, missing data file, impossible budget.

    The message names the field or file and says what to do.
    """


class DeviceLost(SmartSplitError):
    """A device in another process disconnected or stopped answering mid-round: it drops out of the round."""
