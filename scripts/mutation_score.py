"""Mutation score of core/ and segmentation/ per module, with mutmut and a per-module test selection.

    pip install -e ".[mutation]"
    python scripts/mutation_score.py                                # every group of [tool.mutation_score]
    python scripts/mutation_score.py core.metrics.detection core.data.splits   # some modules (their groups' tests)
    python scripts/mutation_score.py --group metrics --group engine
    python scripts/mutation_score.py --no-run                       # the last verdicts of every group, no run

pyproject.toml's ``[[tool.mutation_score.group]]`` tables put every module of core/ and segmentation/ in exactly one
group, with the test files that judge it (its unit tests; the end-to-end tests are left out, they would make every
low-level mutant run minutes of pipeline). For each group this script makes a scratch copy ``.mutation/<group>/``
(links to the sources, and pyproject.toml with ``only_mutate`` and the test selection of that group written into
[tool.mutmut]) and runs ``mutmut run`` there. mutmut copies the sources to ``mutants/``, learns in one pass over the
group's tests which tests reach each function, then runs only those tests for each mutant (forked, two at a time on 2
cores). It resumes: a rerun tests only new or changed functions, unless the group's tests changed (then the group
starts afresh, since mutmut alone would keep the old verdicts).

Prints, per module, killed / survived / timed out / other (no tests reach it, skipped, suspicious) and the score
killed / (killed + survived + timed out): a timeout counts against the score. ``--out FILE`` also writes the table and
the survivors. To look at one survivor: ``cd .mutation/<group> && mutmut show <name>``. Not part of CI (a whole run
takes long); run it before resolving an issue that touches these packages.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parents[1]
WORK = ".mutation"


@dataclass(frozen=True)
class Group:
    name: str
    modules: tuple[str, ...]   # glob patterns of files, relative to the repository root
    tests: tuple[str, ...]


class ConfigError(ValueError):
    pass


def module_of(mutant: str) -> str:
    """``core.metrics.detection.x_iou__mutmut_3`` -> ``core.metrics.detection`` (methods: ``xǁClassǁm__mutmut_1``)."""
    parts = mutant.split(".")
    for i, p in enumerate(parts):
        if p.startswith("x_") or p.startswith("xǁ"):
            return ".".join(parts[:i])
    return ".".join(parts[:-1])


def dotted(path: str) -> str:
    """``core/metrics/detection.py`` -> ``core.metrics.detection``; a package's ``__init__.py`` -> the package."""
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def load_groups(pyproject: Path = REPO / "pyproject.toml") -> tuple[dict, list[Group]]:
    data = tomllib.loads(pyproject.read_text("utf-8"))
    tool = data.get("tool", {})
    if "mutmut" not in tool or "group" not in tool.get("mutation_score", {}):
        raise ConfigError(f"{pyproject}: expected [tool.mutmut] and [[tool.mutation_score.group]] tables. "
                          "Fix: restore them from the repository's pyproject.toml.")
    groups = [Group(g["name"], tuple(g["modules"]), tuple(g["tests"])) for g in tool["mutation_score"]["group"]]
    return tool["mutmut"], groups


def matches(path: str, pattern: str) -> bool:
    """Glob match in which ``*`` stays inside one folder: ``core/data/*.py`` holds no file of core/data/synthetic/."""
    p, q = PurePosixPath(path), PurePosixPath(pattern)
    return len(p.parts) == len(q.parts) and p.match(pattern)


def assign_modules(groups: list[Group], root: Path = REPO) -> dict[str, Group]:
    """Each source file of [tool.mutmut].source_paths -> its one group. A file in no group, or in two, is an error
    (a new module must be given its tests); so is a test file that does not exist."""
    owner: dict[str, Group] = {}
    files = sorted(str(p.relative_to(root)) for d in ("core", "segmentation") for p in (root / d).rglob("*.py")
                   if "__pycache__" not in p.parts)
    for f in files:
        hits = [g for g in groups if any(matches(f, pat) for pat in g.modules)]
        if len(hits) != 1:
            where = "no group" if not hits else "groups " + ", ".join(g.name for g in hits)
            raise ConfigError(f"{f} is in {where} of [[tool.mutation_score.group]] in pyproject.toml. "
                              "Fix: list it in exactly one group, with the test files that test it.")
        owner[f] = hits[0]
    for g in groups:
        missing = [t for t in g.tests if not (root / t).is_file()]
        if missing:
            raise ConfigError(f"group {g.name!r} of [[tool.mutation_score.group]] names missing test files {missing}. "
                              "Fix: correct the paths in pyproject.toml.")
    return owner


def mutmut_table(base: dict, only_mutate: list[str], tests: list[str]) -> str:
    """The [tool.mutmut] table of a group's scratch copy. JSON strings, numbers, booleans and lists are valid TOML
    values, so each value is written with ``json.dumps``."""
    cfg = {**base, "only_mutate": only_mutate, "pytest_add_cli_args_test_selection": tests}
    return "[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.items())


def with_mutmut_table(pyproject_text: str, table: str) -> str:
    """pyproject.toml's text with its [tool.mutmut] and [tool.mutation_score...] tables replaced by ``table``."""
    kept, skip = [], False
    for line in pyproject_text.splitlines(keepends=True):
        header = re.match(r"\s*\[\[?([^\]]+)\]\]?\s*$", line)
        if header:
            skip = header.group(1).strip().startswith(("tool.mutmut", "tool.mutation_score"))
        if not skip:
            kept.append(line)
    return "".join(kept).rstrip("\n") + "\n\n" + table


def prepare(group: Group, files: list[str], base: dict, root: Path = REPO) -> Path:
    """The scratch copy of a group: links to the repository's entries, and its own pyproject.toml."""
    work = root / WORK / group.name
    work.mkdir(parents=True, exist_ok=True)
    for entry in [*base["source_paths"], *base.get("also_copy", []), "tests/"]:
        name = entry.rstrip("/")
        link = work / name
        if not link.exists() and (root / name).exists():
            link.symlink_to(root / name)
    text = with_mutmut_table((root / "pyproject.toml").read_text("utf-8"), mutmut_table(base, files, list(group.tests)))
    target = work / "pyproject.toml"
    if not target.exists() or target.read_text("utf-8") != text:
        target.write_text(text, "utf-8")
    return work


def _functions(path: Path) -> dict[str, ast.AST]:
    tree = ast.parse(path.read_text("utf-8"))
    return {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _differences(a, b, ancestors: tuple = ()):
    """Yield the ancestor chain of every place where two ASTs differ."""
    if type(a) is not type(b):
        yield ancestors
    elif isinstance(a, ast.AST):
        for field in a._fields:
            if field in ("name",) and isinstance(a, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue  # x_f__mutmut_orig vs x_f__mutmut_3
            yield from _differences(getattr(a, field, None), getattr(b, field, None), ancestors + (a,))
    elif isinstance(a, list):
        if len(a) != len(b):
            yield ancestors
        else:
            for x, y in zip(a, b):
                yield from _differences(x, y, ancestors)
    elif a != b:
        yield ancestors


def message_only(original: ast.AST, mutant: ast.AST) -> bool:
    """True when every difference between the two functions lies inside a ``raise`` statement's exception arguments
    (the wording of an error message, or the message dropped). Such mutants change no computed value; they are
    reported apart from the others, not counted as killed."""
    diffs = list(_differences(original, mutant))
    return bool(diffs) and all(any(isinstance(n, ast.Raise) for n in chain) for chain in diffs)


def classify_survivors(mutants_root: Path, names: list[str]) -> dict[str, str]:
    """mutant name -> "message" (only a raised exception's message changed) or "code"."""
    out, cache = {}, {}
    for name in names:
        module, _, func = name.rpartition(".")
        kind = "code"
        path = mutants_root / (module.replace(".", "/") + ".py")
        if not path.is_file():
            path = mutants_root / module.replace(".", "/") / "__init__.py"
        if path.is_file():
            if path not in cache:
                cache[path] = _functions(path)
            fns = cache[path]
            orig = fns.get(func.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
            mut = fns.get(func)
            if orig is not None and mut is not None and message_only(orig, mut):
                kind = "message"
        out[name] = kind
    return out


def tests_digest(group: Group, root: Path = REPO) -> str:
    """A hash of what judges the group's mutants: its test files and the shared test helpers. mutmut keeps a verdict
    while the mutated function is unchanged, even when the tests changed; this digest tells the script to start the
    group afresh then."""
    h = hashlib.sha256()
    for rel in sorted({*group.tests, *(str(p.relative_to(root)) for p in (root / "tests").glob("*.py")
                                       if not p.name.startswith("test_"))}):
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()


def parse_results(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and name:
            out[name] = status.strip()
    return out


def score_table(results: dict[str, str], kinds: dict[str, str] | None = None) -> str:
    """Per module: killed, survived (and how many of those change only a raised exception's message), timed out,
    other (no test reaches the mutant, skipped, suspicious); score = killed / (killed + survived + timeout); the
    last column sets the message-only survivors aside (neither killed nor counted)."""
    kinds = kinds or {}
    counts: dict[str, Counter] = defaultdict(Counter)
    for name, status in results.items():
        counts[module_of(name)][status] += 1
        if status == "survived" and kinds.get(name) == "message":
            counts[module_of(name)]["message"] += 1
    rows = ["| module | killed | survived (message only) | timeout | other | score | score, messages set aside |",
            "|---|---|---|---|---|---|---|"]
    total: Counter = Counter()
    for mod in sorted(counts):
        total.update(counts[mod])
        rows.append(_row(mod, counts[mod]))
    rows.append(_row("**all**", total))
    return "\n".join(rows)


def _row(name: str, c: Counter) -> str:
    k, s, t, msg = c["killed"], c["survived"], c["timeout"], c["message"]
    other = sum(c.values()) - k - s - t - msg

    def pct(n, d):
        return f"{100 * n / d:.1f} %" if d else "-"

    return f"| {name} | {k} | {s} ({msg}) | {t} | {other} | {pct(k, k + s + t)} | {pct(k, k + s + t - msg)} |"


def write_report(path: Path, results: dict[str, str], kinds: dict[str, str], stale: list[str] = ()) -> None:
    survivors = sorted(n for n, s in results.items() if s in ("survived", "timeout"))
    path.parent.mkdir(parents=True, exist_ok=True)
    note = f"\n\nStale groups (their tests changed since these verdicts): {', '.join(stale)}." if stale else ""
    path.write_text(score_table(results, kinds) + note + "\n\nSurvivors and timeouts (`mutmut show <name>` in "
                    f"{WORK}/<group>/ shows one):\n\n"
                    + "".join(f"- `{n}`: {results[n]}{', message only' if kinds.get(n) == 'message' else ''}\n"
                              for n in survivors))


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", help="dotted module names (default: every module of every group)")
    ap.add_argument("--group", action="append", default=[], help="run these groups of [tool.mutation_score]")
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--no-run", action="store_true", help="only report the verdicts of the last runs (a group whose "
                                                          "tests changed since is marked stale)")
    ap.add_argument("--fresh", action="store_true", help="judge every mutant again (default: only when a group's "
                                                         "tests changed, or its functions did)")
    ap.add_argument("--out", type=Path, help="also write the table and the survivors (markdown) here")
    args = ap.parse_args(argv)
    base, groups = load_groups()
    owner = assign_modules(groups)
    by_dotted = {dotted(f): f for f in owner}
    unknown = [m for m in args.modules if m not in by_dotted]
    bad_groups = [g for g in args.group if g not in {gr.name for gr in groups}]
    if unknown or bad_groups:
        raise SystemExit(f"unknown modules {unknown} / groups {bad_groups}. Modules: {sorted(by_dotted)}; groups: "
                         f"{[g.name for g in groups]}.")
    if args.modules:
        chosen = [by_dotted[m] for m in args.modules]
    else:
        chosen = [f for f, g in owner.items() if not args.group or g.name in args.group]
    exe = shutil.which("mutmut") or str(Path(sys.executable).with_name("mutmut"))
    if not Path(exe).exists():
        raise SystemExit('mutmut is not installed. Fix: pip install -e ".[mutation]".')
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # forked children: no thread pools
    results: dict[str, str] = {}
    kinds: dict[str, str] = {}
    stale: list[str] = []
    for group in groups:
        files = [f for f in chosen if owner[f] is group]
        if not files:
            continue
        work = prepare(group, files, base)
        digest, stamp = tests_digest(group), work / "tests.sha256"
        if args.no_run:
            if not (work / "mutants").exists():
                print(f"== group {group.name}: never run", flush=True)
                continue
            if not stamp.is_file() or stamp.read_text() != digest:
                print(f"== group {group.name}: STALE (its tests changed since its last run)", flush=True)
                stale.append(group.name)
        else:
            print(f"== group {group.name}: {len(files)} modules, tests {' '.join(group.tests)}", flush=True)
            if (work / "mutants").exists() and (args.fresh or not stamp.is_file() or stamp.read_text() != digest):
                print(f"   {'--fresh' if args.fresh else 'the tests changed'}: judging every mutant again", flush=True)
                shutil.rmtree(work / "mutants")
            run = subprocess.run([exe, "run", "--max-children", str(args.max_children)], cwd=work, env=env)
            if run.returncode:
                raise SystemExit(f"mutmut run failed in {work} (exit {run.returncode}); its output is above.")
            stamp.write_text(digest)
        out = subprocess.run([exe, "results", "--all", "true"], cwd=work, env=env, capture_output=True, text=True,
                             check=True).stdout
        wanted = {dotted(f) for f in files}
        got = {n: s for n, s in parse_results(out).items() if module_of(n) in wanted}
        results.update(got)
        kinds.update(classify_survivors(work / "mutants", [n for n, s in got.items() if s == "survived"]))
        if args.out:  # after each group, so that a long run shows its progress
            write_report(args.out, results, kinds, stale)
    table = score_table(results, kinds)
    if stale:
        table += f"\n\nStale groups (their tests changed since these verdicts): {', '.join(stale)}."
    print(table)
    return table


if __name__ == "__main__":
    main()
