"""Fixtures; the helpers tests share are in helpers.py."""
import sys

import pytest


@pytest.fixture(scope="session")
def ort_ref():
    import onnxruntime as ort

    def run(path, feeds):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    return run


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(family): `moe-export export` of the family's tiny checkpoint (graphs/make_graphs.py),
    run once per test session whichever modules ask (an export takes about 10 s)."""
    from helpers import GRAPHS, run_cli

    done = {}

    def get(family):
        if family not in done:
            sys.path.insert(0, str(GRAPHS))
            from make_graphs import tiny_model

            d = tmp_path_factory.mktemp(f"export_{family}")
            tiny_model(family).save_pretrained(d / "ckpt")
            r = run_cli("export", d / "ckpt", "-o", d / "model.onnx")
            assert r.returncode == 0, r.stderr
            done[family] = d / "model.onnx"
        return done[family]
    return get
