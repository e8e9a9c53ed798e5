"""End-to-end tests of the durable ledger through the server, the gRPC API and the CLI (issue 3)."""
