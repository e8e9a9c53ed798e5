"""End-to-end tests through the real gRPC API, the typed clients and the CLI."""
