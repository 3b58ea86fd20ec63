"""The one exception type users see: a single line saying what is wrong and how to fix it."""


class ActcacheError(Exception):
    """A user-facing problem (bad input, missing file, unwritable store).

    The CLI prints ``str(exc)`` as one line and exits non-zero, never a traceback.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
