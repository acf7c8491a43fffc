"""One base class for every failure a user can cause; the CLI prints its message without a traceback."""


class UserError(ValueError):
    """Bad input, bad configuration or missing data: the message says what to do."""
