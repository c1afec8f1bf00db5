"""/metrics in Prometheus' text format: what this gateway served, and the server's state.

Request counts, token counts and the TTFT / TPOT / E2E histograms cover the requests this gateway
served, timed here (so they include the gateway's own share of the latency). Several gateways may
front one controller: each exports its own, and Prometheus sums the instances. The server's
gauges (requests running and waiting, KV pages, SM shares, switches, monitor verdicts) are read
from the controller's stats at each scrape, so every gateway exports the same values for them."""

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from semipd.shared.protocol import Final

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class ServerStats:
    """A collector of the controller's stats as last read (None: it did not answer)."""

    def __init__(self):
        self.stats: dict | None = None

    def describe(self):
        return []  # the families depend on the stats: nothing to check when registering

    def collect(self):
        up = GaugeMetricFamily("semipd_server_up", "1 if the controller answered this scrape")
        up.add_metric([], self.stats is not None)
        yield up
        s = self.stats
        if s is None:
            return
        yield _gauge("semipd_requests_running", "requests generating output", s["running"])
        yield _gauge("semipd_requests_waiting", "requests waiting for their first token", s["waiting"])
        yield _gauge("semipd_kv_pages_used", "KV cache pages in use", s["kv_pages_total"] - s["kv_pages_free"])
        yield _gauge("semipd_kv_pages_total", "KV cache pages in the pool", s["kv_pages_total"])
        shares = GaugeMetricFamily("semipd_sm_share_percent", "each phase's share of the GPU's SMs",
                                   labels=["phase"])
        for phase in ("prefill", "decode"):
            shares.add_metric([phase], s["partition"][f"{phase}_sm"])
        yield shares
        yield CounterMetricFamily("semipd_partition_switches", "switches of the SM split so far",
                                  len(s["partition"]["history"]))
        cache = s["prefix_cache"]
        yield _gauge("semipd_prefix_cache_pages", "KV pages holding cached prompt prefixes", cache["cached_pages"])
        yield _gauge("semipd_prefix_cache_hit_rate", "prompt tokens served from the prefix cache over all",
                     cache["hit_rate"])
        for key, documentation in (("hit_tokens", "prompt tokens served from the prefix cache"),
                                   ("prompt_tokens", "prompt tokens started"),
                                   ("evicted_pages", "cached pages evicted for room")):
            yield CounterMetricFamily(f"semipd_prefix_cache_{key}", documentation, cache[key])
        monitor = s.get("scm")
        if monitor:
            yield CounterMetricFamily("semipd_monitor_requests", "requests the content monitor watched",
                                      monitor["monitored"])
            yield CounterMetricFamily("semipd_monitor_verdicts", "requests the content monitor stopped",
                                      monitor["flagged"])
            yield CounterMetricFamily("semipd_monitor_failures", "streams the content monitor failed",
                                      monitor["failures"])


def _gauge(name: str, documentation: str, value) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class GatewayMetrics:
    def __init__(self):
        disable_created_metrics()  # a *_created sample beside every series says nothing here
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("semipd_gateway_requests", "requests to the engine by finish reason",
                                ["finish_reason"], registry=r)
        self.tokens = Counter("semipd_gateway_tokens", "prompt and completion tokens", ["kind"], registry=r)
        self.ttft = Histogram("semipd_gateway_time_to_first_token_seconds", "time to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("semipd_gateway_time_per_output_token_seconds",
                              "mean time between a request's tokens after the first", buckets=TPOT_BUCKETS,
                              registry=r)
        self.e2e = Histogram("semipd_gateway_e2e_request_latency_seconds", "time to the last token",
                             buckets=E2E_BUCKETS, registry=r)
        self.server = ServerStats()
        r.register(self.server)

    def finished(self, final: Final, started: float, first_token_at: float | None, now: float) -> None:
        """One engine request ended; the times are time.monotonic()'s."""
        self.requests.labels(final.finish_reason).inc()
        self.tokens.labels("prompt").inc(final.prompt_tokens)
        self.tokens.labels("completion").inc(final.completion_tokens)
        if final.finish_reason not in ("stop", "length", "content_filter"):
            return  # aborted or failed: its times say nothing about the service
        self.e2e.observe(now - started)
        if first_token_at is not None:
            self.ttft.observe(first_token_at - started)
            if final.completion_tokens > 1:
                self.tpot.observe((now - first_token_at) / (final.completion_tokens - 1))

    def aborted(self) -> None:
        """An engine request whose HTTP client left before it ended."""
        self.requests.labels("abort").inc()

    def render(self, stats: dict | None) -> bytes:
        self.server.stats = stats  # no await between these: a scrape reads its own stats
        return generate_latest(self.registry)
