"""One module per Prefect task, each a few lines around one kd_core call; `user_errors` is what each does with an
error of the user's input."""

import functools

from prefect.states import Failed, State

from kd_core.errors import KDCacheError


def user_errors(fn):
    """A task body whose KDCacheError (an error of the user's input or data: its message names the key or the file
    and the fix) ends the task run Failed with that message instead of being raised through Prefect's task engine,
    which logs it with a traceback and may retry it. The caller (the flow) gets the same exception back from the
    failed state (`value`), logs it once and makes it the run's message."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KDCacheError as e:
            return Failed(message=" ".join(str(e).split())[:1000], data=e)

    return wrapper


def value(result):
    """What a task call gave: its value, or, for a task that ended Failed on a user error (`user_errors`: Prefect
    hands a returned state back as it is), that error raised here."""
    return result.result() if isinstance(result, State) else result
