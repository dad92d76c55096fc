"""Headless Chromium for the report: what the page looks like in a real browser, and a screenshot.

No Python browser driver is needed: Chromium's own ``--headless --dump-dom`` prints the DOM after
the page's load event, so a small script added to a *copy* of the page can measure every image and
table and write the measurements into the DOM it prints. ``--screenshot`` takes the picture.
The flags are those that work on a machine without network or display (no background
networking, no GPU, a fresh profile per call; ``--no-sandbox`` because CI may run as root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
PROBE_ID = "lexp-browser-probe"
# Runs on the load event of the copy: sizes of every image, the text of every table cell, page size.
PROBE = f"""<script>
window.addEventListener("load", () => {{
  const box = (el) => {{ const r = el.getBoundingClientRect(); return [r.width, r.height]; }};
  const out = {{
    images: [...document.images].map((im) => ({{
      alt: im.alt, source: im.dataset.source || "", complete: im.complete, naturalWidth: im.naturalWidth,
      naturalHeight: im.naturalHeight, box: box(im) }})),
    tables: [...document.querySelectorAll("table[data-key]")].map((t) => ({{
      key: t.dataset.key, box: box(t), folded: t.closest("details:not([open])") !== null,
      header: [...t.tHead.rows].map((r) => [...r.cells].map((c) => c.textContent.trim())),
      rows: [...t.tBodies[0].rows].map((r) => [...r.cells].map((c) => c.textContent.trim())) }})),
    height: document.documentElement.scrollHeight,
    width: document.documentElement.scrollWidth,
  }};
  const pre = document.createElement("pre");
  pre.id = "{PROBE_ID}";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}});
</script>"""


class BrowserError(RuntimeError):
    """Chromium is missing, failed or printed something that is not the page."""


def find_chromium() -> str | None:
    """``$LEXP_CHROMIUM``, else the first Chromium/Chrome on PATH (Debian: ``apt-get install chromium``)."""
    configured = os.environ.get("LEXP_CHROMIUM")
    if configured:
        return configured if Path(configured).exists() or shutil.which(configured) else None
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium(args: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    binary = find_chromium()
    if binary is None:
        raise BrowserError(
            "no Chromium found: install it (Debian: apt-get install chromium) or set LEXP_CHROMIUM"
        )
    with tempfile.TemporaryDirectory(prefix="lexp-chromium-") as profile:
        try:
            done = subprocess.run(
                [binary, *FLAGS, f"--user-data-dir={profile}", *args],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise BrowserError(f"Chromium did not finish within {timeout:g} s") from exc
    if done.returncode != 0:
        raise BrowserError(f"Chromium exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done


def inspect_page(html_path: str | Path, *, width: int = 1280, timeout: float = 120) -> dict[str, Any]:
    """Load the page in headless Chromium and return what it rendered.

    ``images``: alt, source (``data-source``: a run's file or 'generated'), complete,
    naturalWidth/Height and on-screen box of every ``<img>``; ``tables``: key, box, folded (inside a closed ``<details>``), header and body cell texts of every
    ``table[data-key]``; ``height``/``width`` of the page.
    The page itself is not modified: a copy with the measuring script is loaded.
    """
    source = Path(html_path).read_text(encoding="utf-8")
    if "</body>" not in source:
        raise BrowserError(f"{html_path}: no </body> to add the measuring script before")
    with tempfile.TemporaryDirectory(prefix="lexp-page-") as tmp:
        copy = Path(tmp) / "page.html"
        copy.write_text(source.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
        done = _chromium(
            [f"--window-size={width},1000", "--virtual-time-budget=10000", "--dump-dom", copy.as_uri()],
            timeout=timeout,
        )
    found = re.search(rf'<pre id="{PROBE_ID}">(.*?)</pre>', done.stdout, re.S)
    if found is None:
        raise BrowserError("the page's load event never ran the measuring script (no probe in the DOM)")
    import html

    return json.loads(html.unescape(found.group(1)))


def screenshot(
    html_path: str | Path,
    png_path: str | Path,
    *,
    width: int = 1280,
    height: int | None = None,
    max_height: int = 30000,
    timeout: float = 180,
) -> Path:
    """A PNG of the whole page at ``width`` pixels: ``height`` (default: measured by
    :func:`inspect_page`, one more Chromium start) up to ``max_height`` pixels."""
    if height is None:
        height = int(inspect_page(html_path, width=width, timeout=timeout)["height"])
    height = min(height, max_height)
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    _chromium(
        [
            f"--window-size={width},{max(height, 100)}",
            f"--screenshot={png_path}",
            Path(html_path).resolve().as_uri(),
        ],
        timeout=timeout,
    )
    if not png_path.exists() or png_path.stat().st_size == 0:
        raise BrowserError(f"Chromium wrote no screenshot to {png_path}")
    return png_path
