"""Bench section scale: registered, and its report and metrics (the torchrun equality itself: tests/probes)."""
from __future__ import annotations

from experiments.bench.report import _scale_markdown, metrics_of
from experiments.bench.run import SECTIONS

SCALE = {"extraction": {"n": 2048, "model": "steps_deit_micro", "shard_size": 256, "ips_1": 200.0,
                        "ips_2": 340.0, "identical": False, "speedup": 1.7},
         "memory": {"command": "probe train ...", "img": 224, "kb_per_image": 6.4, "data_wait_share": [0.1, None],
                    "rows": [{"n": 200, "tree_mib": 900.0, "main_mib": 500.0},
                             {"n": 1000, "tree_mib": 905.0, "main_mib": 501.0}]}}


def test_scale_section_reports_and_logs():
    assert "scale" in SECTIONS
    m = metrics_of({"scale": SCALE})
    assert m == {"scale.extract_ips.1": 200.0, "scale.extract_ips.2": 340.0, "scale.extract_speedup": 1.7,
                 "scale.extract_identical": 0.0, "scale.rss_kb_per_image": 6.4, "scale.data_wait_share": 0.1}
    text = "\n".join(_scale_markdown(SCALE))
    assert "| 2 | 340 |" in text and "byte-identical: NO" in text and "6.4 KB" in text and "10%" in text
    no_memory = "\n".join(_scale_markdown({"extraction": SCALE["extraction"]}))
    assert "Peak RSS" not in no_memory
