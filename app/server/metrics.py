"""GET /metrics: the host's counters in Prometheus's text format, named like llama-server's (`llamacpp:` there,
`tandem:` here) so one dashboard reads both. Draft counters keep llama.cpp's meanings: a draft is one
drafting call (a round that drafted), draft tokens are the tokens sent for verification, accepted ones
those the main model kept; `draft_accepted_at_position` counts, per position in a draft, the rounds whose
token at that position was kept (position 1 is the first drafted token)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from app.host import EngineHost

CONTENT_TYPE = CONTENT_TYPE_LATEST  # the format generate_latest writes, as prometheus_client names it

class HostCollector:
    """Reads the host's counters at each scrape (nothing is kept twice)."""

    def __init__(self, host: EngineHost):
        self.host = host

    def collect(self) -> Iterator[Metric]:
        host, counted = self.host, self.host.counters
        totals = [
            ("requests", "Requests that ended with a reply", counted.requests),
            ("requests_failed", "Requests that ended with an error", counted.failed),
            ("requests_stalled", "Streams ended because their client stopped reading", counted.stalled),
            ("prompt_tokens", "Prompt tokens evaluated (a reused KV prefix is not)", counted.prompt_tokens),
            ("tokens_predicted", "Tokens generated", counted.predicted_tokens),
            ("tokens_predicted_seconds", "Time spent generating, in seconds", counted.generation_seconds),
            ("drafts", "Drafting calls: rounds that drafted tokens", counted.drafts),
            ("draft_tokens", "Draft tokens sent to the main model for verification", counted.draft_tokens),
            ("draft_tokens_accepted", "Draft tokens the main model accepted", counted.draft_accepted),
            ("worker_seconds", "Time the engine's thread spent starting replies and running rounds, in seconds",
             counted.worker_seconds),
            ("llama_decode_seconds", "Of worker_seconds, the time inside llama.cpp's decodes (the rest is Python's)",
             counted.llama_seconds),
        ]
        for name, help_text, value in totals:
            yield CounterMetricFamily(f"tandem:{name}", help_text, value=value)
        by_position = CounterMetricFamily("tandem:draft_accepted_at_position", "Rounds whose draft token at this position "
                                          "(1 = the first drafted) was accepted", labels=["position"])  # fmt: skip
        for position, value in enumerate(list(counted.accepted_at), start=1):
            by_position.add_metric([str(position)], value)
        yield by_position
        labels = ["source"]  # model, mtp or lookup
        per_source = [CounterMetricFamily("tandem:drafts_by_source", "Drafting calls, by draft source", labels=labels),
                      CounterMetricFamily("tandem:draft_tokens_by_source", "Draft tokens sent, by draft source", labels=labels),
                      CounterMetricFamily("tandem:draft_tokens_accepted_by_source", "Draft tokens accepted, by draft source",
                                          labels=labels)]  # fmt: skip
        for source, counts in sorted(counted.by_source.items()):
            for family, value in zip(per_source, counts, strict=True):
                family.add_metric([source], value)
        yield from per_source
        yield GaugeMetricFamily("tandem:requests_processing", "Requests being generated now", value=len(host.active))
        yield GaugeMetricFamily("tandem:sequences", "Replies that can be generated together (--parallel)", value=host.parallel)
        yield GaugeMetricFamily("tandem:requests_deferred", "Requests waiting in the queue", value=host.queued)
        yield GaugeMetricFamily("tandem:model_ready", "1 when the models are loaded and serving", value=int(host.state == "ready"))


def exposition(host: EngineHost) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostCollector(host))
    return generate_latest(registry)
