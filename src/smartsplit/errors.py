"""The one error type the CLI shows as a single clear line instead of a traceback."""


class SmartSplitError(Exception):
    """A problem the user can fix: bad config, missing data file, impossible budget.

    The message names the field or file and says what to do.
    """


class DeviceLost(SmartSplitError):
    """A device in another process disconnected or stopped answering mid-round: it drops out of the round."""


def check_argument(function: str, name: str, value: object, *kinds: type, items: type | None = None) -> None:
    """A public function's argument is of one of ``kinds`` (a list or tuple of ``items`` when those are given),
    or a ``SmartSplitError`` names the function, the argument, what it got and what it takes."""
    def fits(v: object, kind: type) -> bool:
        return isinstance(v, kind) and not (isinstance(v, bool) and kind in (int, float))

    if items is not None:
        ok = isinstance(value, (list, tuple)) and all(fits(v, items) for v in value)
        wanted = f"a list of {items.__name__}"
    else:
        ok = any(fits(value, k) for k in kinds)
        wanted = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
    if not ok:
        raise SmartSplitError(f"{function}({name}=...): expected {wanted}, got {type(value).__name__} {value!r:.60}")
