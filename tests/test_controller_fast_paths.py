"""The controller's written-out fast paths against the general code they stand for: same outcomes, row for row."""
import random

from workbench.clock import VirtualClock
from workbench.controller.controller import Controller
from workbench.controller.estimates import ModelEstimates
from workbench.controller.scheduler import ClockworkPolicy
from workbench.worker.config import WorkerConfig
from workbench.worker.emulated import EmulatedWorker
from workbench.worker.profile import Profile

PROFILE = Profile.load("h200")
MS = 1_000_000


class GeneralOnly(ClockworkPolicy):
    """Clockwork without the one-step dispatch: every request is queued, demand-tracked and scheduled."""

    def _dispatch_alone(self, r, m, g, now):
        return False


class CountingAlone(ClockworkPolicy):
    def __init__(self) -> None:
        super().__init__()
        self.alone = 0

    def _dispatch_alone(self, r, m, g, now):
        done = super()._dispatch_alone(r, m, g, now)
        self.alone += done
        return done


def test_one_step_dispatch_gives_the_general_paths_outcomes():
    """Models swapped on two small caches, some requests dropped: every request and action row, and every
    policy counter, is the same whether an arriving request may be dispatched in one step or never is."""
    from workbench.telemetry.recorder import Recorder
    from workbench.workload import Poisson

    def sim(policy):
        clock, rec = VirtualClock(), Recorder()
        ctl = Controller(clock, policy=policy, recorder=rec)
        cfg = WorkerConfig.load(None, weights_cache_size=f"{20 * 16} MiB")     # 20 pages: models are swapped
        for w in range(2):
            ctl.add_worker(lambda cb, w=w: EmulatedWorker(clock, 1, PROFILE, cfg, cb, seed=w))
        ids = ctl.load_model("profile:resnet50", 6) + ctl.load_model("profile:mobilenet_v2", 4)
        ctl.wait_ready()
        Poisson(ids, rate=1500, slo_ms=40, seed=3).start(ctl, clock, duration_s=1.5)
        clock.run_until(clock.now() + 2_000 * MS)
        return rec.requests(), rec.actions(), ctl.summary()
    fast = CountingAlone()
    ra, aa, sa = sim(fast)
    rb, ab, sb = sim(GeneralOnly())
    assert fast.alone > 100, "the one-step dispatch was never taken"
    assert sa["clockwork_loads"] > 20 and sa.get("dropped", 0) > 0 and sa["success"] > 1000, sa
    assert ra.equals(rb) and aa.equals(ab) and sa == sb


def test_incremental_estimate_updates_match_a_recompute():
    """add_exec updates the estimate tables in place; a full recompute from the windows gives the same tables
    (sizes measured and unmeasured, several clocks, values rising and falling)."""
    rng = random.Random(7)
    for trial in range(30):
        sizes = (1, 2, 4, 8, 16)
        profiled = () if trial % 3 == 0 else tuple(1_000_000 * b // 2 + 500_000 for b in sizes)
        est = ModelEstimates(sizes, profiled, 5_000_000, ref_clock=1980, window=rng.choice([1, 3, 10]))
        clocks = [0, 1980, 1410]
        for _ in range(300):
            b = rng.choice(sizes[:3]) if rng.random() < 0.8 else rng.choice(sizes)
            for c in rng.sample(clocks, rng.randint(0, 2)):
                est.exec_table(c)                      # tables cached for some clocks, not others
            est.add_exec(b, int(rng.lognormvariate(14 + b / 8, 0.3)), rng.choice([1980, 1410, 0]))
            tables = {c: list(t) for c, t in est._tables.items()}
            values = list(est.values)
            est._recompute()
            assert est.values == values
            for c, t in tables.items():
                assert est.exec_table(c) == t
