"""The scale benchmark's generator and conversion, at full layer count (weights file kept small)."""
import onnx

from helpers import benchmark, run_cli

scale = benchmark("scale")
make_graph, sha256 = scale.make_graph, scale.sha256


def test_48_layers_convert_with_weights_untouched(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    model, nbytes = make_graph(tmp_path / "in", layers=48, experts=128, gib=0.25)
    before = sha256(tmp_path / "in" / "weights.bin")
    r = run_cli("convert", model, "-o", tmp_path / "out" / "m.onnx", "--policy", "ratio", "--threshold", "0.5")
    assert r.returncode == 0, r.stderr
    out = onnx.load(str(tmp_path / "out" / "m.onnx"), load_external_data=False)
    assert sum(n.op_type == "DynamicRouter" for n in out.graph.node) == 48
    assert not any(n.op_type == "TopK" for n in out.graph.node)
    data = tmp_path / "out" / "m.onnx.data"  # a copy named after the output, never a link
    assert data.stat().st_size == nbytes and sha256(data) == before and data.stat().st_nlink == 1
    assert sha256(tmp_path / "in" / "weights.bin") == before
    assert {e.value for t in out.graph.initializer for e in t.external_data if e.key == "location"} == {"m.onnx.data"}
