"""core/atomic: the write-or-compare record that export chunks and sweep cells are checked against."""

from __future__ import annotations

import json
from pathlib import Path

from dip_lightning.core.atomic import write_or_compare_json


def test_a_record_is_written_once_then_compared(tmp_path: Path) -> None:
    path = tmp_path / "folder" / "job.json"
    record = {"seed": 0, "num_samples": 10}
    assert write_or_compare_json(path, record) == []
    assert json.loads(path.read_text()) == record
    assert write_or_compare_json(path, dict(record)) == []
    assert write_or_compare_json(path, {"seed": 1, "num_samples": 10, "extra": True}) == ["extra", "seed"]
    assert json.loads(path.read_text()) == record  # a differing record changes nothing
