"""Prometheus metrics for /metrics."""

from prometheus_client import Counter, Gauge, Histogram

REPLIES = Counter("homefire_replies_total", "Replies by API and outcome", ["api", "outcome"])
TOKENS = Counter("homefire_completion_tokens_total", "Tokens generated for replies")
TTFT = Histogram(
    "homefire_time_to_first_token_seconds", "From request to first token",
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ENGINE_READY = Gauge("homefire_engine_ready", "1 when the vLLM engine is ready")
ENGINE_RESTARTS = Gauge("homefire_engine_restarts", "Times the vLLM child was restarted")
UNSTORED = Counter("homefire_unstored_requests_total",
                   "Chat requests answered without being stored, by why (store_false, utility_model, "
                   "task) and the client whose background task it was", ["why", "client"])
DROPPED = Counter("homefire_prompt_turns_dropped_total",
                  "Turns of a conversation left out of a reply's prompt that no summary covered")
FOLDS = Counter("homefire_summary_folds_total",
                "Folds of a conversation's turns into its summary, by outcome (ok, failed; extractive: "
                "of the ok ones, those the model only went on with the conversation in)", ["outcome"])
