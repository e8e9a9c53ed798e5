"""Tests of the load-test harness: a smoke run, and the pieces that can be checked without load."""
