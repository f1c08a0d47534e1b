"""Mutation score of core/ and segmentation/ per module, with mutmut (configured in pyproject.toml, [tool.mutmut]).

    pip install -e ".[mutation]"
    python scripts/mutation_score.py                                # every module of core/ and segmentation/
    python scripts/mutation_score.py core.metrics.detection core.data.splits   # some modules

mutmut copies the sources to ``mutants/``, runs the suite once to learn which tests reach each function, then runs
only those tests for each mutant (forked, two at a time on 2 cores). It resumes: a rerun tests only new or changed
functions. Not part of CI (a whole run is long); run it before resolving an issue that touches these packages.
Prints, per module, killed / survived / timed out / other, and the score killed / (killed + survived + timed out);
``mutmut results`` lists the survivors and ``mutmut show <name>`` shows one.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
from collections import Counter, defaultdict


def module_of(mutant: str) -> str:
    """``core.metrics.detection.x_iou__mutmut_3`` -> ``core.metrics.detection`` (methods: ``xǁClassǁm__mutmut_1``)."""
    parts = mutant.split(".")
    for i, p in enumerate(parts):
        if p.startswith("x_") or p.startswith("xǁ"):
            return ".".join(parts[:i])
    return ".".join(parts[:-1])


def score_table(lines: list[str]) -> str:
    counts: dict[str, Counter] = defaultdict(Counter)
    for line in lines:
        name, sep, status = line.strip().rpartition(": ")
        if sep:
            counts[module_of(name)][status.strip()] += 1
    rows = ["| module | killed | survived | timeout | other | score |", "|---|---|---|---|---|---|"]
    total: Counter = Counter()
    for mod in sorted(counts):
        c = counts[mod]
        total.update(c)
        rows.append(_row(mod, c))
    rows.append(_row("**all**", total))
    return "\n".join(rows)


def _row(name: str, c: Counter) -> str:
    k, s, t = c["killed"], c["survived"], c["timeout"]
    other = sum(c.values()) - k - s - t
    judged = k + s + t
    return f"| {name} | {k} | {s} | {t} | {other} | {100 * k / judged:.1f} % |" if judged else \
        f"| {name} | {k} | {s} | {t} | {other} | - |"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", help="dotted module names (default: all of core/ and segmentation/)")
    ap.add_argument("--max-children", type=int, default=2)
    args = ap.parse_args(argv)
    exe = shutil.which("mutmut")
    if exe is None:
        raise SystemExit('mutmut is not installed. Fix: pip install -e ".[mutation]".')
    patterns = [f"{m}.*" for m in args.modules]
    run = subprocess.run([exe, "run", "--max-children", str(args.max_children), *patterns])
    if run.returncode:
        raise SystemExit(f"mutmut run failed (exit {run.returncode}); its output is above.")
    out = subprocess.run([exe, "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    lines = [ln for ln in out.splitlines() if not args.modules or any(module_of(ln.split(":")[0].strip()) == m
                                                                      for m in args.modules)]
    table = score_table(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
