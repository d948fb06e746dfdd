"""The randomized fault-injection suite (Jepsen / etcd robustness style).

Worker processes (threads on the memory backend) run a workload against a real server
while a seeded nemesis pauses and kills them and pauses, kills and restarts the server;
every operation and fault goes into a history, and checkers look for the invariants the
library promises to keep (fences, mutual exclusion, atomic transactions, liveness).

Run ``python -m tests.faults.randomized --help``; docs/faults.md explains the faults,
the checkers and the soak run.
"""
