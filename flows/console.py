"""What a batch shows on the terminal: its sources, a line per pair and the summary.

Prefect's INFO lines, the temporary server's chatter and the tracebacks of failed pairs go to a log
file under the state dir (its path is printed first); `-v` shows everything on the terminal too.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

# Loggers that configure their own terminal handler instead of propagating to the root.
_OWN_HANDLERS = ("uvicorn", "fastapi", "prefect._internal")


class _Quiet(logging.Filter):
    """Terminal filter: Prefect and its server only when critical, everything else from warnings up."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":  # library deprecation notices: the log file only
            return False
        if record.name.startswith(("prefect", *_OWN_HANDLERS)):
            return record.levelno >= logging.CRITICAL
        return record.levelno >= logging.WARNING


def _writes_to_terminal(handler: logging.Handler) -> bool:
    return not isinstance(handler, logging.FileHandler) and getattr(handler, "stream", None) in (
        sys.stderr,
        sys.stdout,
        sys.__stderr__,
        sys.__stdout__,
    )


class _BatchLog(logging.FileHandler):
    """The log file of one batch run."""


def route_logs(state_dir: Path, verbose: bool) -> Path:
    """Send every INFO record to `<state dir>/logs/<time>-<pid>.log`; quiet the terminal unless verbose.

    Call it after Prefect configured logging (importing prefect does), so its handlers are the ones filtered.
    """
    folder = state_dir / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    to_file = _BatchLog(path, encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if not verbose:
        # Read when these libraries are first imported: MLflow's own stderr handler, datasets' progress bars.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
    logging.captureWarnings(True)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for logger in (root, *(logging.getLogger(name) for name in _OWN_HANDLERS)):
        for handler in list(logger.handlers):
            if isinstance(handler, _BatchLog):  # an earlier batch of this process: one log file at a time
                logger.removeHandler(handler)
                handler.close()
            elif _writes_to_terminal(handler) and not verbose:
                if not any(isinstance(f, _Quiet) for f in handler.filters):
                    handler.addFilter(_Quiet())
        logger.addHandler(to_file)
    for noisy in ("httpx", "httpcore", "alembic", "botocore", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retry warnings repeat what the error line says
    return path
