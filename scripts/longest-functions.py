#!/usr/bin/env python3
"""The N longest functions of the product (non-test code under src/, the test tools in src/bin
excluded), from signature to closing brace: scripts/longest-functions.py [ROOT] [N]."""
import os, re, sys
root = sys.argv[1] if len(sys.argv) > 1 else "."
n = int(sys.argv[2]) if len(sys.argv) > 2 else 5
fn_re = re.compile(r'^(\s*)(pub(\([a-z]+\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+([A-Za-z0-9_]+)')
out = []
for dirpath, _, files in os.walk(os.path.join(root, 'src')):
    if '/src/bin' in dirpath + '/':
        continue
    for f in files:
        if not f.endswith('.rs') or f == 'tests.rs':
            continue
        path = os.path.join(dirpath, f)
        lines = open(path).read().split('\n')
        # cut #[cfg(test)] modules
        end = len(lines)
        for i, l in enumerate(lines):
            if l.startswith('#[cfg(test)]'):
                end = i
                break
        lines = lines[:end]
        for i, l in enumerate(lines):
            m = fn_re.match(l)
            if not m:
                continue
            indent = m.group(1)
            # body start: the line with '{' ending the signature
            j = i
            while j < len(lines) and not lines[j].rstrip().endswith('{') and not lines[j].rstrip().endswith(';'):
                j += 1
            if j >= len(lines) or lines[j].rstrip().endswith(';'):
                continue
            k = j + 1
            while k < len(lines) and lines[k] != indent + '}':
                k += 1
            out.append((k - i + 1, os.path.relpath(path, root), m.group(7)))
out.sort(reverse=True)
for length, path, name in out[:n]:
    print(f"{length:4d}  {path}  {name}")
