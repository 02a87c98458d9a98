"""The benchmark scripts run (quick mode, on whatever device is here) and write their results."""
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))


def test_sweep_quick(tmp_path):
    import sweep

    rows = sweep.main(["--quick", "--out", str(tmp_path / "sweep.json")])
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["meta"]["bandwidth_gbps"] > 0 and len(rows) == len(data["rows"]) == 8
    assert all(r["floor_ms"] > 0 and r["loop_floor_ms"] >= r["floor_ms"] for r in rows)
    assert (tmp_path / "sweep.md").read_text().count("\n|") >= 9


def test_e2e_decode_quick(tmp_path):
    pytest.importorskip("transformers")
    import e2e_decode

    rows = e2e_decode.main(["--quick", "--new-tokens", "3", "--out", str(tmp_path / "e2e.json")])
    assert len(rows) == 4
    assert all(r["steered_tok_s"] > 0 and r["unsteered_tok_s"] > 0 and r["literal_tok_s"] > 0 for r in rows)


def test_cpu_floor_quick(tmp_path):
    import cpu_floor

    rows = cpu_floor.main(["--quick", "--out", str(tmp_path / "floor.json")])
    assert {(r["form"], r["B"]) for r in rows} == {(f, b) for f in ("hidden", "logits") for b in cpu_floor.BATCHES}
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 and r["x_floor"] == r["ms"] / r["floor_ms"] for r in rows)
    assert (tmp_path / "floor.md").read_text().count("\n|") >= 5
