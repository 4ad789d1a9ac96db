"""`csra api` refuses to listen beyond loopback without an API key (the CLI's --host, not only the setting)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.stack import free_port


def test_api_on_all_interfaces_without_a_key_refuses_to_start():
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSRA_")}
    result = subprocess.run([sys.executable, "-m", "csra.cli", "api", "--host", "0.0.0.0", "--port", str(free_port())],
                            env=env, capture_output=True, text=True, timeout=60)
    said = " ".join(result.stderr.split())
    assert result.returncode == 2 and "without an API key" in said and "CSRA_API_KEY" in said, result.stderr
    assert "Traceback" not in said
