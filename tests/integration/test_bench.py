"""The benchmark keeps working: its quick mode runs end to end and writes every section."""
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_writes_results(tmp_path):
    out = tmp_path / "RESULTS.md"
    subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    text = out.read_text()
    for heading in ("## Offline (pcap file)", "## API latency after a replay", "## Live capture on a veth pair",
                    "## CPU at a fixed rate"):
        assert heading in text
    assert "| **ratio** |" in text and "GET /metrics" in text
