"""Secrets never leave the process: credentials inside URLs are masked wherever text goes out.

`user:password@` in any URL (S3 endpoints, MLflow and Prefect URIs, database URLs) and the values
of secret-looking query parameters become `***`. `install_log_redaction` masks every log record at
creation, whatever logger or handler (Prefect's API handler included) later carries it.
"""

from __future__ import annotations

import logging
import re

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@:]*):(?P<secret>[^\s/@]+)@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:[A-Za-z0-9_-]*(?:password|passwd|secret|token|signature|credential|api[-_]?key)[A-Za-z0-9_-]*)=)"
    r"(?P<value>[^&;#\s]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with URL credentials and secret query values masked."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}{MASK}", text)


def has_credentials(text: str) -> bool:
    return redact(text) != text


_installed = False


def install_log_redaction() -> None:
    """Mask every log record's message and traceback as it is created (idempotent)."""
    global _installed
    if _installed:
        return
    make_record = logging.getLogRecordFactory()
    formatter = logging.Formatter()

    def redacted_record(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(formatter.formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(redacted_record)
    _installed = True
