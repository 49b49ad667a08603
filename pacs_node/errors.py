"""The node's typed errors: the worker retries a RetryableError, fails on a PermanentError."""


class PacsNodeError(Exception):
    """Base of the node's own errors."""


class RetryableError(PacsNodeError):
    """Worth trying again later: association refused, time-out, 0xA7xx from the peer."""


class PermanentError(PacsNodeError):
    """Trying again cannot help: undecodable data, unsupported SOP class, no usable model."""
