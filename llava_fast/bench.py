"""``llava-fast bench``: the benchmarks of ``benchmarks/`` from an installed package.

The wheel ships the benchmark scripts as ``llava_fast.benchmarks`` (setup.py maps the repository's ``benchmarks/``
there), so a user who ran ``pip install`` can time our path against the baselines on their own GPU without a clone:
``llava-fast bench model --quick``, ``llava-fast bench attention``. ``llava-fast bench`` lists them. Each script runs
as it would from a checkout (``python benchmarks/<script>.py ARGS``), with its own ``--help``.

Results: in a source checkout they go to ``benchmarks/results/`` as always; from an installed package to
``./llava_fast_results`` (or ``LLAVA_FAST_RESULTS_DIR``), never into site-packages.
"""
from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

# scripts that are not benchmarks a user runs: the shared harness, and pytest's entry point (needs the tests)
_HIDDEN = {"bench_utils", "test_model_speed"}


def bench_dir() -> Path | None:
    """The folder of the benchmark scripts: the installed ``llava_fast/benchmarks``, else the ``benchmarks/`` next to a
    source tree's ``llava_fast`` (an editable install: its import finder does not map the nested package)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llava_fast.benchmarks")
    except (ImportError, ValueError):
        spec = None
    candidates = [Path(p) for p in (spec.submodule_search_locations or [])] if spec is not None else []
    candidates.append(Path(__file__).resolve().parents[1] / "benchmarks")
    for d in candidates:
        if (d / "bench_utils.py").is_file():
            return d
    return None


def in_checkout(d: Path) -> bool:
    """Whether ``d`` is a source checkout's ``benchmarks/`` (results stay in ``benchmarks/results`` there)."""
    return (d.parent / "pyproject.toml").is_file() and (d.parent / "llava_fast").is_dir()


def _summary(path: Path) -> str:
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    except (OSError, SyntaxError, ValueError):
        return ""
    para = " ".join(doc.strip().split("\n\n")[0].split())      # the first paragraph, on one line
    sentence = para.split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= 110 else sentence[:107].rsplit(" ", 1)[0] + " ..."


def benchmarks(d: Path | None = None) -> dict[str, Path]:
    """``{name: script}``: ``bench_<op>.py`` as ``<op>``, the other tools (``aot_check``, ``decide``, ...) by name."""
    d = d or bench_dir()
    if d is None:
        return {}
    out = {}
    for p in sorted(d.glob("*.py")):
        if p.stem in _HIDDEN or p.stem.startswith("_"):
            continue
        out[p.stem[len("bench_"):] if p.stem.startswith("bench_") else p.stem] = p
    return out


def format_list(d: Path | None = None) -> str:
    d = d or bench_dir()
    if d is None:
        return ("llava-fast bench: no benchmark scripts found (neither llava_fast/benchmarks in the installed "
                "package nor benchmarks/ next to it); reinstall llava_fast, or run them from a clone: "
                "python benchmarks/bench_model.py")
    found = benchmarks(d)
    width = max(len(n) for n in found)
    ops = {n: p for n, p in found.items() if p.stem.startswith("bench_")}
    lines = [f"benchmarks in {d}", "run one: llava-fast bench NAME [ARGS] (e.g. llava-fast bench model --quick); "
             "llava-fast bench NAME --help shows its options", "", "our path against the baselines, in one run:"]
    lines += [f"  {n:<{width}}  {_summary(p)}" for n, p in ops.items()]
    lines += ["", "tools (what a GPU run decides, host time, compile checks without a GPU):"]
    lines += [f"  {n:<{width}}  {_summary(p)}" for n, p in found.items() if n not in ops]
    return "\n".join(lines)


def run(name: str, args: list[str]) -> int:
    """Run benchmark ``name`` with ``args`` as ``python <script> ARGS`` would, in this process; its exit status."""
    import runpy

    d = bench_dir()
    if d is None:
        raise FileNotFoundError(format_list(None))
    found = benchmarks(d)
    stem = Path(name).stem                    # "model", "bench_model" and "bench_model.py" name one script
    script = found.get(stem[len("bench_"):] if stem.startswith("bench_") else stem)
    if script is None:
        raise ValueError(f"no benchmark named {name!r}; choose one of: {', '.join(found)} "
                         "(llava-fast bench lists them with what each measures)")
    saved_argv, saved_path, saved_out = sys.argv, list(sys.path), os.environ.get("LLAVA_FAST_RESULTS_DIR")
    if not in_checkout(d) and not saved_out:
        out = Path.cwd() / "llava_fast_results"
        os.environ["LLAVA_FAST_RESULTS_DIR"] = str(out)
        print(f"llava-fast bench: results go to {out} (set LLAVA_FAST_RESULTS_DIR to choose)", file=sys.stderr)
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        if saved_out is None:
            os.environ.pop("LLAVA_FAST_RESULTS_DIR", None)
    return 0
