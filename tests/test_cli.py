"""What a user of the command line expects: help, flags anywhere, warnings, retuning a converted
model, input checks, pipes."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import FAMILY_GRAPHS, GATE_GRAPHS, GRAPHS, run_cli
from moe_export.cli import build_parser
from moe_export.conversion import routers_metadata

MIXTRAL = next(p for p in FAMILY_GRAPHS if p.stem == "mixtral")
EXE = Path(sys.executable).parent / "moe-export"


def one_line_error(r, expect):
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and expect in lines[0], r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "tokens.npy"
    np.save(p, np.random.default_rng(0).integers(0, 128, (8, 32)).astype(np.int64))
    return p


def test_no_arguments_prints_usage():
    r = run_cli()
    assert r.returncode == 2 and "usage: moe-export" in r.stderr and "convert" in r.stderr


def test_every_argument_has_help():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subs.choices.items():
        for action in sub._actions:
            assert action.help, f"moe-export {name} {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_anywhere(where, tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"")
    args = ["--debug", "inspect", tmp_path / "m.onnx"] if where == "before" else ["inspect", tmp_path / "m.onnx", "--debug"]
    r = run_cli(*args)
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.parametrize("extra, named", [(["--threshold", "0.5"], "--threshold"), (["--renormalize", "0"], "--renormalize"),
                                          (["--max-experts", "1", "--min-experts", "1"], "--min-experts, --max-experts")])
def test_static_policy_warns_about_ignored_arguments(extra, named, tmp_path):
    r = run_cli("convert", MIXTRAL, "-o", tmp_path / "m.onnx", "--policy", "static", *extra)
    assert r.returncode == 0
    assert r.stderr.startswith("moe-export: warning:") and named in r.stderr and "ignored" in r.stderr


def test_repolicy_caps_at_the_routers_width_unless_told(tmp_path):
    """A conversion capped below k, re-set without --max-experts, gets the graph's k again (the
    help's default), not the old cap."""
    capped = tmp_path / "cap1.onnx"
    assert run_cli("convert", MIXTRAL, "-o", capped, "--policy", "top-p", "--threshold", "0.5",
                   "--max-experts", "1").returncode == 0
    assert "experts=1..1" in run_cli("inspect", capped).stdout
    assert run_cli("convert", capped, "-o", tmp_path / "re.onnx", "--repolicy", "--policy", "top-p",
                   "--threshold", "0.6").returncode == 0
    assert "experts=1..2" in run_cli("inspect", tmp_path / "re.onnx").stdout


def test_a_misspelt_layer_in_per_layer_is_refused(tmp_path):
    from moe_export import MoeExportError
    from moe_export.conversion import Policy, convert

    with pytest.raises(MoeExportError, match="'nosuchlayer', not a MoE layer of this graph"):
        convert(MIXTRAL, tmp_path / "x.onnx", Policy("top-p", 0.5, per_layer={"nosuchlayer": 0.3}))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, kw, expect", [
    (("top-p",), {}, "needs a threshold"),
    (("top-p", 0.5), {"max_experts": 0}, "max_experts must be a whole number >= 1"),
    (("top-p", 0.5), {"max_experts": 2.5}, "max_experts must be a whole number"),
    (("top-p", 0.5), {"min_experts": "2"}, "min_experts must be a whole number"),
    (("top-p", "half"), {}, "threshold must be a number"),
    (("top-q", 0.5), {}, "unknown policy"),
])
def test_the_api_policy_refuses_what_the_command_line_refuses(args, kw, expect):
    """Before, max_experts 0 became k and 2.5 became 2, silently; a missing threshold became 0."""
    from moe_export import MoeExportError
    from moe_export.conversion import Policy

    with pytest.raises(MoeExportError, match=expect):
        Policy(*args, **kw)


def test_per_layer_thresholds_without_a_default_cover_every_layer(tmp_path):
    """With no threshold, a layer per_layer leaves out has none: refused, not routed at 0."""
    from moe_export import MoeExportError
    from moe_export.conversion import Policy, convert
    from moe_export.model.graph import load_model
    from moe_export.rules.base import find_gates

    layers = [g.name for g in find_gates(load_model(MIXTRAL))[0]]
    with pytest.raises(MoeExportError, match=f"no threshold for layer {layers[1]}"):
        convert(MIXTRAL, tmp_path / "x.onnx", Policy("top-p", per_layer={layers[0]: 0.5}))
    convert(MIXTRAL, tmp_path / "y.onnx", Policy("top-p", per_layer={n: 0.5 for n in layers}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y.onnx"]


def test_the_api_wants_a_policy_object(tmp_path):
    from moe_export import MoeExportError
    from moe_export.conversion import convert

    with pytest.raises(MoeExportError, match="must be a moe_export Policy"):
        convert(MIXTRAL, tmp_path / "x.onnx", "top-p")


def test_converted_model_is_retuned_not_reconverted(tokens, tmp_path):
    conv = tmp_path / "conv.onnx"
    assert run_cli("convert", MIXTRAL, "-o", conv, "--policy", "top-p", "--threshold", "0.5").returncode == 0
    line = one_line_error(run_cli("convert", conv, "-o", tmp_path / "x.onnx"), "already converted")
    assert "--repolicy" in line and not (tmp_path / "x.onnx").exists()
    # --repolicy re-sets the policy of the DynamicRouter nodes
    r = run_cli("convert", conv, "-o", tmp_path / "ratio.onnx", "--repolicy", "--policy", "ratio", "--threshold", "0.4",
                "--renormalize", "0.25")
    assert r.returncode == 0, r.stderr
    m = onnx.load(str(tmp_path / "ratio.onnx"))
    routers = [n for n in m.graph.node if n.op_type == "DynamicRouter"]
    assert len(routers) == 2
    for n in routers:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["policy"] == b"ratio" and attrs["threshold"] == pytest.approx(0.4) and attrs["renormalize"] == 0.25
    assert "renormalize=0.25" in run_cli("inspect", tmp_path / "ratio.onnx").stdout
    one_line_error(run_cli("convert", MIXTRAL, "-o", tmp_path / "y.onnx", "--policy", "ratio", "--threshold", "0.4",
                           "--renormalize", "-1"), "must be in [0, 1]")
    assert not (tmp_path / "y.onnx").exists()
    assert {r["attrs"]["policy"] for r in routers_metadata(m)["routers"]} == {"ratio"}
    # static reproduces the original again, through validate
    assert run_cli("convert", conv, "-o", tmp_path / "static.onnx", "--repolicy").returncode == 0
    v = run_cli("validate", MIXTRAL, tmp_path / "static.onnx")
    assert v.returncode == 0 and "reproduces the original: yes" in v.stdout
    one_line_error(run_cli("convert", conv, "-o", tmp_path / "w.onnx", "--repolicy", "--policy", "top-p",
                           "--threshold", "0.5", "--max-experts", "4"), "router width")
    # calibrate and profile take the converted model
    cal = tmp_path / "cal.onnx"
    r = run_cli("calibrate", conv, "--data", tokens, "--target-experts", "1.5", "-o", cal, "--json")
    assert r.returncode == 0, r.stderr
    layers = json.loads(r.stdout)["layers"]
    meta = routers_metadata(onnx.load(str(cal), load_external_data=False))
    assert [x["attrs"]["threshold"] for x in meta["routers"]] == pytest.approx([x["threshold"] for x in layers])
    prof = json.loads(run_cli("profile", cal, "--data", tokens, "--json").stdout)
    for x, p in zip(layers, prof["layers"]):
        assert p["mean_experts"] == pytest.approx(x["mean_experts"], abs=0.05)
    # Retuning the original gives the same thresholds: the converted model is run routed statically.
    r0 = run_cli("calibrate", MIXTRAL, "--data", tokens, "--target-experts", "1.5", "-o", tmp_path / "c0.onnx", "--json")
    assert [x["threshold"] for x in json.loads(r0.stdout)["layers"]] == pytest.approx([x["threshold"] for x in layers])


def test_portable_conversion_cannot_be_retuned(tokens, tmp_path):
    conv = tmp_path / "p.onnx"
    assert run_cli("convert", MIXTRAL, "-o", conv, "--portable", "--policy", "top-p", "--threshold", "0.5").returncode == 0
    one_line_error(run_cli("convert", conv, "-o", tmp_path / "x.onnx", "--repolicy"), "--portable conversion")
    one_line_error(run_cli("calibrate", conv, "--data", tokens, "--target-experts", "1.5", "-o", tmp_path / "x.onnx"),
                   "--portable conversion")


def test_calibrate_checks_its_output_first(tmp_path):
    # The data file does not exist either: the output is what is reported, before any work.
    one_line_error(run_cli("calibrate", MIXTRAL, "--data", tmp_path / "none.npy", "--target-experts", "1.5",
                           "-o", tmp_path / "no" / "out.onnx"), "does not exist")


def test_calibrate_warns_when_a_layer_cannot_reach_the_target(tmp_path):
    same = tmp_path / "same.npy"
    np.save(same, np.full((4, 16), 7, dtype=np.int64))  # every token alike: counts jump from 1 to 2
    r = run_cli("calibrate", MIXTRAL, "--data", same, "--target-experts", "1.5", "-o", tmp_path / "c.onnx", "--json")
    assert r.returncode == 0, r.stderr
    warnings = json.loads(r.stdout)["warnings"]
    assert warnings and all("target 1.5" in w for w in warnings)
    assert r.stderr.count("moe-export: warning:") == len(warnings)


def test_broken_pipe_is_quiet(tokens, tmp_path):
    conv = tmp_path / "conv.onnx"
    assert run_cli("convert", MIXTRAL, "-o", conv, "--policy", "top-p", "--threshold", "0.5").returncode == 0
    r = subprocess.run(f"'{EXE}' profile '{conv}' --data '{tokens}' --json | head -1", shell=True,
                       capture_output=True, text=True)
    assert r.stdout.strip() == "{" and r.stderr == ""
    # The reader gone before the first write: still no error.
    p = subprocess.Popen([str(EXE), "profile", str(conv), "--data", str(tokens), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    assert p.wait(120) == 0 and p.stderr.read() == b""


def test_validate_deepseek_graphs_with_unordered_topk(tmp_path):
    for g in (GRAPHS / "deepseek_v3.onnx", GRAPHS / "gate_grouped_sigmoid_e64k8.onnx"):
        out = tmp_path / g.name
        assert run_cli("convert", g, "-o", out).returncode == 0
        r = run_cli("validate", g, out)
        assert r.returncode == 0 and "reproduces the original: yes" in r.stdout, r.stdout


@pytest.mark.parametrize("spec", ["seq", "=3", "seq=", "seq=abc", "seq=-1", "nosuchdim=4"])
def test_validate_rejects_malformed_dims(spec, tmp_path):
    out = tmp_path / "c.onnx"
    assert run_cli("convert", MIXTRAL, "-o", out).returncode == 0
    one_line_error(run_cli("validate", MIXTRAL, out, "--dim", spec), "--dim")


def test_validate_data_is_checked_against_the_inputs(tmp_path):
    gate = next(p for p in GATE_GRAPHS if "e8k2" in p.stem)
    out = tmp_path / "c.onnx"
    assert run_cli("convert", MIXTRAL, "-o", out).returncode == 0
    ids = np.random.default_rng(0).integers(0, 128, (2, 8))
    cases = {
        "good.npy": (ids, None),
        "good.npz": ({"input_ids": ids}, None),
        "name.npz": ({"ids": ids}, "unknown ids"),
        "dtype.npy": (ids.astype(np.float32), "the graph wants int64"),
        "rank.npy": (ids[None, None], "rank 4"),
    }
    for name, (arr, expect) in cases.items():
        f = tmp_path / name
        np.savez(f, **arr) if isinstance(arr, dict) else np.save(f, arr)
        r = run_cli("validate", MIXTRAL, out, "--data", f)
        if expect is None:
            assert r.returncode == 0 and "reproduces the original: yes" in r.stdout, r.stderr
        else:
            one_line_error(r, expect)
    # a gate graph (logits input): an .npy of logits
    gout = tmp_path / "g.onnx"
    assert run_cli("convert", gate, "-o", gout).returncode == 0
    np.save(tmp_path / "logits.npy", np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32))
    r = run_cli("validate", gate, gout, "--data", tmp_path / "logits.npy")
    assert r.returncode == 0 and "reproduces the original: yes" in r.stdout, r.stderr


@pytest.mark.torch
def test_torchscript_on_transformers_5_is_one_line(tmp_path):
    sys.path.insert(0, str(GRAPHS))
    from make_graphs import tiny_model

    tiny_model("mixtral").save_pretrained(tmp_path / "ckpt")
    r = run_cli("export", tmp_path / "ckpt", "-o", tmp_path / "m.onnx", "--exporter", "torchscript")
    if r.returncode == 0:  # a torch/transformers pair the TorchScript exporter can trace
        onnx.checker.check_model(str(tmp_path / "m.onnx"))
        return
    one_line_error(r, "torchscript exporter cannot export")
    assert r.stdout == "" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_inspect_json_explains_every_topk_and_expert_section(tmp_path):
    r = run_cli("inspect", GRAPHS / "deepseek_v3.onnx", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    taken = [t for t in rep["topk"] if t["taken_as"]]
    assert [t["taken_as"] for t in taken] == ["sigmoid_topk"] * 2
    # the group-selection TopKs are not gates, and every rule says why
    others = [t for t in rep["topk"] if not t["taken_as"]]
    assert others and all(t["why_not"] and all(t["why_not"].values()) for t in others)
    assert [x["expert_section"] for x in rep["layers"]] == ["grouped by expert"] * 2
    r = run_cli("inspect", GRAPHS / "legacy_mixtral_torchscript.onnx", "--json")
    assert {x["expert_section"] for x in json.loads(r.stdout)["layers"]} == {
        "per-expert loop (a dropped slot matches no expert)"}
