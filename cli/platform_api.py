"""The platforms' REST APIs as the operators' commands call them (`check --platforms`, `setup`): one request, the
answer as JSON, and a failure worded with the platform's own explanation. Never with a credential: Telegram carries
its token in the URL, so every message names `shown` (the URL without it) and no exception text is repeated."""

from __future__ import annotations

from typing import Any


class PlatformError(RuntimeError):
    """A request the platform refused (`refused`: a 4xx answer) or did not answer usefully (unreachable, 5xx, not
    JSON). `status` is the HTTP status, `code` the platform's own error code when it gave one."""

    def __init__(self, message: str, *, status: int | None = None, code: Any = None, words: str = ""):
        super().__init__(message)
        self.status, self.code, self.words = status, code, words

    @property
    def refused(self) -> bool:
        return self.status is not None and 400 <= self.status < 500


def _field_error(errors: Any, path: tuple[str, ...] = ()) -> str:
    """Discord's first field error, from {"field": {"_errors": [{"code": ..., "message": ...}]}} at any depth."""
    if not isinstance(errors, dict):
        return ""
    found = errors.get("_errors")
    if isinstance(found, list) and found and isinstance(found[0], dict):
        return f"{'.'.join(path) or 'body'}: {found[0].get('message', '')}"
    for key, value in errors.items():
        if key != "_errors" and (text := _field_error(value, (*path, str(key)))):
            return text
    return ""


def platform_words(doc: Any) -> tuple[str, Any]:
    """(the platform's explanation, its error code) from an error answer: Graph API `error.message`/`error.code`,
    Telegram `description`/`error_code`, Discord `message`/`code` with its first field error."""
    if not isinstance(doc, dict):
        return "", None
    if isinstance(doc.get("error"), dict):
        return str(doc["error"].get("message") or ""), doc["error"].get("code")
    if "description" in doc:
        return str(doc["description"]), doc.get("error_code")
    if "message" in doc:
        detail = _field_error(doc.get("errors"))
        return (f"{doc['message']} ({detail})" if detail else str(doc["message"])), doc.get("code")
    return "", None


def call(method: str, url: str, *, shown: str, timeout: float, headers: dict[str, str] | None = None,
         body: Any = None) -> Any:
    """The JSON answer of one request; PlatformError otherwise, naming `shown` and the platform's words."""
    import requests  # here: the CLI's parser imports this module

    try:
        response = requests.request(method, url, headers=headers or {}, json=body, timeout=timeout)
    except requests.RequestException as exc:
        raise PlatformError(f"{shown}: {exc.__class__.__name__}") from None
    try:
        doc = response.json()
    except ValueError:
        doc = None
    status = response.status_code
    if not response.ok:
        words, code = platform_words(doc)
        refused = ": the credentials were refused" if status in (401, 403) else ""
        raise PlatformError(f"{shown}: HTTP {status}{refused}" + (f" ({words})" if words else ""),
                            status=status, code=code, words=words)
    if doc is None:
        raise PlatformError(f"{shown}: HTTP {status} but the answer is not JSON", status=status)
    return doc
