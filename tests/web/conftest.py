"""Browser tests: Playwright drives Debian's Chromium (/usr/bin/chromium, never a download)
against one real server on the embedded model. Screenshots of every screen go to
.cache/screenshots/ (HOMEFIRE_SCREENSHOTS moves them), for a person to look at."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from playwright.sync_api import Browser, Page, sync_playwright

from tests.support.server import REPO, Server
from tests.support.training import QUICK, REPORTS

CHROMIUM = os.environ.get("HOMEFIRE_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(os.environ.get("HOMEFIRE_SCREENSHOTS", REPO / ".cache" / "screenshots"))


@pytest.fixture(scope="session")
def web(model_dir: Path, tmp_path_factory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("web")
    quick = data / "finetune-quick.yaml"
    quick.write_text(yaml.safe_dump(QUICK | {"eval_share": 0.25}))   # the page sets the steps
    srv = Server(data, model_dir, config={"finetune": REPORTS | {"config": str(quick)}}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        # Never a silent skip: `make test` installs it (see the Makefile).
        pytest.fail(f"the browser tests need Chromium at {CHROMIUM}: apt-get install chromium")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


class Tab:
    """One browser context (its own sessionStorage) on the web server, with every request
    and every dialog it saw, and its page's errors."""

    def __init__(self, browser: Browser, server: Server, **options):
        self.server = server
        self.context = browser.new_context(**({"viewport": {"width": 1200, "height": 800}} | options))
        self.page: Page = self.context.new_page()
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("pageerror", lambda err: self.errors.append(str(err)))
        self.page.on("dialog", self._dialog)

    def _dialog(self, dialog) -> None:
        """Say yes to every confirm; an alert is recorded (the markup test wants none)."""
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss() if dialog.type == "alert" else dialog.accept()

    def open(self, path: str = "/") -> Page:
        self.page.goto(self.server.url + path)
        return self.page

    def sign_in(self, key: str | None = None) -> Page:
        page = self.open()
        page.fill("#key", key or self.server.key)
        page.click("button[type=submit]")
        page.wait_for_selector("#top:not([hidden])")
        return page

    def shot(self, name: str) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=path, full_page=True)
        return path

    def hosts(self) -> set[str]:
        """Every host the page asked something of (blob: and data: URLs are the page's own)."""
        own = urlsplit(self.server.url).netloc
        return {urlsplit(url).netloc or url.split(":")[0] for url in self.requests} - {own, "blob", "data"}


@pytest.fixture
def tab(browser: Browser, web: Server) -> Iterator:
    opened: list[Tab] = []

    def make(**options) -> Tab:
        opened.append(Tab(browser, web, **options))
        return opened[-1]

    yield make
    for each in opened:
        each.context.close()
        # No request ever leaves for another host, and no page error went unnoticed.
        assert each.hosts() == set(), each.hosts()
        assert each.errors == [], each.errors

