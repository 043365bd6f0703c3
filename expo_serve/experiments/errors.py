"""The one error type of the experiments subsystem, shaped for OpenAI's error envelope."""
from __future__ import annotations

from ..errors import ExpoError


class ExperimentError(ExpoError):
    """A request the experiments subsystem refuses, with the HTTP status the server should use.

    `envelope()` gives OpenAI's `{"error": {"message", "type", "param", "code"}}`.
    """

    def __init__(self, message: str, *, status: int = 400, code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 403:
            return "permission_error"
        if self.status >= 500:
            return "server_error"
        return "invalid_request_error"

    def envelope(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_found(what: str, ident: str, param: str | None = None) -> ExperimentError:
    return ExperimentError(f"No {what} named {ident!r}.", status=404,
                           code=f"{what.replace(' ', '_')}_not_found", param=param)
