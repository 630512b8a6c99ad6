"""Put a freshly printed markdown table into paper_schedule.md under its own heading, and nowhere else.

The document holds two tables whose rows have the same cell names (Table 2 and the filter norms), so a
refresh by hand can paste one table's rows over the other's; ``--into`` on progress.py and norms.py
replaces only the first table of the named section.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _sections(lines: list[str]):
    """Yield (index, is_heading, in_code) for each line: headings inside ``` fences are not headings."""
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
            yield i, False, True
            continue
        yield i, (not fenced and line.startswith("#")), fenced


def replace_table(doc: Path, heading: str, table: list[str]) -> int:
    """Replace the first table (a block of lines starting with ``|``) between ``heading`` (a whole line,
    for example ``"## Table 2 so far"``) and the next heading by ``table``; returns the rows written.
    Exits with a one-line message naming the file and heading where either is missing."""
    if not doc.is_file():
        sys.exit(f"{doc}: no such file")
    lines = doc.read_text().splitlines(keepends=True)
    marks = list(_sections(lines))
    start = next((i for i, head, _ in marks if head and lines[i].rstrip("\n") == heading), None)
    if start is None:
        sys.exit(f"{doc}: no heading {heading!r}")
    end = next((i for i, head, _ in marks[start + 1:] if head), len(lines))
    first = next((i for i, _, code in marks[start + 1:end] if not code and lines[i].startswith("|")), None)
    if first is None:
        sys.exit(f"{doc}: no table under {heading!r}")
    last = first
    while last + 1 < end and lines[last + 1].startswith("|"):
        last += 1
    new = lines[:first] + [row.rstrip("\n") + "\n" for row in table] + lines[last + 1:]
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text("".join(new))
    tmp.replace(doc)  # whole or not at all: an interrupted refresh leaves the document as it was
    return len(table)


def add_into_args(parser: argparse.ArgumentParser, section: str) -> None:
    """``--into DOC`` and ``--section HEADING`` (default ``section``): the two scripts' shared options."""
    parser.add_argument("--into", type=Path, metavar="DOC", help="replace the table under --section in DOC instead of printing")
    parser.add_argument("--section", default=section, help="the heading (a whole line) whose table --into replaces")


def emit(table: list[str], args: argparse.Namespace, footnote: str = "") -> None:
    """Write ``table`` under ``args.section`` of ``args.into``, or print it (and ``footnote``, which the
    document states in its own words) when no ``--into`` was given."""
    if args.into:
        n = replace_table(args.into, args.section, table)
        print(f"{args.into}: {n - 2} rows under {args.section!r}")
        return
    print("\n".join(table))
    if footnote:
        print("\n" + footnote)
