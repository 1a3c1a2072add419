#!/usr/bin/env python3
"""Per-request counts from one callgrind dump (bench/floors/run).

    callgrind_counts.py DUMP REQUESTS

prints one JSON object: instructions (Ir), heap allocations and the
instructions spent in memcpy/memmove, each per request. Large copies are
`rep movsb` in glibc, which callgrind counts once per byte, so a copy of a
big value shows up here as about its size.

Allocations are the calls into the program's allocator: Rust's global
allocator entry points when the program is Rust (they sit above whichever
malloc it uses, so nothing is counted twice), else libc's malloc family.
"""

import json
import re
import sys

RUST_ALLOC = {"__rustc::__rust_alloc", "__rustc::__rust_alloc_zeroed", "__rustc::__rust_realloc"}
LIBC_ALLOC = {"malloc", "calloc", "realloc", "posix_memalign", "memalign"}
MEMCPY = re.compile(r"__mem(cpy|move)_\w+")
NAMED = re.compile(r"^(c?fn)=\((\d+)\)(?: (.*))?$")


def counts(path):
    """Calls into each function (by name), the total Ir and memcpy's own Ir."""
    names, calls = {}, {}
    total, copy_ir = 0, 0
    current, callee, in_call = None, None, False
    with open(path, encoding="utf-8", errors="replace") as dump:
        for line in dump:
            line = line.rstrip("\n")
            m = NAMED.match(line)
            if m:
                kind, ident, name = m.groups()
                if name:
                    names[ident] = name
                if kind == "fn":
                    current = names.get(ident, "")
                else:
                    callee = names.get(ident, "")
                continue
            if line.startswith("calls="):
                n = int(line[6:].split()[0])
                calls[callee] = calls.get(callee, 0) + n
                in_call = True
                continue
            if line.startswith("summary:"):
                total = int(line.split()[1])
                continue
            if line and (line[0].isdigit() or line[0] in "+-*"):
                # A cost line: after `calls=` it is the call's inclusive cost
                # (already in the callee's own lines), else the function's own.
                if in_call:
                    in_call = False
                elif MEMCPY.search(current or ""):
                    parts = line.split()
                    if len(parts) > 1:
                        copy_ir += int(parts[1])
    return names, calls, total, copy_ir


def main():
    path, requests = sys.argv[1], int(sys.argv[2])
    names, calls, total, copy_ir = counts(path)
    rust = any(n in RUST_ALLOC for n in names.values())
    allocator = RUST_ALLOC if rust else LIBC_ALLOC
    allocs = sum(n for name, n in calls.items() if name in allocator)
    print(json.dumps({
        "requests": requests,
        "instructions": round(total / requests),
        "allocations": round(allocs / requests, 1),
        "memcpy_instructions": round(copy_ir / requests),
    }))


if __name__ == "__main__":
    main()
