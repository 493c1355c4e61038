"""The one exception type raised at the project's edges (config, data rows, HF folders, server replies)."""


class KiminaError(Exception):
    """Bad input or an unusable environment; the message names the file, key, field or line at fault."""
