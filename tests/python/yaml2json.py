"""Prints the YAML documents read on stdin (rendered Kubernetes manifests) as a JSON list, for
the tests' checks in Rust."""

import json
import sys

import yaml

print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))
