"""The exception types raised at the project's edges (config, data rows, HF folders, server replies)."""


class KiminaError(Exception):
    """Bad input or an unusable environment; the message names the file, key, field or line at fault."""


class VerifierError(KiminaError):
    """The verifier refuses to check anything (wrong key, a request it rejects): retrying cannot help, so a
    training run checkpoints and stops."""
