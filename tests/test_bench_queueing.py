"""The batcher simulation behind docs/serving.md's reading of p99 under load
(bench/serve_queueing.py) agrees with queueing theory where theory has a closed form."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import serve_queueing  # noqa: E402


def test_one_query_at_a_time_is_an_md1_queue():
    """max_batch 1, constant service: mean wait is Pollaczek-Khinchine's rho / (2 mu (1 - rho))."""
    service, rho = 0.01, 0.7
    latencies = serve_queueing.simulate(lambda n: service * n, rho / service, 1, 0.0, requests=200_000)
    assert np.mean(latencies) - service == pytest.approx(rho * service / (2 * (1 - rho)), rel=0.03)
    assert latencies.min() == pytest.approx(service)


def test_free_batches_bound_every_latency():
    """A batch that costs what one query costs: a request waits at most for the batch in
    service and the queue delay, then its own batch (the load never fills max_batch here)."""
    cost, delay = 0.01, 0.002
    latencies = serve_queueing.simulate(lambda n: cost, 0.7 * 16 / cost, 64, delay, requests=50_000)
    assert latencies.min() >= cost and latencies.max() <= 2 * cost + delay + 1e-12
    ratios = serve_queueing.tail_ratios(lambda n: cost, 64, delay)
    assert all(r < 2 for r in ratios.values())


def test_no_batching_gain_puts_p99_far_above_twice_p50():
    """Linear batch cost (a compute-bound CPU): p99/p50 at 70% load is well past 2."""
    assert serve_queueing.tail_ratios(lambda n: float(n), 64, 0.0)["0.7"] > 4


def test_one_query_at_a_time_on_c_instances_is_an_mmc_queue():
    """Exponential service on c instances, max_batch 1: mean wait is Erlang C's
    C(c, a) / (c mu - lambda) (a = lambda / mu), the next request going to the instance free first."""
    service, instances, rho = 0.01, 3, 0.7
    rate, a = rho * instances / service, rho * instances
    terms = [a ** k / math.factorial(k) for k in range(instances)]
    tail = a ** instances / math.factorial(instances) / (1 - rho)
    erlang_c = tail / (sum(terms) + tail)
    draws = np.random.default_rng(1)
    latencies = serve_queueing.simulate(lambda n: float(draws.exponential(service)), rate, 1, 0.0, instances,
                                        requests=300_000)
    assert np.mean(latencies) - service == pytest.approx(erlang_c / (instances / service - rate), rel=0.05)


def test_more_instances_than_arrivals_never_queue():
    latencies = serve_queueing.simulate(lambda n: 0.01 * n, 1e4, 1, 0.0, instances=1000, requests=1000)
    assert latencies == pytest.approx(np.full(1000, 0.01))
