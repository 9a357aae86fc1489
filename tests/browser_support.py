"""Driving the real app in a real browser: a Streamlit server in a subprocess, Debian's Chromium
through Playwright, and helpers that wait for Streamlit to finish a run.

Used by tests/test_browser.py (the browser test) and by its screenshot mode:

    python tests/test_browser.py --screenshots docs/img     # PNGs of every view, real runs

Nothing here downloads a browser: Playwright (PyPI) drives /usr/bin/chromium (`apt-get install
chromium`); `playwright install` is never needed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("POOLPROP_CHROMIUM", "/usr/bin/chromium")
# Without the networking flags Chromium tries to reach Google's services, and on a closed network
# its connections are refused; headless + no sandbox for root in a container.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1400, "height": 900}

# Streamlit derives a page's URL path from its file name: pages/2_Loss_curves.py -> /Loss_curves
PAGES = {
    "home": "",
    "lesson": "Lesson",
    "train": "Train",
    "loss_curves": "Loss_curves",
    "memory": "Memory",
    "fidelity": "Gradient_fidelity",
    "filters": "Filters_and_features",
    "attributions": "Attributions",
}
TITLES = {"home": "PoolProp", "lesson": "Lesson", "train": "Train", "loss_curves": "Loss curves", "memory": "Memory",
          "fidelity": "Gradient fidelity", "filters": "Filters & features", "attributions": "Attributions"}


def missing_requirements() -> str | None:
    """Why the browser test cannot run here (None when it can)."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not found (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright (PyPI) is not installed"
    if shutil.which("streamlit") is None and not (Path(sys.executable).parent / "streamlit").exists():
        return "streamlit is not installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# =======================================================================================
# The server
# =======================================================================================

@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    started: float  # time.monotonic() when the process was started
    healthy: float  # ... when /_stcore/health first answered "ok"
    timings: dict = field(default_factory=dict)

    def log_tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-n:]
        return ""


def _health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
            return r.status == 200 and r.read().strip() == b"ok"
    except OSError:
        return False


@contextlib.contextmanager
def streamlit_server(env: dict | None = None, log_dir: Path | None = None, timeout: float = 120.0,
                     cwd: str | os.PathLike | None = None):
    """`streamlit run app.py` on a free port with `env` added; yields a Server once healthy.
    The whole process group is killed on exit. `cwd`: another folder to run in (with a copy of
    .streamlit/config.toml), e.g. one without .data/, as on a fresh clone."""
    if cwd is not None:
        (Path(cwd) / ".streamlit").mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / ".streamlit" / "config.toml", Path(cwd) / ".streamlit" / "config.toml")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(log_dir or ROOT / ".pytest_cache") / f"streamlit-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    with open(log, "wb") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = t0 + timeout
        while not _health_ok(url):
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {proc.returncode}:\n"
                                   f"{log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"streamlit not healthy after {timeout:.0f} s:\n"
                                   f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield Server(url, proc, log, t0, time.monotonic())
    finally:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# =======================================================================================
# The browser
# =======================================================================================

@contextlib.contextmanager
def chromium_page(viewport: dict | None = None):
    """A Playwright page in headless Debian Chromium; closed (browser included) on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport=viewport or VIEWPORT, device_scale_factor=1)
            page = context.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def script_state(page) -> str:
    """Streamlit's own run state, from the app root: 'initial', 'running', 'notRunning', ..."""
    try:
        return page.evaluate("() => document.querySelector('[data-testid=stApp]')"
                             "?.getAttribute('data-test-script-state') ?? 'none'")
    except Exception:  # noqa: BLE001 - the page may be navigating
        return "none"


def busy(page) -> bool:
    """True while the script (or a fragment) runs, a spinner turns or the running indicator shows."""
    if script_state(page) in ("running", "initial", "none", "rerunRequested"):
        return True
    return page.evaluate("""() => {
        const vis = el => !!(el && (el.offsetWidth || el.offsetHeight || el.getClientRects().length));
        const q = s => Array.from(document.querySelectorAll(s));
        return q('[data-testid=stSpinner]').some(vis) || q('[data-testid=stStatusWidgetRunningIcon]').some(vis)
            || q('[data-testid=stStatusWidgetRunningManIcon]').some(vis)
            || q('[data-testid=stSkeleton]').some(vis);
    }""")


def wait_idle(page, timeout: float = 120.0, settle: float = 0.6, poll: float = 0.1) -> float:
    """Wait until Streamlit has finished running and nothing spins for `settle` seconds;
    returns the seconds waited. Raises TimeoutError (with what is on screen) after `timeout`."""
    t0 = time.monotonic()
    quiet_since = None
    while True:
        now = time.monotonic()
        if busy(page):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= settle:
            return quiet_since - t0
        if now - t0 > timeout:
            raise TimeoutError(f"the app was still running after {timeout:.0f} s "
                               f"(script state {script_state(page)!r}); errors: {problems(page)}")
        time.sleep(poll)


def problems(page) -> list[str]:
    """Texts of every Streamlit exception box and error message on screen."""
    found = []
    for sel in ('[data-testid="stException"]', '[data-testid="stAlertContentError"]'):
        for el in page.query_selector_all(sel):
            with contextlib.suppress(Exception):
                found.append(" ".join(el.inner_text().split())[:600])
    return found


def warnings(page) -> list[str]:
    """Texts of the warning messages on screen (not failures: e.g. a run's data missing here)."""
    return [" ".join(el.inner_text().split())[:300]
            for el in page.query_selector_all('[data-testid="stAlertContentWarning"]')]


def open_url(page, url: str, timeout: float = 180.0) -> float:
    """Load `url` and wait until the app has rendered; seconds taken."""
    t0 = time.monotonic()
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout * 1000)
    page.wait_for_selector('h1', timeout=timeout * 1000)
    wait_idle(page, timeout)
    return time.monotonic() - t0


def go_to(page, name: str, timeout: float = 180.0) -> float:
    """Switch page by clicking its sidebar link (same session, as a user would); seconds until
    the new page has rendered (title shown and the script done)."""
    slug = PAGES[name]
    link = page.locator('[data-testid="stSidebarNav"] a').filter(
        has=page.locator(f'xpath=self::*[substring(@href, string-length(@href) - {len(slug)}) = "/{slug}"]'))
    t0 = time.monotonic()
    if link.count():
        link.first.click()
    else:
        page.goto(page.url.split("/")[0] + "//" + page.url.split("/")[2] + "/" + slug)
    page.wait_for_function("t => Array.from(document.querySelectorAll('h1')).some(h => h.innerText.trim() === t)",
                           arg=TITLES[name], timeout=timeout * 1000)
    wait_idle(page, timeout)
    return time.monotonic() - t0


def click_button(page, label: str, timeout: float = 240.0) -> float:
    """Click the (first visible) button with this label in the main area and wait for the run."""
    t0 = time.monotonic()
    page.locator('[data-testid="stMain"] button').filter(has_text=label).first.click()
    time.sleep(0.3)
    wait_idle(page, timeout)
    return time.monotonic() - t0


def charts_drawn(page) -> int:
    """Number of plotly figures whose plot has drawn."""
    return page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot'))
        .filter(p => p.querySelector('.main-svg') && p.getBoundingClientRect().height > 50).length""")


def text_overlaps(page, tolerance: float = 2.0) -> list[str]:
    """Pairs of texts that print over each other inside a figure, as 'A | B' strings. Plotly draws
    each label, title, tick and legend entry as an SVG <text>; each is taken as the quadrilateral
    it covers on screen (its box, shrunk by `tolerance` px a side, through its transform, so that
    tilted tick labels count by their glyphs, not by their upright bounding boxes), and two that
    intersect (separating-axis test) are a collision that a projector makes unreadable."""
    return page.evaluate("""tol => {
        const quad = t => {
            const b = t.getBBox(), m = t.getScreenCTM();
            if (!m || b.width <= 2 * tol || b.height <= 2 * tol) return null;
            const pts = [[b.x + tol, b.y + tol], [b.x + b.width - tol, b.y + tol],
                         [b.x + b.width - tol, b.y + b.height - tol], [b.x + tol, b.y + b.height - tol]];
            return pts.map(([x, y]) => [m.a * x + m.c * y + m.e, m.b * x + m.d * y + m.f]);
        };
        const apart = (p, q) => {
            for (const poly of [p, q]) {
                for (let i = 0; i < 4; i++) {
                    const [x1, y1] = poly[i], [x2, y2] = poly[(i + 1) % 4];
                    const ax = y1 - y2, ay = x2 - x1;
                    const proj = r => r.map(([x, y]) => x * ax + y * ay);
                    const a = proj(p), c = proj(q);
                    if (Math.max(...a) <= Math.min(...c) || Math.max(...c) <= Math.min(...a)) return true;
                }
            }
            return false;
        };
        const out = [];
        for (const plot of document.querySelectorAll('.js-plotly-plot')) {
            const items = Array.from(plot.querySelectorAll('svg text'))
                .filter(t => t.textContent.trim() && !t.closest('.hoverlayer') && !t.closest('.modebar')
                        && getComputedStyle(t).display !== 'none' && getComputedStyle(t).visibility !== 'hidden'
                        && getComputedStyle(t).opacity !== '0')
                .map(t => ({text: t.textContent.trim(), q: quad(t)})).filter(i => i.q);
            for (let i = 0; i < items.length; i++) {
                for (let j = i + 1; j < items.length; j++) {
                    if (!apart(items[i].q, items[j].q)) out.push(items[i].text + ' | ' + items[j].text);
                }
            }
        }
        return out;
    }""", tolerance)


def wrapped_labels(page) -> list[str]:
    """Widget labels in the main area that take more than one line: their field then sits lower
    than its neighbours' in the row (a projector's 1024 px squeezed 'Image folder (for …)')."""
    return page.evaluate("""() => Array.from(
            document.querySelectorAll('[data-testid=stMain] [data-testid=stWidgetLabel]'))
        .map(label => label.querySelector('p') || label)
        .filter(p => {
            const style = getComputedStyle(p);
            const line = parseFloat(style.lineHeight) || 1.5 * parseFloat(style.fontSize);
            return p.getBoundingClientRect().height > 1.5 * line;
        })
        .map(p => p.textContent.trim())""")


def radio_rows(radio) -> int:
    """How many lines a radio's options take on screen (`radio`: a locator of the widget)."""
    tops = radio.locator("[role=radiogroup] label").evaluate_all(
        "els => els.map(e => Math.round(e.getBoundingClientRect().top))")
    return len({t // 8 for t in tops})


def image_widths(page) -> list[float]:
    """On-screen widths (px) of the pictures plotly draws (go.Image layers), in page order."""
    return page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot image'))
        .map(i => i.getBoundingClientRect().width).filter(w => w > 0)""")


def set_selection(page, names: list[str], timeout: float = 120.0) -> None:
    """Make the sidebar's run picker hold exactly `names` (display names), as a user would: remove
    the chips not wanted, then type each missing name and press Enter."""
    picker = page.locator(".st-key-_run_picker")
    for _ in range(12):
        chips = picker.locator("[data-tag-index]")
        current = [c.get_attribute("aria-label") for c in chips.all()]
        extra = [n for n in current if n not in names]
        if not extra:
            break
        picker.get_by_role("button", name=f"Remove {extra[0]}").click()
        time.sleep(0.3)
        wait_idle(page, timeout)
    for n in names:
        current = [c.get_attribute("aria-label") for c in picker.locator("[data-tag-index]").all()]
        if n in current:
            continue
        box = picker.locator("input")
        box.click()
        box.fill(n)
        time.sleep(0.3)
        page.get_by_role("option", name=n, exact=True).first.click()
        time.sleep(0.3)
        wait_idle(page, timeout)
    page.keyboard.press("Escape")
    wait_idle(page, timeout)
