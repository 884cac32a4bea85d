"""One way every cached stage runs: lock -> its result here -> the store's shared copy -> compute -> share.

A stage (a calibration set, a prune, a recovery, an evaluation) is a value holding its inputs. It declares
its fingerprint, which names its lock, its Prefect cache key and its place in the artifact store, and how to
read its result here, fetch it from the store, compute it and share it; `run_stage` does the rest, the same
way for all of them. Prefect's cache record, keyed by the same name (kept in the store on a pool), is the index
a batch looks up first (`stage_task`); `restore` checks the files a record names before a hit is trusted,
under the same lock, and fetches them from the store where this machine lacks them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cached_property
from typing import ClassVar, Generic, TypeVar

from prefect import Task, task
from pydantic import BaseModel, ConfigDict

from infra.locks import exclusive
from infra.settings import Settings

ResultT = TypeVar("ResultT", bound=BaseModel)


class Stage(BaseModel, ABC, Generic[ResultT]):
    """The inputs of one stage and what it makes of them."""

    model_config = ConfigDict(frozen=True)

    kind: ClassVar[str]  # prefix of its cache key and lock: calibration, prune, recover, evaluate
    task_name: ClassVar[str]  # its Prefect task's name

    @abstractmethod
    def identity(self) -> str:
        """Of everything its result depends on."""

    @cached_property
    def fingerprint(self) -> str:
        """`identity()`, computed once per stage (calibration and recovery hash their data files for it)."""
        return self.identity()

    def cache_key(self) -> str:
        return f"{self.kind}-{self.fingerprint}"

    @abstractmethod
    def local(self, settings: Settings) -> ResultT | None:
        """Its result as made here before (files intact), else None."""

    @abstractmethod
    def pull(self, settings: Settings) -> ResultT | None:
        """Its result from the store's shared results, verified and put in place here, else None."""

    @abstractmethod
    def compute(self, settings: Settings) -> ResultT:
        """Make it (resuming from its own checkpoints where it has any)."""

    @abstractmethod
    def push(self, result: ResultT, settings: Settings) -> None:
        """Share what `compute` made through the store."""

    def intact(self, result: ResultT) -> bool:
        """Whether the files a result names are here as they were made (a result that is its own value: True)."""
        return True


def run_stage(stage: Stage[ResultT], settings: Settings) -> ResultT:
    """By one process at a time (another waits, then reuses): here, else shared, else computed and shared."""
    with exclusive(settings.path("locks"), stage.cache_key()):
        result = stage.local(settings)
        if result is None and settings.share_results:
            result = stage.pull(settings)
        if result is None:
            result = stage.compute(settings)
            if settings.share_results:
                stage.push(result, settings)
        return result


def restore(stage: Stage[ResultT], cached: ResultT, settings: Settings) -> bool:
    """True once the files a cached result names are here intact (fetched now from the store, or already
    here); False: compute them again."""
    if stage.intact(cached):
        return True
    if not settings.share_results:
        return False
    with exclusive(settings.path("locks"), stage.cache_key()):
        return stage.intact(cached) or (stage.pull(settings) is not None and stage.intact(cached))


def _cache_key(context, parameters: dict) -> str:
    return parameters["stage"].cache_key()


@task(cache_key_fn=_cache_key, persist_result=True, result_serializer="json")
def _stage_run(stage: Stage, settings: Settings) -> BaseModel:
    """No retries: the stages' checkpoints make a rerun cheap, and a bad input fails the same way twice."""
    return run_stage(stage, settings)


def stage_task(stage: Stage, settings: Settings) -> Task:
    """The Prefect task that runs `stage`, its result record kept (JSON, never pickle) under the state dir, or
    where results are shared (a pool) in the artifact store, where every worker's cache lookup finds it."""
    if settings.share_results:
        from tasks.result_storage import saved_result_storage

        storage = saved_result_storage(settings)
    else:
        storage = settings.path("prefect-results")
    return _stage_run.with_options(name=stage.task_name, result_storage=storage)
