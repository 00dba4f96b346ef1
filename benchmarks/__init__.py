"""Benchmarks of apsched-mongo against APScheduler's built-in MongoDB data store."""
