"""Families through the steps a user runs, as benchmarks/families.py sweeps all of them: a tiny
config derived from the family's defaults, `export` (dynamo), `convert` static (reproduces the
export) and top-p with a tiny threshold (the same PyTorch model routed to one expert). Here the
families that need more than the common gate forms: skip classes, dense and select-only gates,
looped experts the exporter cannot take as they are. (A family whose sequence axis torch.export
cannot keep dynamic is one clear line: test_export.py.)"""
import pytest

from helpers import benchmark

pytestmark = pytest.mark.torch

F = benchmark("families")

FAMILIES = {f[0]: f for f in F.families()}
CONVERT = ["zaya", "dbrx", "longcat_flash", "phimoe", "llama4_text", "deepseek_v4", "inkling_text", "doge", "jetmoe"]


@pytest.mark.parametrize("family", CONVERT)
def test_family_converts_right(family):
    row = F.run_family(FAMILIES[family])
    assert row["status"] == "ok", row
    assert row["routers"] >= 1
    if family != "zaya":  # ZAYA routes one expert per token (its only configuration)
        assert row["top1_vs_k_model"] > 100 * row["top1_vs_k1_model"]
