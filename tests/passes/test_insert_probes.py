"""insert_probes: each cache point's tensors pass through a probe the profiler observes; with no session the
graph computes exactly what it computed."""

import pytest
import torch

from fxcache.analysis.probes import ProbeSession
from fxcache.errors import IRError
from fxcache.ir import CachePoint, verify
from fxcache.passes import InsertProbes, run_passes
from passes.graphs import fresh, inputs, points, traced


class Seen(ProbeSession):
    def __init__(self):
        self.keys = []

    def probe(self, key, index, value, base):
        self.keys.append((key, index))
        return value


def test_probes_report_every_point_and_change_nothing():
    td = traced()
    pts = points(td)
    wanted = [pts["block:blocks.0"], pts["layer:blocks.1.mlp"], pts["signal:sample"]]
    gm = run_passes(fresh(td), [InsertProbes(wanted)])
    verify(gm)
    with torch.no_grad():
        plain = gm(*inputs())
        with Seen() as seen:
            observed = gm(*inputs())
    assert torch.equal(plain, observed) and torch.equal(plain, td(*inputs()))
    assert sorted(seen.keys) == [("block:blocks.0", 0), ("layer:blocks.1.mlp", 0), ("signal:sample", 0)]


def test_no_points_no_probes_and_unknown_nodes_are_refused():
    td = traced()
    gm = fresh(td)
    assert InsertProbes([])(gm).modified is False
    bogus = CachePoint("block:nowhere", "block", ("nowhere/aten.add.Tensor#0",), (None,), None, None, 0, False,
                       ((1,),), ("f32",))
    with pytest.raises(IRError, match="cache point 'block:nowhere': node 'nowhere/aten.add.Tensor#0' is not in the"):
        run_passes(fresh(td), [InsertProbes([bogus])])
