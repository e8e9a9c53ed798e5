"""The gRPC API: thin servicers, the one map from errors to status codes, and the server."""
