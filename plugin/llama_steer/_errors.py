"""The one exception users catch: SteeringError (bad input, named with its fix)."""


class SteeringError(ValueError):
    """Bad steering input; the message says what to change. ``field``: the config field at
    fault when one is (apps reword the fix in their own terms: a flag, a chat command)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
