"""Workloads: closed loop, Poisson open loop, bursty ("thousands of models"), SLO sweeps and Azure Functions
trace replay. Each schedules arrivals with `clock.call_at` and calls `controller.submit(...)`, so it runs
unchanged on a RealClock or a VirtualClock, and the same seed gives the same arrivals."""
from workbench.workload.azure import AzureReplay, map_functions
from workbench.workload.azure_trace import AzureTrace, TraceError
from workbench.workload.base import OpenLoop, Workload
from workbench.workload.bursty import Bursty
from workbench.workload.closed_loop import ClosedLoop
from workbench.workload.mix import Mix
from workbench.workload.poisson import Poisson
from workbench.workload.sink import Sink
from workbench.workload.slo_sweep import SloSweep

WORKLOADS = {"closed_loop": ClosedLoop, "poisson": Poisson, "bursty": Bursty, "slo_sweep": SloSweep,
             "azure": AzureReplay}

__all__ = ["Workload", "OpenLoop", "ClosedLoop", "Poisson", "Bursty", "SloSweep", "AzureReplay", "AzureTrace",
           "TraceError", "Mix", "Sink", "map_functions", "WORKLOADS"]
