"""The LoadTracker demand model (clockwork.md §4.8): load priorities, replicas, the load gate, eviction order."""
from workbench.controller.estimates import ModelEstimates
from workbench.controller.loads import BASE_OUTSTANDING, LoadTracker
from workbench.controller.requests import Request
from workbench.controller.state import GPUState, ModelState

MS = 1_000_000
CAP = 100 * MS


def gpus(n, pages=100):
    return [GPUState(i, i, 0, pages, 1 << 24, 1980, 0, 10 * MS) for i in range(n)]


def model(i, b1=3 * MS, pages=7):
    m = ModelState(i, f"m{i}", f"profile:m{i}")
    m.batch_sizes = (1,)
    m.num_pages = pages
    m.est = ModelEstimates((1,), (b1,), 2 * MS, 1980)
    m.b1_ns = b1
    m.ready = True
    return m


def request(rid, m, now, slo=100 * MS):
    return Request(rid, m, now, slo, 0.0, None, None, MS)


def add(tr, m, now, n=1, slo=100 * MS, start=0):
    rs = [request(start + i, m, now, slo) for i in range(n)]
    for r in rs:
        tr.add_request(r, m, now, slo - MS, 20 * MS)
    return rs


def test_demand_returns_exactly_to_zero():
    gs = gpus(2)
    tr = LoadTracker(gs, CAP)
    m = model(0)
    tr.begin_load(m, gs[0])
    tr.finish_load(m, gs[0], True)
    rs = add(tr, m, 0, n=7)
    assert m.outstanding_exec > 0 and m.outstanding_lw > 0
    assert gs[0].outstanding > BASE_OUTSTANDING
    tr.executing(rs[:3], m, gs[0])
    tr.release(rs, m)
    assert m.outstanding_exec == 0 and m.outstanding_lw == 0
    assert gs[0].outstanding == BASE_OUTSTANDING and gs[1].outstanding == BASE_OUTSTANDING


def test_unloaded_model_with_demand_is_chosen_and_gate_blocks_served_models():
    gs = gpus(2)
    tr = LoadTracker(gs, CAP)
    cold, idle = model(0), model(1)
    add(tr, cold, 0, n=2)
    assert tr.choose(gs[0], 0, lambda m: True) is cold
    tr.begin_load(cold, gs[0])            # an idle GPU serves all its demand now: priority <= 0
    assert cold.priority <= 0
    assert tr.choose(gs[1], 0, lambda m: True) is None     # the gate: no load without unserved demand
    assert tr.choose(gs[1], 0, lambda m: idle is m) is None  # a model without demand is never loaded


def test_hot_model_on_overloaded_gpu_gets_a_replica():
    gs = gpus(2)
    tr = LoadTracker(gs, CAP)
    hot = model(0, b1=10 * MS)
    tr.begin_load(hot, gs[0])
    tr.finish_load(hot, gs[0], True)
    add(tr, hot, 0, n=60)                 # 60 x 10 ms of work per 100 ms: 6x the GPU's capacity
    assert tr.priority(hot) > 0
    assert tr.choose(gs[0], 0, lambda m: True) is None     # it is already on gpu 0
    assert tr.choose(gs[1], 0, lambda m: True) is hot      # gpu 1 replicates it
    tr.begin_load(hot, gs[1])
    assert sorted(hot.allocations) == [0, 1]               # exec demand now spread over both


def test_load_demand_expires_after_weights_slo():
    gs = gpus(2)
    tr = LoadTracker(gs, CAP)
    hot, cold = model(0, b1=10 * MS), model(1)
    tr.begin_load(hot, gs[0])
    tr.finish_load(hot, gs[0], True)
    add(tr, hot, 0, n=60)
    add(tr, cold, 0, n=2, start=100)
    assert tr.priority(hot) > 0 and tr.priority(cold) > 0
    tr.check(20 * MS + 1)                 # weights_slo (20 ms) passed: a replica could no longer help them
    assert hot.outstanding_lw == 0 and hot.outstanding_exec > 0
    assert tr.priority(hot) <= 0
    # a model with no copy anywhere keeps its pending requests' demand: they cannot run without a load
    assert tr.priority(cold) > 0
    assert tr.choose(gs[1], 20 * MS + 1, lambda m: True) is cold


def test_eviction_order_lru_without_demand_first_never_busy():
    gs = gpus(1)
    g = gs[0]
    tr = LoadTracker(gs, CAP)
    ms = [model(i) for i in range(4)]
    for m in ms:                          # loaded in order 0..3: 0 is least recently used
        tr.begin_load(m, g)
        tr.finish_load(m, g, True)
    add(tr, ms[1], 0)                     # 1 has demand
    g.busy_models[0] = 1                  # 0 has an inference in flight
    assert tr.evict_candidate(g) is ms[2]     # LRU among those without demand and not busy
    tr.unload(ms[2], g)
    tr.unload(ms[3], g)
    assert tr.evict_candidate(g) is ms[1]     # only one with demand left (0 is busy)
    g.busy_models.clear()
    assert tr.evict_candidate(g) is ms[0]
    assert g.free_pages == 100 - 2 * 7


def test_models_being_loaded_are_neither_loadable_nor_evictable():
    gs = gpus(1)
    g = gs[0]
    tr = LoadTracker(gs, CAP)
    m = model(0)
    add(tr, m, 0, n=5)
    tr.begin_load(m, g)
    assert tr.evict_candidate(g) is None
    assert tr.choose(g, 0, lambda x: True) is None
    tr.finish_load(m, g, False)           # failed: pages back, loadable again
    assert g.free_pages == 100 and m.holding == []
    assert tr.choose(g, 0, lambda x: True) is m
