"""The one exception type the data pipeline raises for bad input or bad configuration."""


class DataError(ValueError):
    """A problem the user can fix (bad path, wrong flag, mismatched vocabulary).

    Subclassing ValueError lets callers that only know "the config is wrong" catch it,
    and lets the CLI print the message without a traceback.
    """
