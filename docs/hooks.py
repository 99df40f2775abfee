"""mkdocs hooks: benchmarks/RESULTS.md is the site's "Measured results" page.

The measured figures live beside the benchmarks that produce them, outside ``docs/``, and the
pages link to them as ``../benchmarks/RESULTS.md#section`` (``../../`` from a subfolder), a link
that works where the Markdown is read as files. The site has no such path, so these hooks add
RESULTS.md (as ``results.md``) and the pictures it shows to the site's files, and point each such
link at that page; the link's section anchor is then checked like any other.
"""

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
PAGE = "results.md"
LINK = re.compile(r"\]\(((?:\.\./)+)benchmarks/RESULTS\.md")


def on_files(files, config):
    files.append(File.generated(config, PAGE, abs_src_path=str(RESULTS)))
    for picture in sorted(RESULTS.parent.glob("*.png")):
        files.append(File.generated(config, picture.name, abs_src_path=str(picture)))
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")  # folders between docs/ and the page

    def to_page(match):
        if len(match.group(1)) // 3 != depth + 1:  # not the repository root's benchmarks/
            return match.group(0)
        return "](" + "../" * depth + PAGE

    return LINK.sub(to_page, markdown)
