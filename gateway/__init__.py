"""The edge: SMTP MX listener and HTTP API, translating the outside world into gRPC."""
