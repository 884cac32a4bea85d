"""What every task shares: the retry policy, memory readings."""

from __future__ import annotations

import resource
import sys
from typing import Any

from prefect import Task

from infra.settings import Settings

# Errors of the input itself: a retry gives the same answer, so fail at once.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (ValueError, LookupError, FileNotFoundError, TypeError)


def retry_if_transient(task: Task, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry network and storage trouble, never a bad input."""
    try:
        state.result()
    except PERMANENT_ERRORS:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return False


def retried(task: Task, settings: Settings) -> Task:
    """The task with the configured retries, backing off x3 per attempt."""
    delays = [settings.retry_delay_seconds * 3**attempt for attempt in range(settings.task_retries)]
    return task.with_options(retries=settings.task_retries, retry_delay_seconds=delays or 0)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_gpu_mib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def numeric_environment(device: str) -> dict[str, str]:
    """What the numbers of a prune depend on besides its inputs: the same run differs across these."""
    import torch

    where = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    return {"device": where, "torch": torch.__version__, "threads": str(torch.get_num_threads())}
