#!/usr/bin/env bash
# Refresh the README's screenshots (compare.png, train.png, eval.png) from the offline zoo's real answers.
# The browser tests normally write their screenshots to a temporary folder; this points them here.
#   docs/screenshots/refresh.sh            (needs chromium at /usr/bin/chromium and the playwright package)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" GRACE_SCREENSHOTS_DIR="$PWD/docs/screenshots" GRACE_APP_TEST_ZOO=1 \
  python -m pytest -q -rs -p no:cacheprovider tests/demo/test_app_browser.py "$@"
