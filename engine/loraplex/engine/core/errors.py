"""Exceptions a request can raise before it reaches the step loop; the HTTP layer maps them to 4xx."""


class RequestError(ValueError):
    """Bad input from a client. `status` is the HTTP status it maps to; `param` names the field."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PromptTooLongError(RequestError):
    status = 413
    code = "context_length_exceeded"


class UnknownAdapterError(RequestError):
    status = 404
    code = "model_not_found"


class AdapterPathError(RequestError):
    """An adapter name that would leave --adapter-dir (`..`, an absolute path, a symlink out)."""

    status = 400
    code = "invalid_adapter_path"


class InvalidAdapterError(RequestError):
    """The name exists in the adapter source, but what is there is not a servable PEFT LoRA checkpoint."""

    status = 422
    code = "invalid_adapter"


class AdapterUnavailableError(RequestError):
    """The adapter exists but failed to load; retrying will not help until it is fixed."""

    status = 424
    code = "adapter_failed"


class AdapterLoadTimeoutError(RequestError):
    """The adapter was not loaded within --adapter-wait-timeout-seconds of the request's arrival."""

    status = 503
    code = "adapter_load_timeout"
    retry_after = 5


class QueueFullError(RequestError):
    status = 429
    code = "queue_full"
