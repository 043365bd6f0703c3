"""The one error type of the experiments subsystem, shaped for OpenAI's error envelope."""
from __future__ import annotations

from ..api_common import envelope, error_type, quote
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
        return error_type(self.status)

    def envelope(self) -> dict:
        return envelope(self.message, self.type, self.param, self.code)


def not_found(what: str, ident: str, param: str | None = None) -> ExperimentError:
    return ExperimentError(f"No {what} named {quote(ident)}.", status=404,
                           code=f"{what.replace(' ', '_')}_not_found", param=param)


class PhaseMoved(Exception):
    """The experiment's stored phase or status is no longer what this replica's copy says: another
    replica edited it. The service re-reads its copy and assigns again; never an HTTP answer."""
