"""Real-time monitor: capture, scoring, alert logic and ZeroMQ publishing."""
