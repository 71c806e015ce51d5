"""The live panel in a real browser: JupyterLab in headless Chromium runs a ``%%peft_train run --background`` cell on
a tiny model, and the page's DOM shows the progress bar advancing, the loss chart drawn, Stop stopping the run, and
the finished run shown once (the panel gives way to the static summary).

Needs JupyterLab and Playwright for Python (``scripts/setup_extra.sh``, run by ``scripts/setup.sh --test``) and
Debian's ``chromium``: Playwright drives /usr/bin/chromium through ``executable_path`` (browser downloads are
impossible here, so never ``playwright install``). Screenshots go to ``tests/artifacts/`` (ignored by git); with
``PEFT_MAGIC_SCREENSHOT=1`` the panel's screenshot also replaces ``docs/img/panel.png``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]  # fmt: skip
STEPS = 2000  # far more than the test lets it run: Stop must end it whatever the machine's speed

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install chromium; scripts/setup_extra.sh does it)",
                allow_module_level=True)  # fmt: skip

CELLS = [
    # 1: the extension, and data in the notebook's namespace
    (
        "%load_ext peft_magic\n"
        "import torch\n"
        "torch.set_num_threads(1)  # leave a core to the browser\n"
        'rows = [{"text": "the cat sat on the mat " * (1 + i % 3)} for i in range(64)]'
    ),
    # 2: the cell under test
    (
        "%%peft_train run --background\n"
        "model: tiny-llama\n"
        "method: {name: lora, r: 4}\n"
        "data: {train: $rows, eval: 0.1}\n"
        f"train: {{max_steps: {STEPS}, logging_steps: 2, eval_steps: 40, learning_rate: 0.005, "
        "per_device_train_batch_size: 4}"
    ),
    # 3: run after Stop: what the Run itself says
    'run.wait()\nprint("status:", run.status, run.state.stop_reason, run.state.step)',
    # 4: the form
    "%peft_model tiny-llama\n%peft_ui tuned",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_notebook(path: Path) -> None:
    cells = [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": src}
             for src in CELLS]  # fmt: skip
    kernelspec = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    path.write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": kernelspec}, "nbformat": 4,
                                "nbformat_minor": 5}))  # fmt: skip


FRONTENDS = {  # front end -> (server module, its app class for settings, the notebook's URL path)
    "jupyterlab": ("jupyterlab", "LabApp", "lab/tree/panel.ipynb"),
    "notebook7": ("notebook", "JupyterNotebookApp", "notebooks/panel.ipynb"),
}


@pytest.fixture(params=list(FRONTENDS))
def lab(request, tmp_path, tiny_llama):
    """A JupyterLab or Notebook 7 server on 127.0.0.1 (free port, no token, tmp root holding the notebook and the
    tiny model), isolated from the user's Jupyter/IPython settings. Yields the notebook's URL."""
    module, app, url_path = FRONTENDS[request.param]
    pytest.importorskip(module)
    root, home = tmp_path / "root", tmp_path / "home"
    root.mkdir()
    shutil.copytree(tiny_llama, root / "tiny-llama")
    write_notebook(root / "panel.ipynb")
    # No news / update pop-ups over the page (they would also sit in the screenshots).
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    port = free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "IPYTHONDIR": str(home / "ipython"), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(home / "hf-datasets"),
           # a venv over system packages: the widgets' lab extension sits in the base prefix, which jupyter's own
           # search path (the venv's prefix, user and system folders) leaves out
           "JUPYTER_PATH": os.pathsep.join(filter(None, [os.path.join(sys.base_prefix, "share", "jupyter"),
                                                         os.environ.get("JUPYTER_PATH")]))}  # fmt: skip
    cmd = [sys.executable, "-m", module, "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", "--IdentityProvider.token=", "--ServerApp.password=",
           f"--ServerApp.root_dir={root}", f"--{app}.user_settings_dir={home / 'settings'}",
           f"--{app}.workspaces_dir={home / 'workspaces'}", "--allow-root"]  # fmt: skip
    log = open(tmp_path / "jupyterlab.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(
                    f"{module} exited ({server.returncode}):\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}"
                )
            try:
                urllib.request.urlopen(f"{base}/api/status", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{module} did not answer within 60 s")
                time.sleep(0.3)
        yield f"{base}/{url_path}"
    finally:
        # The server and the kernel it started share this process group: end both.
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


@pytest.fixture
def page(lab):
    from playwright.sync_api import sync_playwright  # scripts/setup_extra.sh installs it

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(lab)
            yield page
        finally:
            browser.close()


def run_cell(page, index: int) -> None:
    """Select cell `index` in command mode and run it (Shift+Enter), as a user would."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.locator(".jp-InputPrompt").click()
    page.keyboard.press("Escape")
    page.keyboard.press("Shift+Enter")


def steps_done(panel) -> int:
    match = re.search(rf"(\d+)/{STEPS} steps", panel.inner_text())
    return int(match.group(1)) if match else -1


def wait_for_idle_kernel(page) -> None:
    """The notebook's kernel has started and is idle (asked of the server, the same in every front end)."""
    base = re.match(r"https?://[^/]+", page.url).group(0)
    deadline, last = time.monotonic() + 90, "no answer"
    while time.monotonic() < deadline:
        try:
            kernels = json.load(urllib.request.urlopen(f"{base}/api/kernels", timeout=5))
        except OSError as err:  # HTTPError 500 included: Notebook 7's server answered one while the kernel started
            last, kernels = repr(err), None
        if kernels and all(k["execution_state"] == "idle" for k in kernels):
            return
        if kernels is not None:
            last = f"kernels: {kernels}"
        time.sleep(0.5)
    pytest.fail(f"the notebook's kernel did not become idle within 90 s (last: {last})")


def test_live_panel_in_the_browser(page):
    """In JupyterLab and in Notebook 7 (the same DOM classes: Notebook 7 is built from JupyterLab's parts)."""
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")  # screenshots are test output, never committed from here
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    wait_for_idle_kernel(page)
    time.sleep(1)  # the page connects to the idle kernel
    run_cell(page, 0)
    run_cell(page, 1)
    cell = page.locator(".jp-Notebook .jp-Cell").nth(1)
    panel = cell.locator(".jp-OutputArea-output .widget-vbox").first
    progress = cell.locator(".widget-hprogress .progress-bar").first
    progress.wait_for(state="attached", timeout=60_000)

    # The progress bar advances: its width (the bar) and the step count (the label) grow between two reads.
    page.wait_for_function("""el => parseFloat(el.style.width) > 0""", arg=progress.element_handle(), timeout=60_000)
    width, step = float(progress.evaluate("el => parseFloat(el.style.width)")), steps_done(panel)
    page.wait_for_function("""([el, w]) => parseFloat(el.style.width) > w""", arg=[progress.element_handle(), width],
                           timeout=60_000)  # fmt: skip
    assert float(progress.evaluate("el => parseFloat(el.style.width)")) > width
    # the label is another widget's update: it may arrive a moment after the bar's width
    deadline = time.monotonic() + 30
    while steps_done(panel) <= step and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert steps_done(panel) > step > 0

    # The loss chart: an SVG with the logged losses drawn in it, and the eval points once evaluations ran.
    cell.locator("svg.peft-loss-chart .train-raw").first.wait_for(state="attached", timeout=30_000)
    cell.locator("svg.peft-loss-chart .eval-point").nth(1).wait_for(state="attached", timeout=30_000)
    shot = ARTIFACTS / "panel.png"
    panel.screenshot(path=str(shot))
    if os.environ.get("PEFT_MAGIC_SCREENSHOT") == "1":
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "img" / "panel.png")

    # Stop: the run ends after its current step, and both the cell and the Run say so.
    cell.get_by_role("button", name="Stop").click()
    check_result_shown_once(cell)
    status = cell.locator(".peft-magic-summary .peft-end")
    stopped_at = int(re.search(rf"stopped at step (\d+)/{STEPS}", status.inner_text()).group(1))
    assert 0 < stopped_at < STEPS
    run_cell(page, 2)
    after = page.locator(".jp-Notebook .jp-Cell").nth(2).get_by_text(re.compile(r"status: stopped stopped \d+"))
    after.wait_for(timeout=30_000)
    assert int(after.inner_text().split()[-1]) == stopped_at
    page.screenshot(path=str(ARTIFACTS / "notebook_after_stop.png"), full_page=True)
    check_form(page)


def check_result_shown_once(cell) -> None:
    """One copy of the result: the live panel gave way to the static summary in the same output (one curve, one
    set of figures), and the libraries' messages, if any, sit collapsed inside it."""
    cell.locator(".peft-magic-summary").wait_for(timeout=30_000)
    page_text = cell.locator(".jp-OutputArea").first
    assert cell.locator(".peft-magic-summary").count() == 1
    assert cell.locator(".jp-OutputArea-output .widget-vbox").count() == 0  # the panel is gone
    assert cell.locator("svg.peft-loss-chart").count() == 0 and cell.locator("img.peft-curve").count() == 1
    assert page_text.inner_text().count("stopped at step") == 1
    assert cell.locator("details.peft-details[open]").count() == 0  # collapsed when present
    assert "Warning" not in cell.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")\
        .all_inner_texts().__str__()  # fmt: skip


def check_form(page) -> None:
    """`%peft_ui`: tabs in order, help as the tooltip, a bad value refused inline, and Copy as cell."""
    run_cell(page, 3)
    cell = page.locator(".jp-Notebook .jp-Cell").nth(3)
    tabs = cell.locator(".lm-TabBar-tab")
    tabs.first.wait_for(timeout=30_000)
    assert [t.strip() for t in tabs.all_inner_texts()] == ["Model", "Method", "Data", "Training", "DPO", "ORPO",
                                                          "GRPO", "Export"]  # fmt: skip
    cell.locator(".lm-TabBar-tab", has_text="Data").click()
    # The notebook's rows are offered by name (the label says what they are).
    cell.locator("select:visible").first.select_option(label="$rows · list of 64 dicts", timeout=10_000)
    cell.locator(".lm-TabBar-tab", has_text="Training").click()
    help_text = "Optimizer steps to run; -1 means use num_train_epochs."
    max_steps = cell.locator(f'[title="{help_text}"]').first  # ipywidgets puts the tooltip in `title`
    max_steps.wait_for(timeout=10_000)
    box = max_steps.locator("input").first if max_steps.locator("input").count() else max_steps
    box.fill("0")
    box.press("Enter")
    cell.get_by_text("train.max_steps: must be a positive number of steps").wait_for(timeout=10_000)
    box.fill("20")
    box.press("Enter")
    # The pre-flight line is computed in a thread after the last change and pushed to the page.
    cell.get_by_text(re.compile(r"pre-flight: [\d.]+k trainable .* fits")).wait_for(timeout=30_000)
    cell.locator(".lm-TabBar-tab", has_text="Method").click()
    form = cell.locator(".jp-OutputArea-output").last
    form.screenshot(path=str(ARTIFACTS / "form.png"))
    if os.environ.get("PEFT_MAGIC_SCREENSHOT") == "1":
        shutil.copyfile(ARTIFACTS / "form.png", REPO / "docs" / "img" / "form.png")
    cell.get_by_role("button", name="Copy as cell").click()
    area = cell.locator("textarea").last
    page.wait_for_function("el => el.value.startsWith('%%peft_train tuned')", arg=area.element_handle())
    assert "train: $rows" in area.input_value() and "max_steps: 20" in area.input_value()
