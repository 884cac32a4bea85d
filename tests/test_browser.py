"""What users review after a batch, in a real browser: `secateur stack up --postgres` (the session's
`postgres_stack`), a tiny batch run against it with `secateur run`, then headless Chromium
on the stack's MLflow UI (the batch's experiment, its parent run with the pair runs nested under it, a pair's plot,
the registered model with `champion` on the version that ships) and Prefect UI (the batch's flow run in the runs
list and on its own page).

A screenshot of every page checked (also of one that failed a check) is saved under `SECATEUR_SCREENSHOTS`, by
default `.secateur-test-artifacts/browser/` of the checkout. Needs Debian's Chromium at /usr/bin/chromium
(`apt-get install chromium`); no browser is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import batch_mapping, build_tiny_tokenizer, save_tiny

# A stack, a batch and two UIs in a browser: 1.5 minutes on 2 idle cores, 2.5 on busy ones (make test-long).
pytestmark = [pytest.mark.slow, pytest.mark.long]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# Headless and quiet: without the background-networking flags Chromium keeps calling Google's services.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 60_000  # a first load of either UI takes 10 s and more on 2 busy cores
BATCH = "browser-review"
MODEL = "browser-tiny"  # the source model's folder: its slug names the registered model
RECIPES = [
    {"name": "mag30", "method": "magnitude", "sparsity": 0.3},
    {"name": "w50", "method": "wanda", "sparsity": 0.5},
]


def screenshots_dir() -> Path:
    folder = Path(os.environ.get("SECATEUR_SCREENSHOTS") or ROOT / ".secateur-test-artifacts" / "browser")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _secateur(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, dict, str]:
    """`python -m flows.cli ARGV`: its exit code, its last stdout line as JSON ({} if none) and its output."""
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    lines = done.stdout.strip().splitlines()
    try:
        last = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        last = {}
    return done.returncode, last, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def reviewed_batch(postgres_stack, tmp_path_factory):
    """The batch run on the session's PostgreSQL stack, and the names to look for (from the batch's JSON and
    MLflow); the stack's own teardown checks that `stack down` leaves no process."""
    tmp = tmp_path_factory.mktemp("browser")
    model = str(save_tiny(tmp / MODEL, build_tiny_tokenizer()))
    mapping = batch_mapping([model], RECIPES, name=BATCH)
    mapping["evaluation"]["generation_tokens"] = 0
    mapping["selection"] = {"max_ppl_increase": 10.0}  # every variant is within budget: the sparsest ships
    batch = tmp / "batch.yaml"
    batch.write_text(yaml.safe_dump(mapping))
    clients = postgres_stack["urls"]["env"]
    # A folder store: clients track into the MLflow server's database (the server refuses local sources)
    assert clients["MLFLOW_TRACKING_URI"].startswith("postgresql+psycopg2://"), clients
    code, summary, output = _secateur(["run", str(batch), "--json"], postgres_stack["env"] | clients, tmp, 600)
    assert code == 0 and [r["status"] for r in summary["results"]] == ["completed", "completed"], output
    return {
        "prefect": postgres_stack["urls"]["prefect"],
        "mlflow": postgres_stack["urls"]["mlflow"],
        "summary": summary,
        **_mlflow_names(clients["MLFLOW_TRACKING_URI"], summary, model),
    }


def _mlflow_names(tracking_uri: str, summary: dict, model: str) -> dict:
    """What the UIs must show, as MLflow has it: the experiment, the batch's parent run, its pair runs, the
    registered model and the version `champion` names."""
    from mlflow.tracking import MlflowClient

    from tasks.registration import registered_name

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(BATCH)
    assert experiment is not None, f"no MLflow experiment {BATCH!r} at {tracking_uri}"
    [parent] = client.search_runs([experiment.experiment_id], f"tags.prefect_flow_run_id = '{summary['flow_run_id']}'")
    pairs = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.params["recipe_name"] for r in pairs) == sorted(r["name"] for r in RECIPES)
    name = registered_name(model)
    champion = client.get_model_version_by_alias(name, "champion")
    [shipped] = [r for r in pairs if r.info.run_id == champion.run_id]
    plot = "block_errors.png"
    assert plot in {a.path for a in client.list_artifacts(shipped.info.run_id)}
    from PIL import Image

    with Image.open(client.download_artifacts(shipped.info.run_id, plot)) as image:
        plot_width = image.width
    return {
        "experiment_id": experiment.experiment_id,
        "experiment": experiment.name,
        "parent_run": parent.info.run_name,
        "pair_runs": sorted(r.info.run_name for r in pairs),
        "registered_model": name,
        "champion_version": str(champion.version),
        "shipped_run_id": shipped.info.run_id,
        "shipped_run": shipped.info.run_name,
        "plot": plot,
        "plot_width": plot_width,
    }


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    print(f"\nscreenshots: {screenshots_dir()}")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = chromium.new_context(viewport={"width": 1600, "height": 1000})
        context.set_default_timeout(WAIT_MS)
        yield context
        context.close()
        chromium.close()


@contextlib.contextmanager
def checked_page(context, name: str):
    """A page for one check, photographed when the check ends (also when it fails: the shot shows what was there)."""
    page = context.new_page()
    path = screenshots_dir() / f"{name}.png"
    try:
        yield page
    except BaseException:
        with contextlib.suppress(Exception):
            page.screenshot(path=path, full_page=True)
        print(f"screenshot of the failed check: {path}")
        raise
    else:
        page.screenshot(path=path, full_page=True)
    finally:
        page.close()


def _visible_text(page, text: str):
    return page.get_by_text(text, exact=True).filter(visible=True).first


def _close_mlflow_assistant(page) -> None:
    """MLflow 3's assistant panel covers a quarter of the page; closed once, it stays closed in this context."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count() == 1 and close.is_visible():
        close.click()


def test_mlflow_ui_shows_the_experiment_nested_runs_a_plot_and_the_champion(reviewed_batch, browser):
    from playwright.sync_api import expect

    batch, mlflow = reviewed_batch, reviewed_batch["mlflow"]
    experiment = f"{mlflow}/#/experiments/{batch['experiment_id']}"

    # The batch's experiment: its parent run, and the pair runs nested under it (shown once it is expanded).
    with checked_page(browser, "mlflow-experiment-runs") as page:
        page.goto(f"{experiment}/runs")
        expect(_visible_text(page, batch["experiment"])).to_be_visible()
        _close_mlflow_assistant(page)
        parent = page.get_by_role("row").filter(has=page.get_by_text(batch["parent_run"], exact=True))
        expect(parent).to_be_visible()
        for name in batch["pair_runs"]:
            expect(page.get_by_text(name, exact=True)).to_have_count(0)  # nested: not top-level rows
        parent.locator("[col-id*='Run Name'] button").first.click()  # the parent's expand toggle
        for name in batch["pair_runs"]:
            expect(_visible_text(page, name)).to_be_visible()

    # A plot among the shipped pair's artifacts, opened: the image shown is the PNG the batch logged.
    with checked_page(browser, "mlflow-run-artifacts") as page:
        page.goto(f"{experiment}/runs/{batch['shipped_run_id']}/artifacts")
        expect(_visible_text(page, batch["shipped_run"])).to_be_visible()
        _visible_text(page, batch["plot"]).click()
        page.wait_for_function(
            "width => [...document.images].some(i => i.complete && i.naturalWidth === width)",
            arg=batch["plot_width"],
            timeout=WAIT_MS,
        )

    # The registered model, `champion` on the version that ships.
    with checked_page(browser, "mlflow-registered-model") as page:
        page.goto(f"{mlflow}/#/models/{batch['registered_model']}")
        expect(_visible_text(page, batch["registered_model"])).to_be_visible()
        version = page.get_by_role("link", name=f"Version {batch['champion_version']}", exact=True)
        row = page.get_by_role("row").filter(has=version)
        expect(row.get_by_text(re.compile(r"^@\s*champion$"))).to_be_visible()


def test_prefect_ui_shows_the_batch_flow_run(reviewed_batch, browser):
    from playwright.sync_api import expect

    batch, prefect = reviewed_batch, reviewed_batch["prefect"]
    run_id, name = batch["summary"]["flow_run_id"], batch["summary"]["flow_run_name"]
    # The UI calls the API its server tells it to: the stack's own, whatever port the stack runs on.
    api = httpx.get(f"{prefect}/ui-settings", timeout=10).json()["api_url"]
    assert api == f"{prefect}/api", f"the stack's Prefect UI talks to {api}, not to its own server {prefect}/api"

    with checked_page(browser, "prefect-flow-runs") as page:
        page.goto(f"{prefect}/runs")
        link = page.get_by_role("link", name=name, exact=True)
        expect(link).to_be_visible()
        expect(link).to_have_attribute("href", re.compile(f"/runs/flow-run/{run_id}$"))

    with checked_page(browser, "prefect-flow-run") as page:
        page.goto(f"{prefect}/runs/flow-run/{run_id}")
        expect(_visible_text(page, name)).to_be_visible()
        expect(_visible_text(page, "Completed")).to_be_visible()  # its state badge
        expect(page.get_by_role("link", name="compress-batch", exact=True)).to_be_visible()  # its flow
        # Its logs say what ships.
        ships = f"ships as registered model {batch['registered_model']} version {batch['champion_version']} (champion)"
        expect(page.get_by_text(ships).filter(visible=True).first).to_be_visible()
        page.wait_for_load_state("networkidle")  # the run graph is drawn from the task runs it fetches last
