"""`python -m core report --runs A B ... --out DIR`: figures (standalone HTML) and tables (CSV)."""

from __future__ import annotations

from ..analysis.report import build_report


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="figures (standalone HTML) and tables (CSV) for some runs")
    p.add_argument("--runs", nargs="+", required=True, help="run folders (or names under runs/ or checkpoints/)")
    p.add_argument("--out", required=True, help="folder to write into")
    p.set_defaults(func=run)


def run(args) -> int:
    files = build_report(args.runs, args.out)
    print(f"wrote {len(files)} files; open {files[0]}")
    return 0
