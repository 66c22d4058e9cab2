"""The serving benchmark (``xmr serve-bench``): offline score-matrix throughput and online latency under load."""

from xmr.benchmark.hardware import Hardware, UtilisationMonitor, hardware_for
from xmr.benchmark.offline_bench import OfflineConfig, run_offline
from xmr.benchmark.online_bench import OnlineConfig, Workload, run_online
from xmr.benchmark.serve_bench import PLOT, REPORT, ServeBenchConfig, run_serve_bench, write_report
from xmr.benchmark.serve_report import plot_report, print_report

__all__ = ["PLOT", "REPORT", "Hardware", "OfflineConfig", "OnlineConfig", "ServeBenchConfig", "UtilisationMonitor",
           "Workload", "hardware_for", "plot_report", "print_report", "run_offline", "run_online", "run_serve_bench",
           "write_report"]
