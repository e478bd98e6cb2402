"""Time limits of the test suite. A test never asserts a duration, and no limit here is one that a loaded 2-core
machine can reach with bounded work: the only limit is a hang guard, far above any honest run (issue 13, item 7).
A test that waits for a child to reach a point (a checkpoint to kill at) waits as long as the child lives."""

HANG_GUARD_S = 3600  # a subprocess still running after an hour is hung, not slow
