"""Tests of the durable ledger: both backends, the writer, and reconciliation."""
