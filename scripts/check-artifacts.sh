#!/usr/bin/env bash
# Validates the deployment artifacts: every JSON and YAML file under deploy/
# parses, Prometheus configurations pass `promtool check config`, and the
# CloudFormation templates pass cfn-lint and checkov; the Dockerfile
# passes hadolint.
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
# The scrape configuration embedded in each ADOT collector configuration.
tmp=$(mktemp -d)
for f in deploy/adot/*.yaml; do
  .venv/bin/python -c 'import sys, yaml; yaml.safe_dump(yaml.safe_load(open(sys.argv[1]))["receivers"]["prometheus"]["config"], open(sys.argv[2], "w"))' \
    "$f" "$tmp/scrape.yml" && promtool check config --syntax-only "$tmp/scrape.yml" >/dev/null \
    || { echo "promtool rejects the scrape configuration of $f" >&2; status=1; }
done
rm -rf "$tmp"
.venv-lint/bin/cfn-lint deploy/cloudformation/*.yaml || { echo "cfn-lint rejects deploy/cloudformation" >&2; status=1; }
# --skip-download: no calls to the vendor's platform; only the built-in checks run.
.venv-lint/bin/checkov -d deploy/cloudformation --framework cloudformation --compact --quiet --skip-download \
  || { echo "checkov found problems in deploy/cloudformation" >&2; status=1; }
.venv-lint/bin/hadolint Dockerfile || { echo "hadolint rejects the Dockerfile" >&2; status=1; }
[ "$status" = 0 ] && echo "deploy artifacts: all valid"
exit "$status"
