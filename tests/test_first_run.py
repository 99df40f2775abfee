"""A new user's first commands, run from a source checkout's root.

``python -m`` and ``python -c`` put the working directory first on ``sys.path``: from the root
of a fresh clone, the source ``vdm_fast/`` (no compiled ``_C``, no ``vdm_fast.kernels``) would
shadow the installed package and every op would silently run the reference. The import stops
instead, with a message naming the fix, and the installed command ``vdm-fast`` runs the
installed build from there. The checkout is a temporary copy of the package folder (without any
compiled extension) beside an empty ``setup.py`` and ``csrc/``: never the real repository root,
whose ``vdm_fast/`` may hold an editable build.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from importlib.machinery import EXTENSION_SUFFIXES

import pytest
from helpers import needs_cpu_kernels

import vdm_fast

MESSAGE = "is being imported from its source folder"


@pytest.fixture
def checkout(tmp_path):
    """A source checkout without its build: ``vdm_fast/`` (no ``_C``), ``setup.py``, ``csrc/``."""
    package = os.path.dirname(vdm_fast.__file__)
    shutil.copytree(package, tmp_path / "vdm_fast",
                    ignore=shutil.ignore_patterns("_C*", "*.so", "*.pyd", "__pycache__"))
    shutil.rmtree(tmp_path / "vdm_fast" / "kernels", ignore_errors=True)  # an installed copy holds them
    assert not [p for p in (tmp_path / "vdm_fast").iterdir() if p.name.startswith("_C")]
    (tmp_path / "setup.py").write_text("")
    (tmp_path / "csrc").mkdir()
    return tmp_path


def _vdm_fast_command():
    beside = os.path.join(os.path.dirname(sys.executable), "vdm-fast")
    command = beside if os.path.isfile(beside) else shutil.which("vdm-fast")
    if command is None:
        pytest.skip("the vdm-fast console script is not installed (pip install . registers it)")
    return command


def test_importing_the_source_folder_of_an_unbuilt_checkout_stops_with_the_fix(checkout):
    proc = subprocess.run([sys.executable, "-c", "import vdm_fast"], capture_output=True, text=True, timeout=120,
                          cwd=checkout)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and MESSAGE in proc.stderr, proc.stderr
    assert str(checkout / "vdm_fast") in proc.stderr
    for fix in ("vdm-fast train", "pip install -e ."):
        assert fix in proc.stderr, proc.stderr
    assert "RuntimeWarning" not in proc.stderr  # stopped before backend.py tried vdm_fast._C


def test_python_m_pytest_from_the_checkout_root_stops_with_the_message(checkout):
    (checkout / "pytest.ini").write_text("[pytest]\n")
    (checkout / "tests").mkdir()
    (checkout / "tests" / "test_imports.py").write_text("import vdm_fast\n\n\ndef test_nothing():\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, timeout=300, cwd=checkout)
    assert proc.returncode != 0
    assert MESSAGE in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_a_checkout_built_in_place_still_imports(checkout):
    """An editable install builds ``_C`` into the package folder: that folder is not refused
    (here the file is a dummy, so backend.py's one warning and the reference follow)."""
    (checkout / "vdm_fast" / f"_C{EXTENSION_SUFFIXES[0]}").write_bytes(b"not a shared object")
    script = textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import vdm_fast
        print(vdm_fast.__file__)
        print(sum("vdm_fast._C" in str(w.message) for w in caught))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=checkout)
    assert proc.returncode == 0, proc.stderr
    path, warnings_seen = proc.stdout.split()
    assert path == str(checkout / "vdm_fast" / "__init__.py") and warnings_seen == "1"


def test_vdm_fast_help_lists_the_subcommands_from_the_checkout_root(checkout):
    proc = subprocess.run([_vdm_fast_command(), "--help"], capture_output=True, text=True, timeout=120,
                          cwd=checkout)
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "evaluate", "sample", "compress", "export", "check"):
        assert command in proc.stdout, proc.stdout
    assert MESSAGE not in proc.stderr


@needs_cpu_kernels
def test_vdm_fast_check_from_the_checkout_root_runs_the_installed_build(checkout):
    proc = subprocess.run([_vdm_fast_command(), "check", "--no-timing"], capture_output=True, text=True,
                          timeout=300, cwd=checkout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = proc.stdout.splitlines()[0]
    assert f"from {os.path.dirname(vdm_fast.__file__)}," in first and str(checkout) not in first, first
    assert "'extension': True" in first, first
    assert "C++ (vdm_fast._C)" in proc.stdout and proc.stdout.splitlines()[-1].endswith("0 failed")
    assert "RuntimeWarning" not in proc.stderr, proc.stderr


def test_vdm_fast_train_help_lists_the_trainers_flags(checkout):
    proc = subprocess.run([_vdm_fast_command(), "train", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=checkout)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--steps", "--out-dir", "--schedule", "--config"):
        assert flag in proc.stdout, proc.stdout


def test_the_cli_imports_no_extra_for_help_and_refuses_an_unknown_command():
    script = textwrap.dedent("""
        import contextlib, io, sys, torch
        before = set(sys.modules)
        from vdm_fast import cli
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                cli.main(["--help"])
            except SystemExit as stop:
                assert stop.code == 0, stop.code
        print([m for m in ("sklearn", "tqdm", "PIL", "yaml", "constriction", "safetensors", "msgpack")
               + tuple("vdm_fast." + c for c in cli.COMMANDS) if m in sys.modules and m not in before])
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                cli.main(["fly"])
            except SystemExit as stop:
                print(stop.code, "invalid choice" in err.getvalue())
            print(cli.main([]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "2 True", "2"], proc.stdout


def test_each_subcommand_hands_its_arguments_to_the_modules_main(monkeypatch):
    import importlib

    from vdm_fast import cli

    seen = []
    for name in ("train", "check"):
        module = importlib.import_module(cli.COMMANDS[name][0])
        monkeypatch.setattr(module, "main", lambda argv, prog, _name=name: seen.append((_name, argv, prog)) or None)
    assert cli.main(["train", "--steps", "2"]) == 0
    assert cli.main(["check", "--no-timing"]) == 0
    assert seen == [("train", ["--steps", "2"], "vdm-fast train"), ("check", ["--no-timing"], "vdm-fast check")]
    monkeypatch.setattr(importlib.import_module("vdm_fast.check"), "main", lambda argv, prog: 1)
    assert cli.main(["check"]) == 1  # check's exit status comes through


@pytest.mark.parametrize("name", ["train", "evaluate", "sample", "compress", "export", "check", "curves", "convert"])
def test_each_subcommands_usage_line_names_the_command_that_ran_it(name, capsys):
    """`vdm-fast NAME --help` shows `usage: vdm-fast NAME`, `python -m MODULE --help`
    `usage: python -m MODULE`: the line a user copies names what they typed."""
    import importlib

    from vdm_fast import cli

    module = importlib.import_module(cli.COMMANDS[name][0])
    for run, expected in ((lambda: cli.main([name, "--help"]), f"usage: vdm-fast {name} "),
                          (lambda: module.main(["--help"]), f"usage: python -m {module.__name__} ")):
        with pytest.raises(SystemExit) as stop:
            run()
        assert stop.value.code == 0
        assert capsys.readouterr().out.startswith(expected)
