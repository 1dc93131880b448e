"""Web push: VAPID keys, listeners' subscriptions in Redis, and the trend notifier."""
