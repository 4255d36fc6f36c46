"""The documentation's commands (``test_docs``, continued): every command in the shell code blocks
of README.md and docs/**/*.md names a script or module that exists and options its parser accepts.

Commands are checked without running them: the script is imported and stopped at its argument
parser (``ArgumentParser.parse_args`` parses, then raises), so no benchmark or training runs.
"""

from __future__ import annotations
import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Tuple
import pytest

from test_docs import ROOT, SHELL_LANGS, blocks, doc_files, rel


# ----------------------------------------------------------------------------- (c) commands

ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
REDIRECT = re.compile(r"(?<![^\s;&|])\d*(?:>>?|<)(?:&\d+|\s*[^\s'\"&;|]+)")


def commands(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, command) of every shell block: comments dropped, ``\\`` continuations joined,
    ``$ `` prompts removed."""
    for lang, start, body in blocks(path):
        if lang not in SHELL_LANGS:
            continue
        pending, first = "", 0
        for offset, line in enumerate(body):
            stripped = line.strip()
            if lang == "console":
                if not stripped.startswith("$ ") and not pending:
                    continue  # output
                stripped = stripped[2:] if stripped.startswith("$ ") else stripped
            if not pending and (not stripped or stripped.startswith("#")):
                continue
            if not pending:
                first = start + offset
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            yield first, pending + stripped
            pending = ""
        if pending:
            yield first, pending


UNPARSABLE = "<unparsable>"
LOOKS_CHECKED = re.compile(r"^([A-Za-z_]\w*=\S*\s+)*(nohup\s+)?(\S*/)?(python[\d.]*|oplora-bench|bash|make)\s")


def simple_commands(command: str) -> List[List[str]]:
    """The simple commands of a line: split at ``&&``, ``||``, ``;``, ``|``, ``&``; redirections,
    ``nohup`` and ``VAR=value`` prefixes removed."""
    command = REDIRECT.sub(" ", command)
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out: List[List[str]] = [[]]
    try:
        for tok in lexer:
            if tok and set(tok) <= set(";&|"):
                out.append([])
            else:
                out[-1].append(tok)
    except ValueError as e:  # unbalanced quotes: a command of ours is an error, other text is not ours
        return [[UNPARSABLE, str(e)]] if LOOKS_CHECKED.match(command) else []
    cleaned = []
    for words in out:
        while words and (ENV.match(words[0]) or words[0] in ("nohup", "env", "time", "exec")):
            words = words[1:]
        if words:
            cleaned.append(words)
    return cleaned


class _Parsed(Exception):
    """Raised by the patched ``parse_args`` once the script's options were parsed."""


@contextlib.contextmanager
def stop_at_parse_args() -> Iterator[None]:
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = real


@contextlib.contextmanager
def isolated(argv: List[str], path: Optional[Path] = None) -> Iterator[io.StringIO]:
    """sys.argv, sys.path (the script's folder first, as ``python script.py`` has it), os.environ and
    stderr restored afterwards; stderr captured (argparse's error message)."""
    saved_argv, saved_path, saved_env = sys.argv[:], sys.path[:], dict(os.environ)
    err = io.StringIO()
    sys.argv = argv
    if path is not None:
        sys.path.insert(0, str(path.parent))
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            yield err
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.environ.clear()
        os.environ.update(saved_env)


def check_parse(run, argv: List[str], path: Optional[Path] = None) -> Optional[str]:
    """Run ``run()`` (a script or ``main``) until its ``parse_args``; the parser's complaint, if any."""
    with stop_at_parse_args(), isolated(argv, path) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules ... prior to execution"
        try:
            run()
        except _Parsed:
            return None
        except SystemExit as e:
            return f"its parser refused the options (exit {e.code}): {err.getvalue().strip()[-500:]}"
    return "it never reached an argument parser"


def bench_suite_problem(args: List[str]) -> Optional[str]:
    """``oplora-bench ARGS``: the suite's own parser (``build_parser``), as ``oplora.bench.main`` picks it."""
    import oplora.bench as bench

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--suite", default="lorsum")
    known, _ = pre.parse_known_args(args)
    if known.suite not in bench.SUITES:
        return f"no suite {known.suite!r} (suites: {', '.join(sorted(bench.SUITES))})"
    module = importlib.import_module(bench.SUITES[known.suite])
    if hasattr(module, "build_parser"):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                module.build_parser().parse_args(args)
        except SystemExit as e:
            return f"its parser refused the options (exit {e.code}): {err.getvalue().strip()[-500:]}"
        return None
    return check_parse(lambda: module.main(args), ["oplora-bench", *args])


def script_problem(script: str, args: List[str]) -> Optional[str]:
    path = (ROOT / script).resolve()
    if not path.is_file():
        return f"no such script: {script}"
    source = path.read_text(encoding="utf-8")
    suite = re.search(r"main\(\[\"--suite\", \"(\w+)\"", source)
    if suite:  # bench/bench_<suite>.py: oplora-bench --suite <suite>
        return bench_suite_problem(["--suite", suite.group(1), *args])
    if "ArgumentParser" not in source and "_study" not in source:
        return f"takes no options, given {args}" if args else None
    return check_parse(lambda: runpy.run_path(str(path), run_name="__main__"), [str(path), *args], path)


def module_problem(module: str, args: List[str]) -> Optional[str]:
    if module in ("oplora.bench", "oplora.bench.__main__"):
        return bench_suite_problem(args)
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        return f"no such module: {module}"
    if module == "pytest":
        missing = [a for a in args if not a.startswith("-") and ("/" in a or a.endswith(".py"))
                   and not (ROOT / a.split("::")[0]).exists()]
        return f"no such test path: {missing}" if missing else None
    if module.startswith("oplora"):
        return check_parse(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True),
                           [module, *args])
    return None  # another tool's module (pip, venv, ...): it exists


def makefile_targets() -> set:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, flags=re.M))


def command_problem(words: List[str]) -> Optional[str]:
    """Why a simple command is wrong, or None; commands this check does not cover are None."""
    exe = words[0]
    if exe == UNPARSABLE:
        return f"cannot split it into words: {words[1]}"
    if exe.startswith(".venv/bin/") or exe.startswith("./.venv/bin/"):
        exe = exe.rsplit("/", 1)[1]
    if re.fullmatch(r"python(3(\.\d+)?)?", exe):
        rest = words[1:]
        while rest and rest[0].startswith("-") and rest[0] != "-m":
            rest = rest[1:]  # -u, -X ..., -W ...: not the module or script
        if not rest:
            return None
        if rest[0] == "-m":
            return module_problem(rest[1], rest[2:]) if len(rest) > 1 else "python -m without a module"
        if rest[0].endswith(".py"):
            return script_problem(rest[0], rest[1:])
        return None
    if exe == "oplora-bench":
        return bench_suite_problem(words[1:])
    if exe == "bash" and len(words) > 1 and words[1].endswith(".sh"):
        return None if (ROOT / words[1]).is_file() else f"no such script: {words[1]}"
    if exe == "make":
        targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        missing = [t for t in targets if t not in makefile_targets()]
        return f"no Makefile target {missing}" if missing else None
    return None


def all_commands() -> List[Tuple[str, int, str, List[str]]]:
    out = []
    for path in doc_files():
        for no, command in commands(path):
            for words in simple_commands(command):
                out.append((rel(path), no, command, words))
    return out


def checked(words: List[str]) -> bool:
    exe = words[0].rsplit("/", 1)[-1] if words[0].startswith((".venv/bin/", "./.venv/bin/")) else words[0]
    return bool(re.fullmatch(r"python(3(\.\d+)?)?", exe)) or exe in ("oplora-bench", "bash", "make", UNPARSABLE)


def test_there_are_commands_to_check():
    cmds = [c for c in all_commands() if checked(c[3])]
    assert len(cmds) >= 15
    assert any(c[3][0] == "oplora-bench" for c in cmds) and any("examples/lm_study.py" in c[3] for c in cmds)


@pytest.mark.parametrize("where, command, words", [pytest.param(f"{f}:{no}", c, w, id=f"{f}:{no}:{' '.join(w)[:60]}")
                                                   for f, no, c, w in all_commands() if checked(w)])
def test_every_documented_command_is_accepted(where, command, words):
    why = command_problem(words)
    assert why is None, f"{where}: `{command}`: {why}"


def test_the_command_check_catches_a_bad_option_and_a_missing_script():
    assert simple_commands('OMP_WAIT_POLICY=passive nohup python examples/x.py --a "b c" > log 2>&1 &') \
        == [["python", "examples/x.py", "--a", "b c"]]
    assert "refused" in command_problem(["oplora-bench", "--suite", "cpu", "--no-such-option"])
    assert command_problem(["oplora-bench", "--suite", "cpu", "--threads", "1,2", "--quiet"]) is None
    assert "no such script" in command_problem(["python", "examples/no_such_example.py"])
    assert "refused" in command_problem(["python", "examples/memory_at_scale.py", "--no-such-option"])
    assert command_problem(["python", "examples/memory_at_scale.py", "--r", "64"]) is None
    assert "no such module" in command_problem(["python", "-m", "oplora.no_such_module"])
    assert "no Makefile target" in command_problem(["make", "no-such-target"])


def test_commands_are_read_as_a_shell_reads_them(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n\n```bash\n# a comment\nOMP_WAIT_POLICY=passive oplora-bench --suite cpu \\\n"
                   "    --threads 1,2   # trailing comment\n```\n\n```python\npython examples/none.py\n```\n\n"
                   "```console\n$ .venv/bin/python -m pytest -q tests/test_docs.py\noutput line\n```\n")
    found = list(commands(doc))
    assert found == [(5, "OMP_WAIT_POLICY=passive oplora-bench --suite cpu  --threads 1,2   # trailing comment"),
                     (14, ".venv/bin/python -m pytest -q tests/test_docs.py")]
    assert simple_commands(found[0][1]) == [["oplora-bench", "--suite", "cpu", "--threads", "1,2"]]
    assert command_problem(simple_commands(found[1][1])[0]) is None
    assert "no such test path" in command_problem([".venv/bin/python", "-m", "pytest", "tests/test_nothing.py"])
    assert command_problem([".venv/bin/oplora-bench", "--suite", "memory", "--smoke"]) is None
