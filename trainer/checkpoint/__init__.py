"""Checkpoints: sharded asynchronous saves, atomic commit, resume and resharding.

``boxes`` hands DCP the layout-independent pieces of each tensor; ``state``
says what a checkpoint holds and under which names; ``manager`` saves during
training and restores at start-up; ``store`` (no torch) commits, lists,
verifies and prunes checkpoint directories. See docs/CHECKPOINTS.md.
"""
