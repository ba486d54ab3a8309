"""Publishing: the ZeroMQ publisher, alert log, message schema, CURVE keys."""
