#!/usr/bin/env python3
"""Check golden files against manifest.yaml (standard library only).

    python3 golden/verify.py [--dir DIR]

Exits 1 if a listed file is missing or its size / SHA-256 differs.
"""

import argparse
import hashlib
import re
import sys
from pathlib import Path


def parse_manifest(text):
    entries, cur = [], None
    for line in text.splitlines():
        m = re.match(r"^- path: (.+)$", line)
        if m:
            cur = {"path": m.group(1).strip()}
            entries.append(cur)
            continue
        m = re.match(r"^  (sha256|size): (.+)$", line)
        if m and cur is not None:
            cur[m.group(1)] = m.group(2).strip()
    return entries


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parent))
    d = Path(ap.parse_args().dir)
    entries = parse_manifest((d / "manifest.yaml").read_text())
    bad = 0
    for e in entries:
        p = d / e["path"]
        if not p.is_file():
            print(f"MISSING  {e['path']}")
            bad += 1
            continue
        data = p.read_bytes()
        if len(data) != int(e["size"]) or hashlib.sha256(data).hexdigest() != e["sha256"]:
            print(f"CHANGED  {e['path']}")
            bad += 1
    print(f"{len(entries) - bad} passed, {bad} failed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
