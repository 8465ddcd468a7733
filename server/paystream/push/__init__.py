"""Fan-out to browsers: the listener (the engine seam), the hub and its subscriptions,
and the SSE, WebSocket and long-poll endpoints."""
