"""The documentation site (mkdocs.yml, docs/): every public name has an API
entry, the site builds with `mkdocs build --strict`, every internal link of the
built site resolves, the built site renders in headless Chromium, and no code
block of any page hides part of a line past its column's right edge.

The build and the browser need the `docs` (or `test`) extra and Debian's
`chromium` and `chromium-driver` packages. Without them these tests skip on a
developer's machine; with OPTAX_DP_REQUIRE_BROWSER=1 (set by .ci/run) they fail
instead, so CI never skips them silently. Screenshots of the pages opened go
to $OPTAX_DP_SCREENSHOTS when set, else to a pytest temporary folder.
"""

import base64
import functools
import html
import html.parser
import http.server
import importlib.util
import os
import pathlib
import posixpath
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

import optax_dp

ROOT = pathlib.Path(__file__).resolve().parents[1]
API_PAGE = ROOT / "docs" / "api.md"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The pages the browser opens and photographs: the home page, the NNX guide,
# a tutorial and the API page.
BROWSER_PAGES = {"index": "", "nnx": "getting_started/nnx/", "tutorial": "tutorials/mnist/",
                 "api": "api/"}
# Chrome cannot capture more than this many pixels in one screenshot; the API
# page is longer, and its screenshot keeps the top of it.
MAX_SCREENSHOT_HEIGHT = 16000


def _required():
  return os.environ.get("OPTAX_DP_REQUIRE_BROWSER") == "1"


def _unavailable(reason):
  """Skips, or fails where CI requires the docs tests (OPTAX_DP_REQUIRE_BROWSER=1)."""
  if _required():
    pytest.fail(f"{reason}; OPTAX_DP_REQUIRE_BROWSER=1 requires the docs tests to run")
  pytest.skip(reason)


# ---------------------------------------------------------------------------
# The API page covers exactly the public names.


def _api_entries():
  return re.findall(r"^:::\s+(\S+)\s*$", API_PAGE.read_text(), flags=re.MULTILINE)


def test_api_page_has_an_entry_for_every_public_name_and_nothing_else():
  entries = _api_entries()
  duplicates = sorted({e for e in entries if entries.count(e) > 1})
  assert not duplicates, f"docs/api.md documents these twice: {duplicates}"
  public = {f"optax_dp.{name}" for name in optax_dp.__all__}
  missing = sorted(public - set(entries))
  extra = sorted(set(entries) - public)
  assert not missing, f"public names without a `::: NAME` entry in docs/api.md: {missing}"
  assert not extra, f"docs/api.md documents names that are not in optax_dp.__all__: {extra}"


# ---------------------------------------------------------------------------
# The strict build, once per session.


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
  """The site built by `mkdocs build --strict`; (mkdocs's return code, output, folder)."""
  for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
    try:
      found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
      found = False
    if not found:
      _unavailable(f"{module} is not installed (pip install -e '.[docs]')")
  site = tmp_path_factory.mktemp("site")
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # Material's banner about MkDocs 2.0
  proc = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
       str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  return proc.returncode, proc.stdout + proc.stderr, site


@pytest.fixture(scope="module")
def site(built_site):
  returncode, _, folder = built_site
  if returncode != 0:
    pytest.fail("`mkdocs build --strict` failed (see test_mkdocs_build_strict)")
  return folder


@pytest.mark.browser
def test_mkdocs_build_strict(built_site):
  returncode, output, folder = built_site
  assert returncode == 0, f"`mkdocs build --strict` failed:\n{output}"
  assert (folder / "index.html").is_file()
  assert (folder / "api" / "index.html").is_file()


# ---------------------------------------------------------------------------
# Every internal link of every built page resolves (no browser needed).


class _PageParser(html.parser.HTMLParser):
  """The element ids of a page and the URLs it refers to."""

  def __init__(self):
    super().__init__()
    self.ids = set()
    self.refs = []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if attrs.get("id"):
      self.ids.add(attrs["id"])
    if tag == "a" and attrs.get("name"):
      self.ids.add(attrs["name"])
    for attr in ("href", "src"):
      if attrs.get(attr) and tag in ("a", "img", "link", "script", "source", "iframe"):
        self.refs.append((tag, attrs[attr]))


def _target_file(site, url_path):
  """The file that a site-relative URL path serves, or None."""
  path = site / urllib.parse.unquote(url_path).lstrip("/")
  if path.is_dir():
    path = path / "index.html"
  return path if path.is_file() else None


@pytest.mark.browser
def test_every_internal_link_of_the_built_site_resolves(site):
  pages = {}
  for page in sorted(site.rglob("*.html")):
    parser = _PageParser()
    parser.feed(page.read_text(encoding="utf-8"))
    pages[page] = parser
  # 404.html is served at any depth, so mkdocs gives it absolute links.
  pages.pop(site / "404.html", None)
  broken = []
  for page, parser in pages.items():
    base = "/" + page.relative_to(site).as_posix()
    for tag, ref in parser.refs:
      url = urllib.parse.urlsplit(ref)
      if url.scheme or url.netloc or ref.startswith(("mailto:", "javascript:", "data:")):
        continue
      path = posixpath.normpath(posixpath.join(posixpath.dirname(base), url.path)) \
          if url.path else base
      if url.path.endswith("/") and not path.endswith("/"):
        path += "/"
      target = _target_file(site, path)
      if target is None:
        broken.append(f"{base}: <{tag}> {ref} (no such file)")
      elif url.fragment and target.suffix == ".html":
        ids = pages[target].ids if target in pages else None
        if ids is not None and urllib.parse.unquote(url.fragment) not in ids:
          broken.append(f"{base}: <{tag}> {ref} (no element with that id)")
  assert not broken, "broken internal links:\n" + "\n".join(broken)


# ---------------------------------------------------------------------------
# The site in a real browser.


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  """Serves the site's files, as a static host would: no directory listings
  (a folder without index.html is a 404, not a page), no request log."""

  def list_directory(self, path):
    del path
    self.send_error(404, "No index.html in this folder")

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    del format, args


@pytest.fixture(scope="module")
def served_site(site):
  """The built site over HTTP on 127.0.0.1 (a free port), as material's JS needs."""
  handler = functools.partial(_QuietHandler, directory=str(site))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}/"
  server.shutdown()
  server.server_close()
  thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
  """Headless Chromium (Debian's chromium and chromium-driver), through Selenium."""
  missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
  if missing:
    _unavailable(f"{' and '.join(missing)} not found "
                 "(apt-get install chromium chromium-driver)")
  if importlib.util.find_spec("selenium") is None:
    _unavailable("selenium is not installed (pip install -e '.[docs]')")
  from selenium import webdriver  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                   "--window-size=1280,1000", "--hide-scrollbars", "--force-color-profile=srgb",
                   "--no-first-run", "--disable-extensions", "--disable-background-networking"):
    options.add_argument(argument)
  options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
  driver.set_page_load_timeout(60)
  try:
    yield driver
  finally:
    driver.quit()


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory):
  folder = os.environ.get("OPTAX_DP_SCREENSHOTS")
  if folder:
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
  return tmp_path_factory.mktemp("screenshots")


def _wait_for(driver, script, timeout=20.0):
  deadline = time.monotonic() + timeout
  while True:
    value = driver.execute_script(script)
    if value or time.monotonic() > deadline:
      return value
    time.sleep(0.1)


def _full_page_screenshot(driver, path):
  """A screenshot of the whole page (up to MAX_SCREENSHOT_HEIGHT pixels high)."""
  # Material fades its tabs in on load: stop every transition, so the picture
  # shows the page as it settles, not halfway through.
  driver.execute_script(
      "const style = document.createElement('style');"
      "style.textContent = '*, *::before, *::after {transition: none !important;"
      " animation: none !important;}';"
      "document.head.appendChild(style);")
  width, height = driver.execute_script(
      "return [document.documentElement.scrollWidth,"
      " Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)];")
  height = min(height, MAX_SCREENSHOT_HEIGHT)
  shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
      "format": "png", "captureBeyondViewport": True, "fromSurface": True,
      "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
  path.write_bytes(base64.b64decode(shot["data"]))
  return height


def _status(url):
  request = urllib.request.Request(url, method="HEAD")
  try:
    with urllib.request.urlopen(request, timeout=10) as response:
      return response.status
  except urllib.error.HTTPError as error:
    return error.code


def _plot_results():
  """examples/plot_results.py (its MIN_FONT_PT: no text of a figure is smaller)."""
  spec = importlib.util.spec_from_file_location(
      "plot_results_for_docs", ROOT / "examples" / "plot_results.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _png_dpi(path):
  """The dots per inch a PNG file records (its pHYs chunk, in dots a metre)."""
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
  position = 8
  while position < len(data):
    length = int.from_bytes(data[position:position + 4], "big")
    kind = data[position + 4:position + 8]
    if kind == b"pHYs":
      body = data[position + 8:position + 8 + length]
      assert body[8] == 1, f"{path}: pHYs not in dots a metre"
      return int.from_bytes(body[:4], "big") * 0.0254
    position += 12 + length
  raise AssertionError(f"{path} records no resolution (pHYs)")


@pytest.mark.browser
@pytest.mark.parametrize("name", list(BROWSER_PAGES))
def test_page_renders_in_headless_chromium(name, browser, site, served_site, screenshot_dir):
  url = served_site + BROWSER_PAGES[name]
  browser.get_log("browser")  # drop what earlier pages logged
  browser.get(url)
  assert _wait_for(browser, "return document.readyState === 'complete';"), f"{url} never loaded"
  # Material's stylesheet applied (its sticky header); its JavaScript is
  # checked by the copy buttons below and, on the API page, by the search
  # (a web worker over the built index, which needs HTTP, not file://).
  assert _wait_for(browser, "return !!document.querySelector('.md-header');")
  header_position = browser.execute_script(
      "return getComputedStyle(document.querySelector('.md-header')).position;")
  assert header_position == "sticky", "material's stylesheet did not load"
  problems = []

  # Images: every <img> loaded (naturalWidth 0 is a missing or broken file).
  broken_images = browser.execute_script(
      "return Array.from(document.images)"
      ".filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src);")
  problems += [f"image not loaded: {src}" for src in broken_images]

  # Code blocks get material's copy button (added by its JavaScript; material
  # 9.6+ marks it data-md-type="copy", older versions class md-clipboard).
  code_blocks = browser.execute_script(
      "return document.querySelectorAll('div.highlight pre').length;")
  if code_blocks and not _wait_for(browser, "return document.querySelectorAll("
                                   "'button[data-md-type=\"copy\"], button.md-clipboard')"
                                   ".length > 0;"):
    problems.append(f"{code_blocks} code blocks but no copy button")

  # Figures (examples/plot_results.py): their smallest text, at the size the
  # page shows them, is at least 10 points (96 CSS px an inch).
  for src, shown, natural in browser.execute_script(
      "return Array.from(document.images).filter(i => i.src.includes('/figures/'))"
      ".map(i => [i.src, i.clientWidth, i.naturalWidth]);"):
    path = site / urllib.parse.unquote(urllib.parse.urlsplit(src).path).lstrip("/")
    points = _plot_results().MIN_FONT_PT * _png_dpi(path) * shown / (96 * natural)
    if points < 10 - 0.05:
      problems.append(f"figure {src}: its smallest text shows at {points:.1f} pt (< 10)")

  _full_page_screenshot(browser, screenshot_dir / f"{name}.png")

  # Internal links: every same-origin <a href> answers (no 404).
  hrefs = browser.execute_script(
      "return Array.from(document.querySelectorAll('a[href]')).map(a => a.href);")
  internal = sorted({h.split("#")[0] for h in hrefs if h.startswith(served_site)})
  assert internal, f"{url} has no internal links (navigation missing?)"
  problems += [f"link {h} answers {code}" for h in internal
               if (code := _status(h)) != 200]

  if name == "index":
    assert code_blocks > 0, "the home page shows no code block"
    assert len(browser.find_elements("css selector", "img")) >= 2, "the home page's figures"
  if name == "api":
    # Every public name rendered, each with a signature (functions and classes).
    ids = set(browser.execute_script(
        "return Array.from(document.querySelectorAll('[id]')).map(e => e.id);"))
    absent = [n for n in optax_dp.__all__ if f"optax_dp.{n}" not in ids]
    if absent:
      problems.append(f"API entries not rendered: {absent}")
    signatures = browser.execute_script(
        "return document.querySelectorAll('.doc-signature').length;")
    if signatures < 30:
      problems.append(f"only {signatures} rendered signatures on the API page")
    # The search (a web worker over the built index) finds a public name.
    browser.execute_script(
        "const s = document.querySelector('.md-search__input');"
        "s.focus(); s.value = 'dp_aggregate';"
        "s.dispatchEvent(new Event('input', {bubbles: true}));"
        "s.dispatchEvent(new KeyboardEvent('keyup', {bubbles: true, key: 'e'}));")
    if not _wait_for(browser, "return document.querySelectorAll("
                     "'.md-search-result__item').length > 0;"):
      problems.append("the search found nothing for 'dp_aggregate'")
    browser.execute_script("document.querySelector('.md-search__input').blur();"
                           "document.querySelector('#__search').checked = false;")

  # JavaScript errors (console messages of level SEVERE: failed requests too).
  problems += [f"console: {entry['message']}" for entry in browser.get_log("browser")
               if entry.get("level") == "SEVERE"]

  assert not problems, f"{url} (screenshot {screenshot_dir / (name + '.png')}):\n" + \
      "\n".join(problems)


# ---------------------------------------------------------------------------
# No code block hides content past the column's right edge, on any page.

# Every code block of the page, measured: (its language, its text's first
# line, how many pixels of it lie past the block's visible width, how far the
# block itself passes the right edge of the page's column, how many pixels its
# widest line would pass the visible width if it were not wrapped). Tabs'
# hidden panels and closed <details> are shown first, so their code counts.
_MEASURE_CODE_BLOCKS = """
const show = document.createElement('style');
show.textContent = '.tabbed-set > .tabbed-content > .tabbed-block {display: block !important;}';
document.head.appendChild(show);
document.querySelectorAll('details').forEach(d => { d.open = true; });
// The content area's right edge (on a phone, material lets code blocks run
// into the column's padding, to the screen's edge, but not past it).
const edge = Math.min(document.querySelector('.md-content').getBoundingClientRect().right,
                      document.documentElement.clientWidth);
return Array.from(document.querySelectorAll('pre > code')).map(code => {
  const block = code.closest('div.highlight') || code.parentElement;
  const language = (Array.from(block.classList).find(c => c.startsWith('language-')) || '')
      .replace('language-', '') + (block.classList.contains('doc-signature') ? ' signature' : '');
  const hidden = code.scrollWidth - code.clientWidth;
  const past = code.parentElement.getBoundingClientRect().right - edge;
  const wrap = code.style.whiteSpace;
  code.style.whiteSpace = 'pre';
  const unwrapped = code.scrollWidth - code.clientWidth;
  code.style.whiteSpace = wrap;
  const line = code.textContent.split('\\n').reduce((a, b) => b.length > a.length ? b : a, '');
  return [language, line.slice(0, 100), hidden, past, unwrapped, code.clientWidth];
});
"""

# The languages whose lines must fit the column unwrapped at the browser's
# desktop width (1280 px: 80 characters): the Python and shell code a reader
# copies, and the API page's signatures (mkdocs.yml: line_length). Printed
# output (text) and the API page's doctests (pycon, in the library's
# docstrings) wrap instead where they are wider.
_MUST_FIT = {"python", "bash", "python signature"}
# A phone's width: there, too, nothing may be hidden (lines wrap).
_NARROW_WIDTH = 412


def _site_pages(site):
  """Every page of the built site, as URL paths relative to its root."""
  pages = []
  for page in sorted(site.rglob("index.html")):
    relative = page.parent.relative_to(site).as_posix()
    pages.append("" if relative == "." else relative + "/")
  return pages


def _code_block_problems(driver, url, *, require_fit):
  driver.get(url)
  assert _wait_for(driver, "return document.readyState === 'complete';"), f"{url} never loaded"
  problems = []
  for language, line, hidden, past, unwrapped, width in driver.execute_script(
      _MEASURE_CODE_BLOCKS):
    if hidden > 1:
      problems.append(f"{url}: a {language or 'plain'} code block hides {hidden} px past its "
                      f"visible {width} px (no wrap): {line!r}")
    if past > 1:
      problems.append(f"{url}: a {language or 'plain'} code block passes the content's "
                      f"right edge by {past:.0f} px: {line!r}")
    if require_fit and language in _MUST_FIT and unwrapped > 1:
      problems.append(f"{url}: a {language} line is {unwrapped} px wider than the column "
                      f"({width} px) and wraps: {line!r}")
  return problems


@pytest.mark.browser
def test_no_code_block_hides_content_past_the_column(browser, site, served_site):
  """On every page, no code block's content passes its visible width or the
  column (it wraps: docs/stylesheets/extra.css), and the Python and shell
  code and the signatures fit unwrapped at a desktop width. At a phone's
  width, the NNX guide, the MNIST tutorial and the API page hide nothing
  either."""
  pages = _site_pages(site)
  sources = [p for p in (ROOT / "docs").rglob("*.md") if not p.name.startswith("README")]
  assert len(pages) == len(sources), f"{len(sources)} pages in docs/, {len(pages)} built"
  problems = []
  for page in pages:
    problems += _code_block_problems(browser, served_site + page, require_fit=True)
  size = browser.get_window_size()
  browser.set_window_size(_NARROW_WIDTH, size["height"])
  try:
    for page in ("getting_started/nnx/", "tutorials/mnist/", "api/"):
      problems += _code_block_problems(browser, served_site + page, require_fit=False)
  finally:
    browser.set_window_size(size["width"], size["height"])
  assert not problems, "code cut off or wider than the column:\n" + "\n".join(problems)


@pytest.mark.browser
def test_signatures_name_no_private_type(site):
  """The API page's signatures show public names only (the budget parameter's
  PrivacyBudget, not the library's private protocol: docs/_griffe/public_types.py)."""
  text = (site / "api" / "index.html").read_text(encoding="utf-8")
  signatures = re.findall(r'class="[^"]*doc-signature[^"]*">(.*?)</code>', text, flags=re.S)
  assert len(signatures) >= 30
  private = set()
  for signature in signatures:
    shown = html.unescape(re.sub(r"<[^>]+>", "", signature))
    private |= set(re.findall(r"(?<![\w.])_[A-Za-z]\w*|\b\w+\._[A-Za-z]\w*", shown))
  assert not private, f"the API page's signatures name private types: {sorted(private)}"
