#!/usr/bin/env bash
# Validates the deployment artifacts: every JSON and YAML file under deploy/
# parses, and Prometheus configurations pass `promtool check config`.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
while IFS= read -r -d '' f; do
  if ! .venv/bin/python -c 'import json,sys; json.load(open(sys.argv[1]))' "$f"; then
    echo "invalid JSON: $f" >&2; status=1
  fi
done < <(find deploy -name '*.json' -print0)
while IFS= read -r -d '' f; do
  # CloudFormation short-form tags (!Ref, !Sub, ...) are accepted as plain values.
  if ! .venv/bin/python - "$f" <<'PY'
import sys, yaml
class Loader(yaml.SafeLoader): pass
Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
yaml.load(open(sys.argv[1]), Loader=Loader)
PY
  then echo "invalid YAML: $f" >&2; status=1; fi
done < <(find deploy -name '*.yml' -print0 -o -name '*.yaml' -print0)
for f in deploy/prometheus/*.yml; do
  promtool check config --syntax-only "$f" >/dev/null || { echo "promtool rejects $f" >&2; status=1; }
done
[ "$status" = 0 ] && echo "deploy artifacts: all valid"
exit "$status"
