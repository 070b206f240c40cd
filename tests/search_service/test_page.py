"""The search page in a real headless Chromium: a text query shows thumbnails, an upload searches by image, "more like
this" searches by a hit. Screenshots go to `artifacts/screenshots/` (or `$IMGTXT_SCREENSHOTS`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from search_service.server import SearchServer

ROOT = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("IMGTXT_SCREENSHOTS", ROOT / "artifacts" / "screenshots"))


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on this machine (.ci/run installs Debian's `chromium`)")
    raise AssertionError  # unreachable


@pytest.fixture(scope="module")
def page(search_server: SearchServer) -> Iterator[object]:
    playwright = pytest.importorskip("playwright.sync_api")
    executable = _chromium()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(search_server.url)
            yield page
            assert errors == []  # no JavaScript error on the page
        finally:
            browser.close()


def _loaded_thumbnails(page: object) -> int:
    return page.evaluate(  # type: ignore[attr-defined, no-any-return]
        "() => [...document.querySelectorAll('#results .thumb img')]"
        ".filter(i => i.complete && i.naturalWidth > 0).length"
    )


def test_text_query_shows_thumbnails_captions_scores_and_latency(page: object, search_server: SearchServer) -> None:
    p = page  # the Playwright page
    p.wait_for_function("() => document.getElementById('info').textContent.includes('12 images')")  # type: ignore[attr-defined]
    p.fill("#query", "photo 5 shows thing 1")  # type: ignore[attr-defined]
    p.press("#query", "Enter")  # type: ignore[attr-defined]
    p.wait_for_function("() => document.querySelectorAll('#results .hit').length > 0")  # type: ignore[attr-defined]
    p.wait_for_function(  # type: ignore[attr-defined]
        "() => [...document.querySelectorAll('#results .thumb img')].some(i => i.complete && i.naturalWidth > 0)"
    )
    assert _loaded_thumbnails(p) >= 1
    status = p.text_content("#status")  # type: ignore[attr-defined]
    assert "image results" in status and " ms " in status
    first_id = p.get_attribute("#results .hit", "data-id")  # type: ignore[attr-defined]
    expected = search_server.backend.searcher.search_text("photo 5 shows thing 1", target="image", limit=20)[0].id
    assert first_id == expected  # the page shows what the API ranks first
    SHOTS.mkdir(parents=True, exist_ok=True)
    p.screenshot(path=str(SHOTS / "search-page-text.png"), full_page=True)  # type: ignore[attr-defined]


def test_captions_switch_upload_and_more_like_this(page: object, index: tuple[Path, Path]) -> None:
    p = page
    p.check("input[name=target][value=text]")  # type: ignore[attr-defined]
    p.wait_for_function("() => document.getElementById('status').textContent.includes('text results')")  # type: ignore[attr-defined]
    captions = p.eval_on_selector_all("#results .caption", "els => els.map(e => e.textContent)")  # type: ignore[attr-defined]
    assert captions and all(c.startswith("photo ") for c in captions)
    p.check("input[name=target][value=image]")  # type: ignore[attr-defined]
    p.set_input_files("#file", str(index[0] / "images" / "img0007.jpg"))  # type: ignore[attr-defined]
    p.wait_for_function("() => document.getElementById('status').textContent.includes('img0007.jpg')")  # type: ignore[attr-defined]
    assert p.is_visible("#query-image")  # type: ignore[attr-defined]
    assert p.get_attribute("#results .hit img", "alt") == "img0007.jpg"  # type: ignore[attr-defined]  # itself first
    second = p.get_attribute("#results .hit:nth-child(2) img", "alt")  # type: ignore[attr-defined]
    p.click("#results .hit:nth-child(2) .more")  # type: ignore[attr-defined]
    p.wait_for_function("() => document.getElementById('status').textContent.includes('more like')")  # type: ignore[attr-defined]
    assert p.get_attribute("#results .hit img", "alt") == second  # type: ignore[attr-defined]  # its own image first
    p.wait_for_function("() => [...document.querySelectorAll('#results .thumb img')].some(i => i.naturalWidth > 0)")  # type: ignore[attr-defined]
    SHOTS.mkdir(parents=True, exist_ok=True)
    p.screenshot(path=str(SHOTS / "search-page-more-like-this.png"), full_page=True)  # type: ignore[attr-defined]


_DROP = """([b64, name, kind]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const data = new DataTransfer();
    data.items.add(new File([bytes], name, { type: "image/jpeg" }));
    if (kind === "drop") {
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true }));
    } else {
        document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true }));
    }
}"""


@pytest.mark.parametrize("kind", ["drop", "paste"])
def test_drag_and_drop_and_paste_search_by_image(page: object, index: tuple[Path, Path], kind: str) -> None:
    import base64

    p = page
    name = "img0004.jpg" if kind == "drop" else "img0009.jpg"
    data = base64.b64encode((index[0] / "images" / name).read_bytes()).decode()
    p.check("input[name=target][value=image]")  # type: ignore[attr-defined]
    p.evaluate(_DROP, [data, name if kind == "drop" else "image.png", kind])  # type: ignore[attr-defined]
    label = name if kind == "drop" else "image.png"
    p.wait_for_function("l => document.getElementById('status').textContent.includes(l)", arg=label)  # type: ignore[attr-defined]
    assert p.get_attribute("#results .hit img", "alt") == name  # type: ignore[attr-defined]  # the image itself first
