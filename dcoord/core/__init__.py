"""Sans-I/O cores: the semantics of a primitive as pure decisions on state and ``now``.

The sync API (:mod:`dcoord.lock`) and the async API (:mod:`dcoord.aio`) are thin I/O
layers that drive these decisions, so the rules are written once (docs/design.md).
Nothing here reads a clock, sleeps, locks or talks to a server: time comes in as an
argument, which is what lets tests drive it with a fake clock.
"""
