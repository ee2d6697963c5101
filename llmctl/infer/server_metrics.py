"""Prometheus metrics of the API server, labelled by served model (an A/B route's variant is its model)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self, models: dict) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llmctl_requests",
            "Completed API requests",
            ["model", "endpoint", "finish_reason"],
            registry=self.registry,
        )
        self.choices = Counter(
            "llmctl_choices",
            "Completed choices (a request with n choices has n)",
            ["model", "endpoint", "finish_reason"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "llmctl_fallbacks",
            "Requests (or their rest) served by an alias's fallback model",
            ["alias", "model", "fallback"],
            registry=self.registry,
        )
        self.errors = Counter(
            "llmctl_errors", "Requests whose generation failed", ["model"], registry=self.registry
        )
        self.rejected_requests = Counter(
            "llmctl_rejected_requests", "Requests refused with 429", ["model"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "llmctl_prompt_tokens", "Prompt tokens processed", ["model"], registry=self.registry
        )
        self.generated_tokens = Counter(
            "llmctl_generated_tokens", "Tokens generated", ["model"], registry=self.registry
        )
        self.latency = Histogram(
            "llmctl_request_latency_seconds",
            "Request latency",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "llmctl_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        queue = Gauge(
            "llmctl_queue_depth", "Requests waiting for a batch slot", ["model"], registry=self.registry
        )
        active = Gauge(
            "llmctl_active_requests", "Requests in the running batch", ["model"], registry=self.registry
        )
        steps = Gauge("llmctl_decode_steps", "Decode steps run", ["model"], registry=self.registry)
        busy = Gauge(
            "llmctl_time_seconds",
            "Cumulative seconds by phase: the engine's prefill, forward, sampling and token delivery; the "
            "event loop's detokenization and SSE encoding",
            ["model", "phase"],
            registry=self.registry,
        )
        prefix = Gauge(
            "llmctl_prefix_cache",
            "Prefix cache: prompts looked up, hits, prompt tokens reused instead of prefilled, hit rate",
            ["model", "measure"],
            registry=self.registry,
        )
        speculation = Gauge(
            "llmctl_speculation",
            "Speculative decoding (serve --draft): draft tokens proposed, accepted, acceptance rate, target passes",
            ["model", "measure"],
            registry=self.registry,
        )
        for name, served in models.items():
            if served.engine.speculation is not None:
                counts = served.engine.speculation.stats
                for measure in ("proposed", "accepted", "acceptance_rate", "target_passes"):
                    speculation.labels(name, measure).set_function(lambda s=counts, m=measure: getattr(s, m))
            if served.engine.prefixes is not None:
                stats = served.engine.prefixes.stats
                for measure in ("queries", "hits", "reused_tokens", "hit_rate"):
                    prefix.labels(name, measure).set_function(lambda s=stats, m=measure: getattr(s, m))
            queue.labels(name).set_function(served.engine.queue_depth)
            active.labels(name).set_function(served.engine.active)
            steps.labels(name).set_function(lambda engine=served.engine: engine.decode_steps)
            for phase in served.engine.seconds:
                busy.labels(name, phase).set_function(lambda e=served.engine, p=phase: e.seconds[p])
            for phase in served.stream_seconds:
                busy.labels(name, phase).set_function(lambda m=served, p=phase: m.stream_seconds[p])

    def rejected(self, model: str) -> None:
        self.rejected_requests.labels(model).inc()

    def finished(
        self, model: str, endpoint: str, records: list, seconds: float, started: float, failed: bool = False
    ) -> None:
        if failed:
            self.errors.labels(model).inc()
        self.requests.labels(model, endpoint, records[0].finish_reason or "cancelled").inc()
        for record in records:
            self.choices.labels(model, endpoint, record.finish_reason or "cancelled").inc()
            self.prompt_tokens.labels(model).inc(record.prompt_tokens)
            self.generated_tokens.labels(model).inc(record.completion_tokens)
            if record.first_token_at is not None:
                self.ttft.labels(model).observe(record.first_token_at - started)
        self.latency.labels(model).observe(seconds)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
