"""One error hierarchy, so callers branch on the kind of failure, never on None."""


class ChatSessionsError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(ChatSessionsError):
    """The configuration is invalid; raised at start, never at the first request."""


class UnknownChannel(ChatSessionsError):
    """A request names a channel that is not configured, or one that takes no such request (HTTP 404)."""


class InvalidSignature(ChatSessionsError):
    """A request's signature or secret token does not match (HTTP 401)."""


class HandshakeRefused(InvalidSignature):
    """A platform's subscription check came with the wrong verify token (HTTP 403)."""


class MalformedPayload(ChatSessionsError):
    """A request body is not the platform's documented shape (HTTP 400)."""


class EnqueueFailed(ChatSessionsError):
    """The broker did not accept a message; the platform must retry (HTTP 503)."""


class LeaseLost(ChatSessionsError):
    """The fencing token changed (another holder took the session over), or this holder's last fencing check is
    too old to trust (it was paused): it must stop, and must not send."""


class DeliveryFailed(ChatSessionsError):
    """A platform refused a reply for good (not retryable)."""
