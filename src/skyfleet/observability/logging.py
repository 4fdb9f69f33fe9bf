"""Structured JSON logs on stderr.

Log records carry only metadata (ids, tenant, model, status, timings). Nothing on the request
path passes prompts, completions, keys or tokens to a logger; :class:`JsonFormatter` also
drops any ``extra`` field whose name suggests a secret, as a second line of defence.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_FORBIDDEN = ("key", "token", "secret", "password", "authorization", "prompt", "content", "messages")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name in _RESERVED or name.startswith("_"):
                continue
            lowered = name.lower()
            if any(bad in lowered for bad in _FORBIDDEN) and not lowered.endswith("_id"):
                continue
            out[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
        return orjson.dumps(out, default=str).decode()


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # uvicorn.error logs exception messages that could contain request data; keep it at warning.
    logging.getLogger("uvicorn.error").setLevel(max(logging.WARNING, root.level))
