"""Token data given to profile, calibrate and validate --data: ids outside the vocabulary (Hugging
Face's -100 padding included), empty data, graphs exported for a fixed batch size; and the exit
codes and summaries the commands give."""
import json

import numpy as np
import onnx
import pytest

from helpers import FAMILY_GRAPHS, run_cli
from test_bad_input import assert_clean_failure

MIXTRAL = next(p for p in FAMILY_GRAPHS if p.stem == "mixtral")
VOCAB = 128  # the reference graph's embedding rows


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    assert run_cli("convert", MIXTRAL, "-o", d / "conv.onnx", "--policy", "top-p", "--threshold", "0.5").returncode == 0
    assert run_cli("convert", MIXTRAL, "-o", d / "static.onnx").returncode == 0
    ids = np.random.default_rng(0).integers(0, VOCAB, (16, 24))
    np.save(d / "ids.npy", ids)
    padded = ids.copy()
    padded[:, -5:] = -100
    np.save(d / "padded.npy", padded)
    big = ids.copy()
    big[3, 7] = VOCAB
    np.save(d / "big.npy", big)
    np.save(d / "no_rows.npy", np.zeros((0, 24), dtype=np.int64))
    np.save(d / "no_tokens.npy", np.zeros((4, 0), dtype=np.int64))
    np.savez(d / "no_rows.npz", input_ids=np.zeros((0, 24), dtype=np.int64))
    # An older export: the batch dimension fixed to 1.
    m = onnx.load(str(MIXTRAL))
    dim = m.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 1
    onnx.save(m, str(d / "batch1.onnx"))
    return d


def commands(d, data):
    return {"profile": ["profile", d / "conv.onnx", "--data", data],
            "calibrate": ["calibrate", MIXTRAL, "--data", data, "--target-experts", "1.5", "-o", d / "out.onnx"],
            "validate": ["validate", MIXTRAL, d / "conv.onnx", "--data", data]}


@pytest.mark.parametrize("command", ["profile", "calibrate", "validate"])
@pytest.mark.parametrize("data, expect", [
    ("padded.npy", f"token ids must be in [0, {VOCAB}); input 'input_ids' holds -100"),
    ("big.npy", f"token ids must be in [0, {VOCAB}); input 'input_ids' holds {VOCAB}"),
    ("no_rows.npy", "no data"),
    ("no_tokens.npy", "no data"),
    ("no_rows.npz", "is empty"),
])
def test_bad_token_data(work, command, data, expect):
    r = run_cli(*commands(work, work / data)[command])
    assert_clean_failure(r, work, expect)
    assert r.returncode == 1  # bad data, not a bad command line


def test_fixed_batch_graph_takes_its_batches(work):
    """A graph exported for batch 1 calibrates on all 16 sequences, one at a time, and says so;
    the thresholds equal those of the same graph with a dynamic batch."""
    r = run_cli("calibrate", work / "batch1.onnx", "--data", work / "ids.npy", "--target-experts", "1.5",
                "-o", work / "b1.onnx", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert "the graph takes batches of 1: the 16 rows of" in " ".join(rep["notes"])
    ref = run_cli("calibrate", MIXTRAL, "--data", work / "ids.npy", "--target-experts", "1.5",
                  "-o", work / "dyn.onnx", "--json")
    assert ref.returncode == 0, ref.stderr
    assert [x["threshold"] for x in rep["layers"]] == pytest.approx([x["threshold"] for x in json.loads(ref.stdout)["layers"]])
    prof = json.loads(run_cli("profile", work / "b1.onnx", "--data", work / "ids.npy", "--json").stdout)
    assert prof["layers"][0]["tokens"] == 16 * 24 and prof["notes"]
    assert run_cli("convert", work / "batch1.onnx", "-o", work / "b1s.onnx").returncode == 0
    v = json.loads(run_cli("validate", work / "batch1.onnx", work / "b1s.onnx", "--data", work / "ids.npy", "--json").stdout)
    assert v["batches"] == 16 and v["static_reproduces"] and v["routed_pairs"]["original"] == 2 * 16 * 24 * 2  # layers x tokens x k
    # rows the graph cannot take: still the graph's own message
    np.save(work / "one_row.npy", np.zeros((1, 24), dtype=np.int64))
    other = onnx.load(str(work / "batch1.onnx"))
    other.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3
    onnx.save(other, str(work / "batch3.onnx"))
    r = run_cli("calibrate", work / "batch3.onnx", "--data", work / "one_row.npy", "--target-experts", "1.5",
                "-o", work / "b3.onnx")
    assert r.returncode == 1 and "dimension 0 must be 3" in r.stderr


def test_validate_exit_codes(work):
    dyn = run_cli("validate", MIXTRAL, work / "conv.onnx")
    assert dyn.returncode == 0 and "DIFFERS" in dyn.stdout  # a dynamic policy is expected to differ
    strict = run_cli("validate", MIXTRAL, work / "conv.onnx", "--strict")
    assert strict.returncode == 1 and "beyond the tolerances" in strict.stderr
    ok = run_cli("validate", MIXTRAL, work / "static.onnx", "--strict")
    assert ok.returncode == 0 and "reproduces the original: yes" in ok.stdout
    assert "--strict" in run_cli("validate", "--help").stdout


@pytest.mark.parametrize("args, expect", [
    (["validate", MIXTRAL, "{d}/conv.onnx", "--atol", "-1"], "must be >= 0"),
    (["validate", MIXTRAL, "{d}/conv.onnx", "--rtol", "nan"], "finite"),
    (["validate", MIXTRAL, "{d}/conv.onnx", "--dim", "seq=0"], "only a cache length may be 0"),
    (["calibrate", MIXTRAL, "--data", "{d}/ids.npy", "--target-experts", "0", "-o", "{d}/out.onnx"], ">= 1"),
    (["calibrate", MIXTRAL, "--data", "{d}/ids.npy", "--max-ppl-increase", "5", "-o", "{d}/out.onnx"], "a fraction"),
    (["calibrate", MIXTRAL, "--data", "{d}/ids.npy", "--max-ppl-increase", "0.01", "--holdout", "1",
      "-o", "{d}/out.onnx"], "--holdout"),
    (["calibrate", MIXTRAL, "--data", "{d}/ids.npy", "--target-experts", "1.5", "--policy", "auto",
      "-o", "{d}/out.onnx"], "--max-ppl-increase"),
    # options of the other budget, which used to be ignored silently
    (["calibrate", MIXTRAL, "--data", "{d}/ids.npy", "--target-experts", "1.5", "--holdout", "0.5",
      "-o", "{d}/out.onnx"], "--holdout applies to --max-ppl-increase"),
    (["calibrate", MIXTRAL, "--data", "{d}/ids.npy", "--max-ppl-increase", "0.01", "--mode", "global",
      "-o", "{d}/out.onnx"], "--mode applies to --target-experts"),
    (["convert", MIXTRAL, "-o", "{d}/out.onnx", "--policy", "top-p", "--threshold", "nan"], "finite"),
    (["convert", MIXTRAL, "-o", "{d}/out.onnx", "--policy", "top-p", "--threshold", "1.5"], "[0, 1]"),
])
def test_usage_errors_exit_2(work, args, expect):
    r = run_cli(*[str(a).format(d=work) for a in args])
    assert_clean_failure(r, work, expect)
    assert r.returncode == 2


def test_a_holdout_that_leaves_nothing_to_fit_on_is_one_line(work):
    """16 sequences, --holdout 0.99, --check heldout: all held out (it divided by zero in the search).
    (Cross-fitting, the default, makes it two folds.)"""
    r = run_cli("calibrate", MIXTRAL, "--data", work / "ids.npy", "--max-ppl-increase", "0.01", "--holdout", "0.99",
                "--check", "heldout", "-o", work / "out.onnx")
    assert_clean_failure(r, work, "holds out all 16 sequences")
    assert r.returncode == 1


def test_a_budget_checked_on_a_few_sequences_says_so(work):
    """4 sequences: the check rests on four (cross-fitted) or one (held out), which bound nothing;
    the output is written with a warning rather than in silence."""
    ids = work / "ids4.npy"
    np.save(ids, np.load(work / "ids.npy")[:4])
    r = run_cli("calibrate", MIXTRAL, "--data", ids, "--max-ppl-increase", "0.01", "-o", work / "few.onnx")
    assert r.returncode == 0, r.stderr
    assert "checked on 4 sequences, too few to bound" in r.stderr
    r = run_cli("calibrate", MIXTRAL, "--data", ids, "--max-ppl-increase", "0.01", "--check", "heldout",
                "-o", work / "few.onnx")
    assert r.returncode == 0, r.stderr
    assert "checked on 1 sequence held out of the 4 in --data" in r.stderr
    quiet = run_cli("calibrate", MIXTRAL, "--data", work / "ids.npy", "--max-ppl-increase", "0.01",
                    "--holdout", "0.5", "--check", "heldout", "-o", work / "more.onnx")  # 8 of 16 held out
    assert quiet.returncode == 0 and "too few to bound" not in quiet.stderr
    (work / "few.onnx").unlink()
    (work / "more.onnx").unlink()
    ids.unlink()


def test_convert_summary_names_every_setting(work):
    r = run_cli("convert", MIXTRAL, "-o", work / "s.onnx", "--policy", "top-p", "--threshold", "0.4",
                "--min-experts", "1", "--max-experts", "2", "--renormalize", "0.5", "--per-expert-weights")
    assert r.returncode == 0, r.stderr
    assert ("[policy top-p, threshold 0.4, max-experts 2, renormalize 0.5, per-expert-weights]" in r.stdout), r.stdout
    plain = run_cli("convert", MIXTRAL, "-o", work / "s2.onnx", "--json")
    assert json.loads(plain.stdout)["settings"] == {"policy": "static"}


GENAI = sorted((FAMILY_GRAPHS[0].parent / "genai").glob("*_cpu"))
OPTIMUM = sorted((FAMILY_GRAPHS[0].parent / "optimum").glob("*.onnx"))


@pytest.mark.parametrize("graph", FAMILY_GRAPHS + OPTIMUM + GENAI, ids=lambda p: p.parent.name + "/" + p.stem
                         if p.is_file() else p.name)
def test_every_reference_graph_knows_its_vocabulary(graph):
    """The bound is read off each graph's embedding, tied LM heads and int4 tables included: the
    last id passes and the next one is refused."""
    import re

    from moe_export import MoeExportError
    from moe_export.run.runtime import check_inputs, make_feeds

    path = graph / "model.onnx" if graph.is_dir() else graph
    model = onnx.load(str(path), load_external_data=False)
    feeds = make_feeds(model, tokens=4, past=0, base=path.parent)
    feeds["input_ids"][...] = 10**9
    with pytest.raises(MoeExportError, match=r"token ids must be in \[0, \d+\)") as e:
        check_inputs(feeds, model)
    vocab = int(re.search(r"\[0, (\d+)\)", str(e.value)).group(1))
    feeds["input_ids"][...] = vocab - 1
    check_inputs(feeds, model)
    feeds["input_ids"][...] = vocab
    with pytest.raises(MoeExportError):
        check_inputs(feeds, model)


def test_batches_bound_the_weight_gathers():
    """An original batched section gathers a weight slab per (token, slot): validate sizes its
    batches so that those copies stay within GATHER_BUDGET, never splitting a sequence."""
    from moe_export.run.runtime import GATHER_BUDGET, batches, gathered_per_token
    from moe_export.run.validate import routing_indices

    model = onnx.load(str(MIXTRAL), load_external_data=False)
    per_token = gathered_per_token(model, routing_indices(model)[1])
    tables = [t for t in model.graph.initializer if len(t.dims) == 3]
    slab = sum(int(np.prod(t.dims[1:])) * 4 for t in tables) // 2  # two layers, float32
    assert per_token == 2 * slab  # k = 2 slots per token
    feeds = {"input_ids": np.zeros((10, 4), dtype=np.int64)}
    assert [len(p["input_ids"]) for p in batches(model, feeds, token_bytes=GATHER_BUDGET // 8)] == [2] * 5
    assert [len(p["input_ids"]) for p in batches(model, feeds, token_bytes=GATHER_BUDGET)] == [1] * 10
    assert [len(p["input_ids"]) for p in batches(model, feeds)] == [10]
