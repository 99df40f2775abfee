"""The documentation: README.md, docs/ and the site built from them.

- ``mkdocs build --strict`` passes: a broken link or anchor, a missing picture, an API reference
  entry that names no object, or a docstring the reference cannot read fails the build.
- Every command the docs show in a shell block is one the code has: each ``vdm-fast COMMAND``
  names a subcommand whose ``--help`` exits 0 and lists every flag the docs give it; each
  ``python -m``/``torchrun -m`` module exists (and, where it is a subcommand's, takes the flags);
  each script path exists; each ``pip install`` extra is in pyproject.toml.
- Every file the docs name in inline code exists, every page (and section) the code points to
  exists, the Python snippets run, the public objects the
  API reference shows have docstrings, and the figures docs/figures.py draws are the ones
  RESULTS.md records.
"""

import functools
import importlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vdm_fast.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# Fenced blocks read as shell commands: labelled so, or unlabelled (commands and output; an
# output line never starts with a command name).
SHELL = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```([A-Za-z]*)[^\n]*\n(.*?)^```", re.S | re.M)
# The modules of API reference pages (docs/reference/*.md): their public objects need docstrings.
REFERENCE_MODULES = ["vdm_fast.ops", "vdm_fast.nn", "vdm_fast.io"] + [
    f"vdm_fast.diffusion.{name}" for name in
    ("process", "parameterization", "times", "weighting", "sampling", "features", "pixels", "draws")]


def _blocks(languages):
    """``(page, language, text)`` of every fenced block of the pages in ``languages``."""
    return [(page, m.group(1), m.group(2)) for page in PAGES for m in FENCE.finditer(page.read_text())
            if m.group(1) in languages]


def _commands(text):
    """The simple commands of a shell block, each a list of words (comments, line continuations,
    ``&&``/``;``/``|`` and leading ``VAR=value`` assignments handled)."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:  # unbalanced quotes: an output line (a command must parse)
            assert not re.match(r"\s*(vdm-fast|python|pip|torchrun) ", line), f"cannot parse {line!r}"
            continue
        words = []
        for token in [*tokens, ";"]:
            if token in ("&&", ";", "|", "||", "&"):
                if words:
                    commands.append(words)
                words = []
            elif words or not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", token):
                words.append(token)
    return commands


def _shell_commands():
    return [(page.relative_to(ROOT), words) for page, _, text in _blocks(SHELL) for words in _commands(text)]


def _flags(words):
    return {w.split("=", 1)[0] for w in words if w.startswith("--")}


@functools.cache
def _help_of(words: tuple) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from vdm_fast.cli import main; sys.exit(main())",
                           *words, "--help"], capture_output=True, text=True, timeout=300, cwd="/")


def _help(words):
    """``vdm-fast WORDS --help`` through the console script's entry point, run once per command
    line, from a folder outside the checkout (the source folder would shadow the installed build)."""
    return _help_of(tuple(words))


def _subcommand_words(words):
    """``[COMMAND]`` or ``[COMMAND, SUBCOMMAND]`` (e.g. ``compress encode``) of ``vdm-fast`` words."""
    choices = re.search(r"\{([a-z,-]+)\}", _help(words[:1]).stdout)
    if choices and len(words) > 1 and words[1] in choices.group(1).split(","):
        return words[:2]
    return words[:1]


def test_the_docs_show_commands():
    assert _commands('OMP_NUM_THREADS=1 pip install ".[a,b]" && vdm-fast train \\\n  --steps 2  # a comment\n'
                     "torchrun --nproc_per_node 2 -m vdm_fast.training.train | tee log") == [
        ["pip", "install", ".[a,b]"], ["vdm-fast", "train", "--steps", "2"],
        ["torchrun", "--nproc_per_node", "2", "-m", "vdm_fast.training.train"], ["tee", "log"]]
    assert sum(words[0] == "vdm-fast" for _, words in _shell_commands()) >= 20


@pytest.mark.slow
def test_every_vdm_fast_command_in_the_docs_exists_and_takes_its_flags():
    uses = {}
    for page, words in _shell_commands():
        if words[0] == "vdm-fast":
            assert len(words) > 1 and words[1] in COMMANDS, f"{page}: {' '.join(words)} names no vdm-fast command"
            uses.setdefault(tuple(_subcommand_words(words[1:])), []).append((page, words))
    assert {"train", "evaluate", "sample", "check", "export", "curves"} <= {key[0] for key in uses}
    for key, found in uses.items():
        proc = _help(list(key))
        assert proc.returncode == 0, f"vdm-fast {' '.join(key)} --help exited {proc.returncode}: {proc.stderr}"
        options = set(re.findall(r"--[A-Za-z0-9_-]+", proc.stdout))
        for page, words in found:
            missing = _flags(words) - options
            assert not missing, f"{page}: {' '.join(words)}: vdm-fast {' '.join(key)} has no {sorted(missing)}"


@pytest.mark.slow
def test_every_module_script_and_extra_in_the_docs_exists():
    modules = {module: name for name, (module, _) in COMMANDS.items()}
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    checked = 0
    for page, words in _shell_commands():
        if words[0] in ("python", "torchrun") and "-m" in words:
            module = words[words.index("-m") + 1]
            if module.startswith("vdm_fast"):
                assert importlib.util.find_spec(module) is not None, f"{page}: no module {module}"
                if module in modules:
                    options = set(re.findall(r"--[A-Za-z0-9_-]+", _help([modules[module]]).stdout))
                    missing = _flags(words[words.index("-m") + 2:]) - options
                    assert not missing, f"{page}: {' '.join(words)}: {module} has no {sorted(missing)}"
                checked += 1
        for word in words:
            if re.fullmatch(r"(benchmarks|docs|examples|tests)/[\w/.-]+\.(py|sh)", word):
                assert (ROOT / word).is_file(), f"{page}: {' '.join(words)}: no file {word}"
                checked += 1
        if words[:2] == ["pip", "install"]:
            for word in words[2:]:
                for extra in re.findall(r"\[([\w,-]+)\]", word):
                    unknown = set(extra.split(",")) - extras
                    assert not unknown, f"{page}: {' '.join(words)}: pyproject.toml has no extra {sorted(unknown)}"
                    checked += 1
    assert checked >= 5


def _expand(path):
    """``csrc/loss.{h,cpp}`` -> ``csrc/loss.h``, ``csrc/loss.cpp``."""
    m = re.search(r"\{([^}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",") for p in _expand(path[:m.start()] + alt + path[m.end():])]


def test_every_file_the_docs_name_exists():
    """Paths in inline code: from the repository root (``tests/...``, ``csrc/...``), inside the
    package (``reference/loss.py:diffuse``) or its tests (``ops/test_loss.py``), or a test or
    benchmark by its file name."""
    checked = 0
    for page in PAGES:
        for code in re.findall(r"`([^`\n]+)`", page.read_text()):
            path = code.split(":")[0].split(" ")[0]
            if "<" in path or "*" in path:  # a pattern (csrc/<family>.cpp), not a file
                continue
            if re.fullmatch(r"(tests|benchmarks|csrc|kernels|vdm_fast|examples|docs|\.ci)/[\w./{},-]+", path):
                paths = _expand(path)
            elif re.fullmatch(r"(reference|ops|diffusion|nn|training|codec|io|integrations)/[\w.{},]+", path):
                # a module of the package, or the tests of one (tests/<package>/test_<module>.py)
                paths = [("tests/" if p.split("/")[-1].startswith("test_") else "vdm_fast/") + p for p in _expand(path)]
            elif re.fullmatch(r"bench_\w+\.py", path):
                paths = ["benchmarks/" + path]
            elif re.fullmatch(r"test_\w+\.py", path):
                assert list((ROOT / "tests").rglob(path)), f"{page.relative_to(ROOT)}: no test file {path}"
                checked += 1
                continue
            else:
                continue
            for p in paths:
                assert (ROOT / p).exists(), f"{page.relative_to(ROOT)}: `{code}` names {p}, which does not exist"
                checked += 1
    assert checked >= 50


# A pointer from code to a page, with the section it names if any: (docs/design/math.md),
# (benchmarks/RESULTS.md, "Attention block"), RESULTS.md ("The first run").
POINTER = re.compile(r"((?:docs/[\w/.-]+|(?:benchmarks/)?RESULTS)\.md)[`']*(?:(?:,|\s\()\s*(?:#|//)?\s*"
                     r"[\"'](?P<section>[^\"'\n]+)[\"'])?")


def test_the_code_points_to_pages_and_sections_that_exist():
    sources = [*ROOT.glob("vdm_fast/**/*.py"), *ROOT.glob("kernels/*.py"), *ROOT.glob("csrc/*.[ch]*"),
               *ROOT.glob("benchmarks/*.py"), ROOT / "setup.py", *ROOT.glob("tests/**/*.py"), *ROOT.glob("docs/*.py")]
    checked = 0
    for source in sources:
        for m in POINTER.finditer(source.read_text()):
            page = ROOT / (m.group(1) if "/" in m.group(1) else "benchmarks/RESULTS.md")
            where = f"{source.relative_to(ROOT)}: {m.group(0)!r}"
            assert page.is_file(), f"{where}: no page {page.relative_to(ROOT)}"
            if m.group("section"):
                headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
                assert any(h.startswith(m.group("section")) for h in headings), f"{where}: no such section"
            checked += 1
    assert checked >= 15


def test_the_readme_keeps_the_markers_that_ci_reads():
    readme = (ROOT / "README.md").read_text()
    for marker, command in (("<!-- main job -->", 'pip install ".[train,plot]" && vdm-fast train'),
                            ("<!-- ci: test command -->", 'pip install ".[test,integrations,docs]" && pytest')):
        after = readme.split(marker, 1)[1].lstrip("\n").splitlines()
        assert after[0] == "```bash" and after[1] == command, (marker, after[:2])
    assert len(readme.splitlines()) <= 160


def _snippets():
    """``(page, index)`` of the Python blocks that run as shown: all but those whose first line
    says what they need (``# needs a run folder ...``)."""
    return [(page.relative_to(ROOT), i) for page in PAGES for i, (_, language, code) in
            enumerate((page, m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text()))
            if language == "python" and not code.startswith("# needs")]


@pytest.mark.parametrize("page,index", _snippets())
def test_the_python_snippets_run(page, index):
    code = list(FENCE.finditer((ROOT / page).read_text()))[index].group(2)
    exec(compile(code, f"{page}, block {index}", "exec"), {"__name__": "snippet"})


def test_most_snippets_run():
    assert len(_snippets()) >= 4


@pytest.mark.parametrize("module_name", REFERENCE_MODULES)
def test_what_the_api_reference_shows_has_docstrings(module_name):
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None) or [
        name for name, obj in vars(module).items() if not name.startswith("_") and
        (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module_name]
    assert names
    for name in names:
        obj = getattr(module, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        assert inspect.getdoc(obj), f"{module_name}.{name} has no docstring"
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if inspect.isfunction(member) and not attr.startswith("_") and attr != "forward":
                    assert member.__doc__, f"{module_name}.{name}.{attr} has no docstring"


def test_the_figures_are_the_ones_results_md_records():
    """benchmarks/figures.json copies RESULTS.md's figures for docs/figures.py: each number of it
    (bar the recipe runs' own json files, which figures.py reads directly) is in RESULTS.md."""
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    recorded = {float(n) for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", results)}
    data = json.loads((ROOT / "benchmarks" / "figures.json").read_text())

    def numbers(value):
        if isinstance(value, dict):
            return [n for v in value.values() for n in numbers(v)]
        if isinstance(value, list):
            return [n for v in value for n in numbers(v)]
        return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []

    values = numbers({k: v for k, v in data.items() if k != "first_run"})
    assert len(values) > 40
    missing = [v for v in values if float(v) not in recorded]
    assert not missing, f"numbers of benchmarks/figures.json not in RESULTS.md: {missing}"
    for run in data["first_run"]["runs"]:
        for db in run["db"]:
            assert {"default", "preset"} <= set(json.loads((ROOT / "benchmarks" / db).read_text()))


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs is not installed: pip install '.[docs]' (CI installs it)")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The API reference was generated from the docstrings, and RESULTS.md became a page.
    assert 'id="vdm_fast.ops.reconstruction_loss"' in (site / "reference" / "ops" / "index.html").read_text()
    assert 'id="vdm_fast.io.load_model"' in (site / "reference" / "io" / "index.html").read_text()
    assert "Measured results" in (site / "results" / "index.html").read_text()
