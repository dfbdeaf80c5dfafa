"""The web console in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, which scripts/test installs) driven over WebDriver with Selenium.

One flow through four people, as the console is meant to be used:
- a publisher signs in, uploads a bundle (the server verifies it as `model push` does) and
  requests approval for an environment that needs one approver;
- an approver sees it in the inbox (the publisher is not offered the approval of their own
  request) and approves it with a comment;
- an operator deploys it; predictions flow and the deployment's chart draws them;
- a viewer sees everything and is offered no action.
Screenshots of each step go to SOPHON_E2E_SCREENSHOTS (default: a temporary directory, printed),
at 1280x800 and on a phone-sized viewport.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import pack

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no chromium and chromium-driver here (scripts/test installs them as root)",
)


def admin_token(node) -> str:
    m = re.search(r"SOPHON_TOKEN=(\S+)", node.stdout_path.read_text())
    assert m, node.logs()
    return m.group(1)


def series_rates(node, token, deployment):
    v = admin_call(node, token, "GET", f"/v1/deployments/{deployment}/series")
    return [p["rate"] for p in v["points"] if p["rate"] is not None]


def admin_call(node, token, method, path, body=None):
    r = requests.request(method, f"{node.admin_base}{path}", json=body, timeout=30,
                         headers={"Authorization": f"Bearer {token}"})
    assert r.ok, f"{method} {path}: {r.status_code} {r.text}"
    return r.json() if r.text else None


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,800", "--disable-extensions"]:
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    where = os.environ.get("SOPHON_E2E_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("console-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots in {path}")
    return path


def wait(d, condition, what, timeout=20):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = condition()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - the page is still changing
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} ({last}); page text:\n{d.find_element('tag name', 'body').text[:3000]}")


def sign_in(d, node, token):
    # A fresh page with nobody signed in: clear the tab's storage, then reload.
    d.get(f"{node.admin_base}/ui/#/overview")
    d.execute_script("sessionStorage.clear()")
    d.refresh()
    field = wait(d, lambda: d.find_element("id", "token"), "the sign-in form")
    field.send_keys(token)
    d.find_element("id", "signin").click()
    wait(d, lambda: d.find_element("id", "signout"), "signed in")


def go(d, node, page, marker):
    d.get(f"{node.admin_base}/ui/#/{page}")
    d.refresh()
    wait(d, lambda: marker in d.find_element("id", "main").text, f"the {page} page")


def buttons(d) -> set[str]:
    # One script, so that the console's re-render (it polls the API) cannot swap the elements
    # between finding them and reading them (selenium's StaleElementReferenceException).
    return set(
        d.execute_script(
            """return [...document.querySelectorAll('main button')]
                 .filter(b => b.getClientRects().length > 0
                              && getComputedStyle(b).visibility !== 'hidden')
                 .map(b => b.innerText.trim());"""
        )
    )


def submit_version(d, button, version, environment):
    """Pick `version` and `environment` in the form whose submit button is `button`, and submit it."""
    from selenium.webdriver.support.ui import Select

    form = d.find_element("id", button).find_element("xpath", "./ancestor::form")
    Select(form.find_element("css selector", "select.version")).select_by_value(version)
    env = form.find_element("css selector", "input.environment")
    env.clear()
    env.send_keys(environment)
    d.find_element("id", button).click()


def test_the_console_serves_its_assets_with_a_strict_policy(node):
    r = requests.get(f"{node.admin_base}/ui/", timeout=10)
    assert r.status_code == 200 and "Sophon console" in r.text
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp, csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    for asset in ["app.js", "app.css"]:
        a = requests.get(f"{node.admin_base}/ui/{asset}", timeout=10)
        assert a.status_code == 200 and a.headers["Content-Security-Policy"] == csp
    # The data is not public: the API still wants a token.
    assert requests.get(f"{node.admin_base}/v1/deployments", timeout=10).status_code == 401
    assert requests.get(f"{node.admin_base}/v1/whoami", timeout=10).status_code == 401


def test_publish_approve_deploy_and_watch_it_in_the_console(node, browser, shots):
    d = browser
    admin = admin_token(node)
    secrets = {}
    for name, role in [("pam", "publisher"), ("ann", "approver"), ("ops", "operator"), ("vic", "viewer")]:
        secrets[name] = admin_call(node, admin, "POST", "/v1/tokens", {"name": name, "role": role})["secret"]
    admin_call(node, admin, "PUT", "/v1/policies/console",
               {"required_approvals": 1, "approver_role": "approver"})
    bundle = pack(node.bin, node.workdir / "publisher.key", node.models["gen_mlp"], "console_mlp",
                  node.workdir / "console_mlp.sbundle")

    # A wrong token is refused at sign-in, with the reason.
    d.get(f"{node.admin_base}/ui/#/overview")
    d.execute_script("sessionStorage.clear()")
    d.refresh()
    wait(d, lambda: d.find_element("id", "token"), "the sign-in form").send_keys("sph_not_a_token")
    d.find_element("id", "signin").click()
    wait(d, lambda: "refused" in d.find_element("id", "signin-error").text, "the refusal")
    d.save_screenshot(str(shots / "01-signin-refused.png"))

    # The publisher uploads the bundle and asks for approval.
    sign_in(d, node, secrets["pam"])
    go(d, node, "shelf", "Upload a bundle")
    d.find_element("id", "bundle").send_keys(str(bundle))
    d.find_element("id", "upload").click()
    wait(d, lambda: "console_mlp" in d.find_element("id", "main").text, "the uploaded version on the shelf")
    d.save_screenshot(str(shots / "02-shelf-uploaded.png"))
    # Curation from the shelf: a tag on the new version.
    row = next(r for r in d.find_elements("css selector", "main tr") if r.text.startswith("console_mlp"))
    row.find_element("css selector", "input.tag").send_keys("candidate")
    next(b for b in row.find_elements("css selector", "button") if b.text == "Tag").click()
    wait(d, lambda: "candidate" in next(r for r in d.find_elements("css selector", "main tr")
                                        if r.text.startswith("console_mlp")).text, "the tag")
    go(d, node, "approvals", "Request approval")
    submit_version(d, "request-approval", "console_mlp@1", "console")
    wait(d, lambda: "console_mlp@1" in d.find_element("id", "main").text, "the open request")
    assert "Approve" not in buttons(d), "a publisher is not offered approvals"
    assert "Withdraw" in buttons(d), "the submitter may withdraw"
    d.save_screenshot(str(shots / "03-approval-requested.png"))

    # The approver approves it from the inbox.
    sign_in(d, node, secrets["ann"])
    go(d, node, "approvals", "console_mlp@1")
    d.find_element("css selector", "input.comment").send_keys("eval ok")
    approve = next(b for b in d.find_elements("css selector", "main button") if b.text == "Approve")
    approve.click()
    wait(d, lambda: "approved" in d.find_element("id", "main").text and "ann: approved (eval ok)" in d.find_element("id", "main").text,
         "the approval")
    d.save_screenshot(str(shots / "04-approved.png"))

    # The operator deploys it, and the chart draws live predictions.
    sign_in(d, node, secrets["ops"])
    go(d, node, "deployments", "Deploy")
    submit_version(d, "deploy", "console_mlp@1", "console")
    row = wait(d, lambda: next(r for r in d.find_elements("css selector", "main tr")
                               if "console_mlp@1" in r.text and r.find_elements("css selector", "a")),
               "the new deployment")
    deployment = row.find_element("css selector", "a").text
    d.save_screenshot(str(shots / "05-deployed.png"))
    stop = threading.Event()

    def traffic():
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.1] * 16}]}
        while not stop.is_set():
            try:
                requests.post(f"{node.base}/v2/models/console_mlp/infer", json=body, timeout=10)
            except requests.RequestException:
                pass
            time.sleep(0.01)

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        d.get(f"{node.admin_base}/ui/#/deployments/{deployment}")
        d.refresh()
        wait(d, lambda: d.find_element("id", "deployment-title").text
             == f"Deployment {deployment}: console_mlp@1 in console", "the deployment's title")
        wait(d, lambda: "ready" in d.find_element("id", "main").text.split("Replicas", 1)[1], "a ready replica")
        assert {"Rolling update", "Canary", "Roll back"} <= buttons(d), buttons(d)
        wait(d, lambda: float(d.find_element("css selector", "#card-deployment-rate .value").text) > 0,
             "a request rate from the nodes' reports", timeout=40)
        # The leader samples every 5 s: two samples with traffic draw a line.
        wait(d, lambda: int(d.find_element("css selector", "canvas.chart").get_attribute("data-points")) >= 2,
             "the chart's points", timeout=40)
        wait(d, lambda: any(json_rate > 0 for json_rate in series_rates(node, admin, deployment)),
             "a sample with traffic in the leader's series", timeout=40)
        d.refresh()
        wait(d, lambda: d.find_element("css selector", "canvas.chart"), "the charts")
        time.sleep(0.5)
        drawn = d.execute_script(
            "const c = document.querySelector('canvas.chart');"
            "const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let blue = 0; for (let i = 0; i < px.length; i += 4)"
            "  if (px[i] < 90 && px[i+1] > 90 && px[i+1] < 140 && px[i+2] > 200) blue++;"
            "return blue;")
        assert drawn > 50, f"the rate line is not drawn ({drawn} pixels)"
        d.save_screenshot(str(shots / "06-deployment-live.png"))
        d.set_window_size(390, 844)
        d.refresh()
        wait(d, lambda: d.find_element("css selector", "canvas.chart"), "the phone layout")
        width = d.execute_script("return document.documentElement.scrollWidth")
        assert width <= 400, f"the page is {width} px wide on a 390 px screen"
        d.save_screenshot(str(shots / "07-deployment-phone.png"))
        d.set_window_size(1280, 800)
    finally:
        stop.set()
        t.join(5)

    # A viewer sees the cluster and is offered nothing to do.
    sign_in(d, node, secrets["vic"])
    for page, marker in [("overview", "Coordinators"), ("nodes", "dev"), ("shelf", "console_mlp"),
                         ("approvals", "console_mlp@1"), ("deployments", "console_mlp"), ("audit", "decide")]:
        go(d, node, page, marker)
        assert buttons(d) == set(), f"{page}: a viewer was offered {buttons(d)}"
        assert not d.find_elements("css selector", "main form"), f"{page}: a viewer was offered a form"
    d.save_screenshot(str(shots / "08-viewer-audit.png"))
    d.get(f"{node.admin_base}/ui/#/deployments/{deployment}")
    d.refresh()
    wait(d, lambda: d.find_element("id", "deployment-title"), "the deployment page")
    assert buttons(d) == set(), f"a viewer was offered {buttons(d)} on the deployment page"
    # And the API refuses a viewer's action anyway.
    r = requests.post(f"{node.admin_base}/v1/deployments/{deployment}/scale", json={"replicas": 2}, timeout=10,
                      headers={"Authorization": f"Bearer {secrets['vic']}"})
    assert r.status_code == 403, r.text
