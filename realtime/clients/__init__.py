"""Clients of the publisher: subscriber, console client, overlay display."""
