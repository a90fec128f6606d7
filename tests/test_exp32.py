"""exp32, the exponential every build of the kernel and the spec share, is monotone on every
float in [-88, 0]: router_core.h's logit_gate() ranks softmax scores by their logits on that."""
import numpy as np

from moe_export.op.spec import exp32


def test_exp32_never_increases_as_x_decreases_to_minus_88():
    stop = int(np.float32(-88.0).view(np.uint32))
    prev, chunk = np.float32(np.inf), 1 << 22
    # the bit patterns from -0 up to -88 are the floats from -0 down to -88, in order
    for lo in range(int(np.float32(-0.0).view(np.uint32)), stop + 1, chunk):
        e = exp32(np.arange(lo, min(lo + chunk, stop + 1), dtype=np.uint32).view(np.float32))
        assert e[0] <= prev and (np.diff(e) <= 0).all(), f"exp32 increases near bits {lo:#x}"
        prev = e[-1]
    assert exp32(np.float32(-88.0)) == 0 and exp32(np.float32(0.0)) == 1
