"""The API process never imports torch (nor transformers): it stays small and starts fast."""

from __future__ import annotations

import subprocess
import sys


def test_api_does_not_import_torch():
    code = "import sys, api.main; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
