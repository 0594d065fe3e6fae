"""The one exception users catch: SteeringError (bad input, named with its fix)."""


class SteeringError(ValueError):
    """Bad steering input; the message says what to change."""
