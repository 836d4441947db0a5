#!/usr/bin/env bash
# The README's first command runs this: generate a demo collection, train + index it, search it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin
rm -rf demo
$PY/python scripts/make_demo.py demo/photos
mkdir -p demo/photos/broken && printf 'not an image' > demo/photos/broken/notes.jpg
# 20 epochs keep the demo to about a minute on a quiet machine; leave --epochs out on real photos (a budget decides)
$PY/lookalike index demo/photos --store demo/store --epochs 20
$PY/lookalike info --store demo/store
echo; echo "Look-alikes of demo/photos/beach/beach_000.jpg (its edited copies should come first):"
$PY/lookalike search demo/photos/beach/beach_000.jpg --store demo/store -k 6
