"""Open every page of the built site in headless Chromium and fail on what a reader would see broken.

    python docs/check.py [docs/_build/html] [--screenshots DIR]

The site is served on localhost (as a reader's browser would load it, not from file://), and each
page is loaded by Debian's Chromium (`apt-get install chromium`; no browser is downloaded) with
its JavaScript run. A page fails when:

- it does not load, or has no content;
- a script raised, or called console.error (recorded by a hook the server adds to each page it
  serves, never written into the built files), or a resource (an image, a script, a font, a
  style sheet) did not load (404s are also counted by the server itself);
- a formula was not typeset: the page has fewer MathJax-rendered formulas than math elements, or
  MathJax reported a TeX error;
- a figure is missing: an image that did not load, or an executed tutorial with no figure.

Screenshots of the home page and of the first tutorial go to --screenshots (default
docs/_build/screenshots) for a person to look at.
"""

from __future__ import annotations

import argparse
import functools
import html
import http.server
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0", "--virtual-time-budget=30000",
]
SKIP = ("_modules/", "_sources/", "_static/", "_images/", "py-modindex.html")
# Records what a reader's console would show as errors into an attribute that --dump-dom prints.
HOOK = b"""<script>(function () {
  var errors = [];
  function note(m) { errors.push(String(m)); document.documentElement.setAttribute("data-check-errors", JSON.stringify(errors)); }
  var error = console.error;
  console.error = function () { note(Array.prototype.join.call(arguments, " ")); error.apply(console, arguments); };
  window.addEventListener("error", function (e) {
    var t = e.target;
    if (t && t !== window && (t.src || t.href)) note("failed to load " + (t.src || t.href)); else note(e.message);
  }, true);
  window.addEventListener("unhandledrejection", function (e) { note("unhandled rejection: " + e.reason); });
})();</script>"""


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the site, adds HOOK to each HTML page, and records every request that failed."""

    failures: list[str]

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if path.is_file() and path.suffix == ".html":
            body = path.read_bytes().replace(b"<head>", b"<head>" + HOOK, 1)
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_request(self, code="-", size="-"):
        if str(code) != "200" and not self.path.startswith("/favicon.ico"):
            self.failures.append(f"{self.path}: HTTP {code}")

    def log_message(self, *args):
        pass


def _serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, list[str]]:
    failures: list[str] = []
    handler = type("Handler", (_Handler,), {"failures": failures})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, failures


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("docs-check needs Chromium: install Debian's package with `apt-get install chromium` "
             "(`make docs-check` does not download a browser)")


def _load(browser: str, url: str, screenshot: Path | None = None) -> tuple[str, str]:
    """The page's DOM after its scripts ran, and Chromium's log."""
    with tempfile.TemporaryDirectory() as profile:
        mode = [f"--screenshot={screenshot}", "--window-size=1280,1500"] if screenshot else ["--dump-dom"]
        r = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *mode, url],
                           capture_output=True, text=True, timeout=120)
    return r.stdout, r.stderr


def problems(page: str, source: str, dom: str, log: str) -> list[str]:
    """What is wrong with one page: its source HTML, its DOM after Chromium ran it, and Chromium's log."""
    found = []
    if "<main" not in dom or len(re.sub(r"<[^>]+>", "", dom).strip()) < 50:
        found.append("did not load (no content)")
    if m := re.search(r'data-check-errors="([^"]*)"', dom):
        found += [f"console: {e}" for e in re.findall(r'"((?:[^"\\]|\\.)*)"', html.unescape(m.group(1)))]
    found += [f"console: {m}" for m in re.findall(r'CONSOLE[^\]]*\] "(Uncaught[^"]*)"', log)]
    n_math = len(re.findall(r'class="math[ "]', source))
    n_typeset = len(re.findall(r"<mjx-container", dom))
    if n_typeset < n_math:
        found.append(f"formulas: {n_typeset} of {n_math} typeset by MathJax")
    if "<mjx-merror" in dom:
        found.append(f"formulas: MathJax reported {dom.count('<mjx-merror')} TeX error(s)")
    if page.startswith("tutorials/") and page != "tutorials/index.html" and "<img" not in dom:
        found.append("figures: an executed tutorial with no figure")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default="docs/_build/html", type=Path)
    parser.add_argument("--screenshots", default="docs/_build/screenshots", type=Path)
    args = parser.parse_args(argv)
    pages = sorted(str(p.relative_to(args.root)) for p in args.root.rglob("*.html"))
    pages = [p for p in pages if not p.startswith(SKIP)]
    if "index.html" not in pages:
        sys.exit(f"no site at {args.root}: run `make docs` first")
    browser = chromium()
    server, failures = _serve(args.root)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with ThreadPoolExecutor(2) as pool:
            loaded = list(pool.map(lambda p: _load(browser, base + p), pages))
        args.screenshots.mkdir(parents=True, exist_ok=True)
        tutorials = [p for p in pages if p.startswith("tutorials/") and p != "tutorials/index.html"]
        for page in ["index.html", *tutorials[:1]]:
            _load(browser, base + page, args.screenshots / (page.replace("/", "_").removesuffix(".html") + ".png"))
    finally:
        server.shutdown()
    bad = 0
    for page, (dom, log) in zip(pages, loaded):
        found = problems(page, (args.root / page).read_text(), dom, log)
        bad += bool(found)
        for f in found:
            print(f"{page}: {f}")
    for f in sorted(set(failures)):
        print(f"server: {f}")
    n_math = sum(len(re.findall(r"<mjx-container", dom)) for dom, _ in loaded)
    print(f"docs-check: {len(pages)} pages, {n_math} formulas typeset, {bad} page(s) with problems, "
          f"{len(set(failures))} failed request(s); screenshots in {args.screenshots}")
    return 1 if bad or failures else 0


if __name__ == "__main__":
    sys.exit(main())
