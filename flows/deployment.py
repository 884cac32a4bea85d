"""Deployments of the pair and prepare flows on a Prefect work pool, entered by module path."""

from __future__ import annotations

import contextlib
from uuid import UUID

from flows.batch import compress_model, prepare_model


def ensure_pool(pool: str) -> None:
    """Create the work pool (process type) unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another process made it meanwhile
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))


def deploy_by_module_path(flows: list, pool: str, image: str | None = None, **options) -> list[UUID]:
    """Deployments of `flows` on `pool`, entered by module path: workers run the installed package (or image)."""
    from prefect.deployments.runner import EntrypointType, deploy

    ensure_pool(pool)
    deployments = [
        flow.to_deployment(work_pool_name=pool, entrypoint_type=EntrypointType.MODULE_PATH, **options) for flow in flows
    ]
    return deploy(
        *deployments,
        work_pool_name=pool,
        image=image,
        build=False,
        push=False,
        print_next_steps_message=False,
        ignore_warnings=True,
    )


def deploy_model_flow(pool: str, image: str | None = None) -> UUID:
    """The pair and prepare flows on `pool`, each deployment named after the pool."""
    return deploy_by_module_path([compress_model, prepare_model], pool, image, name=pool)[0]
